"""End to end on the local stack: API server, S3 server, the operator and the executor running the
real trainer on SmolLM2-135M. A FineTuneJob is applied; the test waits for the FineTuneJob to
succeed and its LoraAdapter to be verified and merged (by its merge Job, not the training pod), then
checks the published artifacts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from kubetune.controller.adapters import adapter_path
from kubetune.controller.kube import path_for
from kubetune.local.stack import LocalStack
from kubetune.storage.location import open_location
from kubetune.storage.manifest import read_manifest, verify
from kubetune.storage.models import import_model
from kubetune_trainer.samples import invoice_records
from tests.support import eventually

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "local" / "finetunejob.yaml"



async def test_apply_to_verified_adapter(tmp_path, smollm2_dir, caplog):
    doc = yaml.safe_load(EXAMPLE.read_text())
    # The CI-sized variant of the README's demo: fewer steps and generations.
    doc["spec"]["training"]["maxSteps"] = 6
    doc["spec"]["checkpointEverySteps"] = 3
    doc["spec"]["evaluation"]["maxSamples"] = 4
    async with LocalStack(tmp_path / "stack") as stack:
        await asyncio.to_thread(import_model, smollm2_dir, "s3://models/smollm2", stack.storage)
        datasets = open_location("s3://datasets", storage=stack.storage, volume_root=tmp_path)
        datasets.ensure_ready()
        datasets.put_bytes("invoices.jsonl", "".join(json.dumps(r) + "\n" for r in invoice_records(60)).encode())
        await stack.apply(doc)
        ftj_path = path_for("kubetune.dev/v1alpha1", "finetunejobs", "default", doc["metadata"]["name"])
        seen_progress = []

        async def finished():
            status = ((await stack.client.get(ftj_path)) or {}).get("status") or {}
            if (status.get("progress") or {}).get("step"):
                seen_progress.append(status["progress"]["step"])
            return status if status.get("phase") in ("Succeeded", "Failed") else None
        status = await eventually(finished, 900, "the FineTuneJob to finish")
        assert status["phase"] == "Succeeded", status.get("message")
        assert seen_progress, "status.progress was never mirrored while training"
        assert next(c for c in status["conditions"] if c["type"] == "Complete")["status"] == "True"

        name = status["adapterRef"]["name"]

        async def adapter_settled():
            body = (await stack.client.get(adapter_path("default", name))) or {}
            return body if (body.get("status") or {}).get("phase") in ("Ready", "Failed") else None
        adapter = await eventually(adapter_settled, 300, "the LoraAdapter to settle")
        assert adapter["status"]["phase"] == "Ready", adapter["status"].get("message")
        verified = next(c for c in adapter["status"]["conditions"] if c["type"] == "Verified")
        assert verified["status"] == "True"

        async def content_verified():
            # Ready on the operator's listing check; the verification Job (run by the local stack
            # like any Job) hashes the content and reports through its termination message.
            body = (await stack.client.get(adapter_path("default", name))) or {}
            return next((c for c in (body.get("status") or {}).get("conditions") or []
                         if c["type"] == "Verified" and c["reason"] == "ContentVerified"), None)
        verified = await eventually(content_verified, 180, "the verification Job's report")
        assert verified["status"] == "True" and "match their sha256" in verified["message"]
        assert adapter["status"]["lineage"]["fineTuneJob"] == "default/invoices-local"
        assert adapter["metadata"]["labels"]["kubetune.dev/stage"] == "candidate"

        location = open_location(adapter["spec"]["artifact"]["uri"], storage=stack.storage, volume_root=tmp_path)
        manifest = read_manifest(location)
        assert verify(location, manifest) == []
        assert "adapter/adapter_model.safetensors" in {f.path for f in manifest.files}
        # output.merge: the training pod published the adapter only; the adapter's merge Job the rest.
        assert not any(f.path.startswith("merged/") for f in manifest.files)
        assert (adapter["spec"]["merge"]["enabled"], adapter["spec"]["merge"]["dtype"]) == (True, "float32")
        assert adapter["status"]["mergedModelUri"] == f"{adapter['spec']['artifact']['uri']}/merged"
        merged = location.child("merged")
        assert verify(merged, read_manifest(merged)) == []
        assert "model.safetensors" in {f.path for f in read_manifest(merged).files}
        metrics = manifest.metadata["metrics"]
        assert metrics["final"]["evalLoss"] < metrics["baseline"]["evalLoss"]
        assert adapter["status"]["metrics"]["evalLoss"] == pytest.approx(metrics["final"]["evalLoss"])

        # The storage credential reached the trainer only as environment from the Secret: it is in no
        # object the operator or the trainer wrote (status, events, ConfigMaps, Jobs, pods) and in no log.
        secret = stack.storage.secret_key
        written = json.dumps([o.raw for (res, _, _), o in list(stack.api.objects.items())
                              if res.plural != "secrets" and not o.deleted])
        assert secret not in written
        logs = [f.read_text(errors="replace") for f in (tmp_path / "stack" / "pods").rglob("*.log")]
        assert logs and not any(secret in text for text in logs)
        assert secret not in caplog.text
