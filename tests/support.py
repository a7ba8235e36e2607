"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import copy
import inspect
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DELETE = object()


def example_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and str(doc.get("apiVersion", "")).startswith("kubetune.dev/"):
                docs.append((f"{path.relative_to(EXAMPLES)}:{doc['metadata']['name']}", doc))
    return docs


def patched(doc: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of doc with patch merged in; DELETE removes a key."""
    out = copy.deepcopy(doc)

    def merge(target: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DELETE:
                target.pop(key, None)
            elif isinstance(value, dict) and isinstance(target.get(key), dict):
                merge(target[key], value)
            else:
                target[key] = copy.deepcopy(value)

    merge(out, patch)
    return out


def minimal_job(**spec: Any) -> dict[str, Any]:
    """The smallest valid FineTuneJob (LoRA on PVC data), with spec overrides."""
    base = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": "pvc://models/smollm2"},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "method": "lora",
            "output": {"uri": "pvc://runs/job"},
        },
    }
    return patched(base, {"spec": spec})


async def eventually(predicate, timeout: float = 10, what: str = "", interval: float = 0.1):
    """The first truthy value of predicate() (awaited when it returns an awaitable), polled until
    timeout seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or predicate}")
