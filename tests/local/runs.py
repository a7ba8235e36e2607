"""Short training runs on a local stack (the emulator or the real plane), for the tests of what
happens around them: the sample task, trained for a few steps on SmolLM2-135M."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml

from kubetune.controller.kube import path_for
from kubetune.local.stack import LocalStack
from kubetune.storage.location import open_location
from kubetune.storage.models import import_model
from kubetune_trainer.samples import invoice_records
from tests.support import REPO, eventually

EXAMPLE = REPO / "examples" / "local" / "finetunejob.yaml"


def short_job(name: str, namespace: str = "default", *, steps: int = 2, every: int = 1, **spec: object) -> dict:
    """The local example, as short as it gets: `steps` steps of batch 2, a checkpoint every `every`,
    a two-sample loss-only evaluation, no merged model."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["training"]["maxSteps"] = steps
    doc["spec"]["checkpointEverySteps"] = every
    doc["spec"]["evaluation"] = {"exactMatch": False, "maxSamples": 2}
    doc["spec"]["output"].update(merge=False, keepCheckpoints=10)
    doc["spec"].update(spec)
    return doc


def records_jsonl(count: int = 24) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in invoice_records(count)).encode()


async def load_inputs(stack: LocalStack, model_dir: Path, scratch: Path) -> None:
    """The base model and the sample dataset where the example expects them, in the stack's S3."""
    await asyncio.to_thread(import_model, model_dir, "s3://models/smollm2", stack.storage)
    datasets = open_location("s3://datasets", storage=stack.storage, volume_root=scratch)
    await asyncio.to_thread(datasets.ensure_ready)
    await asyncio.to_thread(datasets.put_bytes, "invoices.jsonl", records_jsonl())


def ftj_path(namespace: str, name: str) -> str:
    return path_for("kubetune.dev/v1alpha1", "finetunejobs", namespace, name)


async def status_of(stack: LocalStack, namespace: str, name: str) -> dict:
    return ((await stack.client.get(ftj_path(namespace, name))) or {}).get("status") or {}


async def finished(stack: LocalStack, namespace: str, name: str, timeout_s: float = 900) -> dict:
    async def done():
        status = await status_of(stack, namespace, name)
        return status if status.get("phase") in ("Succeeded", "Failed") else None
    return await eventually(done, timeout_s, f"FineTuneJob {namespace}/{name} to finish")
