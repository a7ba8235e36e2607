"""Object-store access for the operator: the referenced Secret, read through the API."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.finetunejob import Storage, Tracking
from kubetune.contract import MLFLOW_BASIC_AUTH_KEYS, MLFLOW_TOKEN_KEY
from kubetune.controller.kube import KubeClient, path_for
from kubetune.storage.config import StorageConfig, StorageConfigError


@dataclass
class NotReady(Exception):
    """Something outside the spec is missing or unreachable; it may appear later, so the job waits."""
    reason: str
    message: str


async def storage_config(client: KubeClient, namespace: str, storage: Storage | None) -> StorageConfig | None:
    if storage is None:
        return None
    name = storage.secret_ref.name
    secret = await client.get(path_for("v1", "secrets", namespace, name))
    if secret is None:
        raise NotReady("SecretNotFound", f"Secret {name} (storage.secretRef) does not exist in namespace {namespace}")
    try:
        return StorageConfig.from_secret(secret, name)
    except (StorageConfigError, ValueError) as exc:  # ValueError: data that is not base64
        raise NotReady("SecretInvalid", str(exc)) from exc


async def check_tracking_secret(client: KubeClient, namespace: str, tracking: Tracking | None) -> None:
    """The MLflow credentials' Secret, when the spec names one: there, with a token or a username and
    password. The trainer would otherwise start, be refused by the server and train untracked."""
    ref = tracking.mlflow.secret_ref if tracking else None
    if ref is None:
        return
    secret = await client.get(path_for("v1", "secrets", namespace, ref.name))
    if secret is None:
        raise NotReady("SecretNotFound",
                       f"Secret {ref.name} (tracking.mlflow.secretRef) does not exist in namespace {namespace}")
    keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
    if MLFLOW_TOKEN_KEY not in keys and not set(MLFLOW_BASIC_AUTH_KEYS) <= keys:
        raise NotReady("SecretInvalid", f"Secret {ref.name} (tracking.mlflow.secretRef) needs key {MLFLOW_TOKEN_KEY}, "
                       f"or keys {' and '.join(MLFLOW_BASIC_AUTH_KEYS)}; it has {', '.join(sorted(keys)) or 'none'}")
