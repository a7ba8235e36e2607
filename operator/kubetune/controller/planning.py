"""Planning a FineTuneJob before its Job exists: its storage Secret is usable, and the model fits the
GPUs it asks for. The model's shape comes from the base model's config.json where the operator can
read it (s3://); for volumes and the hub the trainer plans when it has loaded the model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from minio.error import S3Error

from kubetune.api import FineTuneJob
from kubetune.api.uris import parse_uri
from kubetune.controller.kube import KubeClient
from kubetune.controller.secrets import NotReady, check_tracking_secret, storage_config
from kubetune.controller.settings import OperatorSettings
from kubetune.planning import ModelShape, RunPlan, plan_run
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import ObjectMissing, open_location

# A reconcile waits this long for the object store before saying it is unavailable and retrying later.
STORAGE_BUDGET_S = 10
DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def _read_config(uri: str, storage: StorageConfig) -> dict | None:
    location = open_location(uri, storage=storage, volume_root=Path("/nonexistent"), retry_budget_s=STORAGE_BUDGET_S)
    try:
        return json.loads(location.get_bytes("config.json"))
    except ObjectMissing:
        return None
    except StorageUnavailable as exc:
        raise NotReady("StorageUnavailable", str(exc)) from exc
    except S3Error as exc:
        reason = "AccessDenied" if exc.code in DENIED else "StorageError"
        raise NotReady(reason, f"{uri}/config.json: {exc.code}: {exc.message}") from exc


async def model_shape(client: KubeClient, ftj: FineTuneJob) -> ModelShape | None:
    storage = await storage_config(client, ftj.metadata.namespace or "default", ftj.spec.storage)
    if parse_uri(ftj.spec.base_model.uri).scheme != "s3" or storage is None:
        return None
    config = await asyncio.to_thread(_read_config, ftj.spec.base_model.uri, storage)
    try:
        return ModelShape.from_config(config) if config is not None else None
    except ValueError:
        return None


async def plan_job(client: KubeClient, settings: OperatorSettings, ftj: FineTuneJob) -> RunPlan:
    """Raises NotReady (wait and retry) or DoesNotFit (refuse)."""
    await check_tracking_secret(client, ftj.metadata.namespace or "default", ftj.spec.tracking)
    shape = await model_shape(client, ftj)
    return plan_run(ftj.spec, shape, ftj.spec.resources.gpu_memory_gib or settings.gpu_memory_gib)
