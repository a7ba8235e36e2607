"""A `pvc://` dataset on the local stack: the README's way to bring your own data without S3 (a
file in the claim's directory) trains, since the trainer's volume root (the parent of every
claim's mount) is there for it as in a pod."""

from __future__ import annotations

import pytest

from kubetune.local.stack import LocalStack
from tests.local.runs import finished, load_inputs, records_jsonl, short_job

pytestmark = pytest.mark.slow


async def test_trains_from_a_pvc_dataset(tmp_path, smollm2_dir):
    async with LocalStack(tmp_path / "stack") as stack:
        await load_inputs(stack, smollm2_dir, tmp_path)
        (await stack.claim("data") / "invoices.jsonl").write_bytes(records_jsonl())
        job = short_job("from-pvc")
        job["spec"]["dataset"]["uri"] = "pvc://data/invoices.jsonl"
        await stack.apply(job)
        status = await finished(stack, "default", "from-pvc")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["adapterRef"]["uri"].startswith("s3://adapters/invoices/from-pvc-")
