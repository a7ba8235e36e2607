"""The official `openai` client drives a real fine-tune on the local stack: upload the invoice
dataset and a validation file, create a job, follow its events until it succeeds (a real CPU LoRA
run of SmolLM2, evaluated on the validation file), read fine_tuned_model, the checkpoints and the
result file; cancel a second, running job; and see a bad upload refused with the trainer's own message."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from pathlib import Path

import openai
import pytest

from kubetune.api import API_VERSION
from kubetune.api.finetunejob import Dataset, Training
from kubetune.controller.adapters import adapter_path
from kubetune.controller.jobs import LABEL_JOB
from kubetune.controller.kube import path_for
from kubetune.local.stack import LocalStack
from kubetune.openai_api.local import SAMPLE_ENTRY, SAMPLE_MODEL
from kubetune.storage.location import open_location
from kubetune.storage.manifest import read_manifest
from kubetune.storage.models import import_model
from kubetune_trainer.data import prepare
from kubetune_trainer.records import DatasetError
from kubetune_trainer.samples import invoice_records
from tests.openai_api.conftest import api_server, openai_client
from tests.support import eventually

pytestmark = pytest.mark.slow


def catalog() -> dict:
    """The sample model, sized for CI: 4 steps, a checkpoint every 2."""
    entry = copy.deepcopy(SAMPLE_ENTRY)
    entry["defaults"]["training"]["maxSteps"] = 4
    entry["defaults"]["checkpointEverySteps"] = 2
    return {SAMPLE_MODEL: entry}


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


async def test_openai_client_fine_tunes_on_the_local_stack(tmp_path, smollm2_dir, tokenizer):
    async with LocalStack(tmp_path / "stack") as stack, api_server(stack, catalog()) as (service, port):
        await asyncio.to_thread(import_model, smollm2_dir, "s3://models/smollm2", stack.storage)
        client = openai_client(port)

        # A bad upload: refused with the message the trainer gives for the same file.
        records = invoice_records(30)
        bad = copy.deepcopy(records)
        del bad[2]["completion"]
        bad_file = tmp_path / "invoices.jsonl"
        bad_file.write_bytes(jsonl(bad))
        with pytest.raises(DatasetError) as trainer_says:
            prepare(bad_file, "invoices.jsonl", Dataset(uri="s3://datasets/invoices.jsonl"), Training(), tokenizer)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.files.create(file=("invoices.jsonl", bad_file.read_bytes()), purpose="fine-tune")
        assert refused.value.body["message"] == str(trainer_says.value)
        assert "line 3" in refused.value.body["message"]

        data = jsonl(records)
        file = await client.files.create(file=("invoices.jsonl", data), purpose="fine-tune")
        assert (await client.files.retrieve(file.id)).bytes == len(data)
        assert (await client.files.content(file.id)).content == data
        assert [f.id for f in (await client.files.list()).data] == [file.id]

        held_out = jsonl(invoice_records(6, seed=7))
        held = await client.files.create(file=("holdout.jsonl", held_out), purpose="fine-tune")
        job = await client.fine_tuning.jobs.create(model=SAMPLE_MODEL, training_file=file.id, suffix="invoices",
                                                   validation_file=held.id, seed=3, hyperparameters={"batch_size": 2})
        assert job.status == "validating_files" and job.model == SAMPLE_MODEL and job.training_file == file.id
        assert job.validation_file == held.id
        # The FineTuneJob evaluates on the validation file instead of the catalog's split of the training file.
        ftj = await stack.client.get(path_for(API_VERSION, "finetunejobs", "default", job.id))
        assert ftj["spec"]["dataset"] == {**ftj["spec"]["dataset"], "validationSplit": 0,
                                          "validationUri": service.files.content_uri("default", held.id, ".jsonl")}
        seen: dict[str, str] = {}

        async def finished():
            async for event in client.fine_tuning.jobs.list_events(job.id, limit=5):  # pages through them all
                seen[event.id] = event.message
            current = await client.fine_tuning.jobs.retrieve(job.id)
            return current if current.status in ("succeeded", "failed", "cancelled") else None
        done = await eventually(finished, 1800, "the job to finish", interval=2)
        assert done.status == "succeeded", done.error
        await finished()  # the events as of the finished job
        messages = list(seen.values())
        assert any(m.startswith("Step ") and "training loss=" in m for m in messages), messages
        assert "The job has successfully completed" in messages, messages
        assert any(m.startswith("JobCreated: ") for m in messages), messages

        adapter = await stack.client.get(adapter_path("default", done.fine_tuned_model))
        assert adapter is not None and adapter["metadata"]["labels"][LABEL_JOB] == job.id
        assert done.validation_file == held.id
        run = (await asyncio.to_thread(read_manifest, open_location(
            adapter["spec"]["artifact"]["uri"], storage=stack.storage, volume_root=Path("/")))).metadata
        # Trained on the whole training file, evaluated on exactly the validation file's records.
        assert (run["data"]["records"], run["data"]["validation"]) == (len(records), 6)
        assert run["lineage"]["validationDatasetSha256"] == hashlib.sha256(held_out).hexdigest()

        async def adapter_lineage():
            found = await stack.client.get(adapter_path("default", done.fine_tuned_model))
            return ((found or {}).get("status") or {}).get("lineage")
        lineage = await eventually(adapter_lineage, 120, "the adapter to be verified", interval=0.5)
        assert (lineage["validationDatasetUri"], lineage["validationDatasetSha256"]) == (
            run["lineage"]["validationDatasetUri"], run["lineage"]["validationDatasetSha256"])
        assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at
        # The result file is the run's history, one JSON line per step (OpenAI's is a per-step CSV).
        content = (await client.files.content(done.result_files[0])).content
        history = [json.loads(line) for line in content.decode().splitlines()]
        assert [row["step"] for row in history] == [1, 2, 3, 4]
        assert history[-1]["loss"] < history[0]["loss"] and "evalLoss" in history[-1], history

        checkpoints = (await client.fine_tuning.jobs.checkpoints.list(job.id)).data
        assert [c.step_number for c in checkpoints] == [4, 2]
        assert all(c.fine_tuning_job_id == job.id for c in checkpoints)
        assert [j.id for j in (await client.fine_tuning.jobs.list()).data] == [job.id]

        # A second job, cancelled while it runs: its pods stop, then the operator fails it as Cancelled.
        second = await client.fine_tuning.jobs.create(model=SAMPLE_MODEL, training_file=file.id,
                                                      validation_file=held.id)

        async def running():
            return (await client.fine_tuning.jobs.retrieve(second.id)).status == "running"
        await eventually(running, 300, "the second job to run", interval=0.5)
        for used in (file, held):  # its training and validation files are still read by a running job
            with pytest.raises(openai.ConflictError) as in_use:
                await client.files.delete(used.id)
            assert second.id in in_use.value.body["message"]
        cancelled = await client.fine_tuning.jobs.cancel(second.id)
        assert cancelled.status == "cancelled"
        ftj_path = path_for(API_VERSION, "finetunejobs", "default", second.id)

        async def failed_as_cancelled():
            status = ((await stack.client.get(ftj_path)) or {}).get("status", {})
            failed = next((c for c in status.get("conditions", []) if c["type"] == "Failed"), {})
            return status.get("phase") == "Failed" and failed.get("reason") == "Cancelled"
        await eventually(failed_as_cancelled, 600, "the cancelled job's pods to stop and the job to fail as Cancelled",
                         interval=0.5)
        assert (await client.fine_tuning.jobs.retrieve(second.id)).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            await client.fine_tuning.jobs.cancel(second.id)
        page = await client.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in page.data] == [second.id] and page.has_more
        assert [j.id for j in (await client.fine_tuning.jobs.list(after=second.id)).data] == [job.id]
        assert (await client.files.delete(file.id)).deleted and (await client.files.delete(held.id)).deleted
        assert (await client.files.list()).data == []
