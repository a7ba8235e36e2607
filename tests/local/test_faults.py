"""Faults on the local stack, one training run through all of them: the pod evicted (a node drain),
the trainer killed outright, the object store away for 30 s while a checkpoint uploads. The run
must end as an uninterrupted one would: published, verified, at most checkpointEverySteps steps
redone after the kill, preemption and failure each counted once, no half-written checkpoint used."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from kubetune.controller.kube import path_for
from kubetune.local.stack import LocalStack
from kubetune.storage.location import open_location
from kubetune.storage.manifest import read_manifest, verify
from kubetune.storage.models import import_model
from kubetune_trainer.checkpoints import CHECKPOINT_MANIFEST, CheckpointStore
from kubetune_trainer.samples import invoice_records
from tests.support import eventually

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "local" / "finetunejob.yaml"
STEPS, EVERY = 15, 3
OUTAGE_S = 30



async def test_eviction_kill_and_storage_outage_lose_nothing(tmp_path, smollm2_dir):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["training"]["maxSteps"] = STEPS
    doc["spec"]["checkpointEverySteps"] = EVERY
    doc["spec"]["evaluation"]["maxSamples"] = 2
    doc["spec"]["output"].update(merge=False, keepCheckpoints=10)
    doc["spec"]["backoffLimit"] = 2
    async with LocalStack(tmp_path / "stack") as stack:
        await asyncio.to_thread(import_model, smollm2_dir, "s3://models/smollm2", stack.storage)
        datasets = open_location("s3://datasets", storage=stack.storage, volume_root=tmp_path)
        datasets.ensure_ready()
        datasets.put_bytes("invoices.jsonl", "".join(json.dumps(r) + "\n" for r in invoice_records(60)).encode())
        created = await stack.apply(doc)
        name, ns = doc["metadata"]["name"], "default"
        ftj_path = path_for("kubetune.dev/v1alpha1", "finetunejobs", ns, name)
        run = open_location(f"{doc['spec']['output']['uri']}/{name}-{created['metadata']['uid'][:8]}",
                            storage=stack.storage, volume_root=tmp_path)
        store = CheckpointStore(run, keep=10)
        pods_dir = tmp_path / "stack" / "pods" / ns

        async def status():
            return ((await stack.client.get(ftj_path)) or {}).get("status") or {}

        async def running_pod():
            for (pod_ns, pod), _ in stack.executor.running.items():
                if pod_ns == ns and pod.startswith(f"{name}-train-"):
                    return pod
            return None

        async def complete_steps():
            return await asyncio.to_thread(store.complete_steps)

        # 1. Eviction once the first checkpoint is complete: SIGTERM, checkpoint at that step, exit 75.
        await eventually(lambda: _at_least(complete_steps, EVERY), 600, "the first checkpoint")
        first = await running_pod()
        await stack.executor.evict(ns, first)
        evicted_at = max(await complete_steps())
        assert evicted_at >= EVERY
        await eventually(lambda: _status_is(status, preemptions=1, phase="Running"), 120, "the preemption counted")

        # 2. The trainer killed outright (SIGKILL: no chance to checkpoint) after the next checkpoint.
        await eventually(lambda: _at_least(complete_steps, evicted_at + 1), 600, "a checkpoint after the eviction")
        second = await running_pod()
        assert second != first
        reported = ((await status()).get("progress") or {}).get("step") or 0  # the trainer was at least here
        os.killpg(stack.executor.running[(ns, second)].process.pid, signal.SIGKILL)
        resumed_from = max(await complete_steps())  # the newest whole checkpoint when it died
        await eventually(lambda: _status_is(status, failures=1, phase="Running"), 120, "the failure counted")

        # 3. The object store goes away for 30 s while the third attempt trains: its next checkpoint's
        #    upload is retried until the store is back.
        third = await eventually(running_pod, 60, "the third attempt")
        assert third not in (first, second)
        log3 = pods_dir / third / "container.log"
        await eventually(lambda: _async(f"resuming from {run.uri}/checkpoints/checkpoint-{resumed_from}" in log3.read_text()),
                    300, "the third attempt to resume")
        stack.s3.stop()
        stopped = time.monotonic()
        await eventually(lambda: _async("failed (" in log3.read_text() and time.monotonic() - stopped >= OUTAGE_S),
                    300, "an upload retried through a 30-s outage")
        await asyncio.to_thread(stack.s3.start)

        final = await eventually(lambda: _finished(status), 900, "the run to finish")
        assert final["phase"] == "Succeeded", final.get("message")
        assert (final["preemptions"], final["failures"]) == (1, 1)

        # What the kill cost: the steps since the newest checkpoint, which the next attempt resumed
        # from (waited for above): fewer than checkpointEverySteps.
        assert resumed_from > evicted_at and reported - resumed_from < EVERY
        # Every checkpoint a manifest lists is whole, and so is the published run.
        steps = store.complete_steps()
        assert steps[-1] == STEPS and evicted_at in steps
        for step in steps:
            checkpoint = run.child(f"checkpoints/checkpoint-{step}")
            assert verify(checkpoint, read_manifest(checkpoint, CHECKPOINT_MANIFEST)) == []
        manifest = read_manifest(run)
        assert verify(run, manifest) == [] and manifest.metadata["metrics"]["train"]["steps"] == STEPS


async def _async(value):
    return value


async def _at_least(steps, n: int) -> bool:
    found = await steps()
    return bool(found) and max(found) >= n


async def _status_is(status, **wanted) -> bool:
    current = await status()
    return all(current.get(k) == v for k, v in wanted.items())


async def _finished(status):
    current = await status()
    return current if current.get("phase") in ("Succeeded", "Failed") else None


async def test_bad_datasets_fail_at_once_with_the_line_and_publish_nothing(tmp_path, smollm2_dir):
    doc = yaml.safe_load(EXAMPLE.read_text())
    good = json.dumps(invoice_records(1)[0])
    datasets_content = {
        "malformed": f"{good}\n{good}\n{{\"prompt\": \"unterminated\n",
        "empty": "",
        "wrong-fields": json.dumps({"question": "q", "answer": "a"}) + "\n",
    }
    async with LocalStack(tmp_path / "stack") as stack:
        await asyncio.to_thread(import_model, smollm2_dir, "s3://models/smollm2", stack.storage)
        datasets = open_location("s3://datasets", storage=stack.storage, volume_root=tmp_path)
        datasets.ensure_ready()
        for name, text in datasets_content.items():
            datasets.put_bytes(f"{name}.jsonl", text.encode())
            job = {**doc, "metadata": {"name": f"bad-{name}", "namespace": "default"},
                   "spec": {**doc["spec"], "dataset": {**doc["spec"]["dataset"], "uri": f"s3://datasets/{name}.jsonl"}}}
            await stack.apply(job)

        async def all_failed():
            found = {}
            for name in datasets_content:
                body = await stack.client.get(path_for("kubetune.dev/v1alpha1", "finetunejobs", "default", f"bad-{name}"))
                if ((body or {}).get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                    found[name] = body["status"]
            return found if len(found) == len(datasets_content) else None
        statuses = await eventually(all_failed, 600, "every bad-dataset job to end")
        for name, status in statuses.items():
            assert status["phase"] == "Failed" and status["failures"] == 1, (name, status)  # no retry of bad data
            assert f"s3://datasets/{name}.jsonl" in status["message"], status["message"]
        assert "line 3" in statuses["malformed"]["message"]
        adapters = open_location("s3://adapters", storage=stack.storage, volume_root=tmp_path)
        assert not [o.rel for o in adapters.list() if o.rel.endswith("manifest.json")]
        events = [o.raw for (res, _, _), o in list(stack.api.objects.items()) if res.plural == "events" and not o.deleted]
        warned = {e["involvedObject"]["name"] for e in events if e.get("type") == "Warning"}
        assert warned >= {f"bad-{name}" for name in datasets_content}
