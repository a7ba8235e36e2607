"""FineTuneJob <-> fine_tuning.job, the catalog and paging: pure functions, no server."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from kubetune.api import FineTuneJob
from kubetune.openai_api import mapping
from kubetune.openai_api.catalog import CatalogEntry, lookup, parse_catalog
from kubetune.openai_api.errors import OpenAIError
from kubetune.openai_api.local import SAMPLE_ENTRY, SAMPLE_MODEL, catalog_configmap
from kubetune.openai_api.models import JobCreate

PLACEMENT = mapping.Placement(output_uri="s3://runs", storage_secret="store")
DATA = "s3://files/team-a/file-abc/data.jsonl"
HELD = "s3://files/team-a/file-val/data.jsonl"


def entry(**defaults) -> CatalogEntry:
    return CatalogEntry.model_validate({"baseModel": {"uri": "s3://models/smollm2", "revision": "a" * 64},
                                        "defaults": {"method": "lora", "resources": {"gpus": 0}, **defaults}})


def build(body: dict, file_format: str | None = None, validation_format: str | None = None, **defaults) -> dict:
    """The job for a request; a validation_file in the body names an upload of validation_format at HELD."""
    request = JobCreate.model_validate({"model": "smol", "training_file": "file-abc", **body})
    validation = (mapping.UploadedFile(request.validation_file, HELD, validation_format)
                  if request.validation_file else None)
    return mapping.build_job(request, entry(**defaults), "team-a", "ftjob-0123456789abcdef",
                             mapping.UploadedFile("file-abc", DATA, file_format), PLACEMENT, validation)


def test_request_becomes_a_valid_finetunejob():
    doc = build({"suffix": "invoices", "seed": 7,
                 "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 2}},
                training={"learningRate": 0.001, "maxSteps": 30})
    spec = doc["spec"]
    assert spec["baseModel"] == {"uri": "s3://models/smollm2", "revision": "a" * 64}
    assert spec["dataset"]["uri"] == DATA
    # An explicit epoch count replaces the catalog's step cap; the multiplier scales the catalog's rate.
    assert spec["training"] == {"learningRate": 0.002, "epochs": 3.0, "batchSize": 4, "seed": 7}
    assert spec["output"] == {"uri": "s3://runs", "adapterName": "ft-smol-invoices-89abcdef"}
    assert spec["storage"] == {"secretRef": {"name": "store"}}
    assert doc["metadata"]["namespace"] == "team-a"
    assert doc["metadata"]["annotations"][mapping.A_MODEL] == "smol"


def test_method_supervised_carries_the_hyperparameters():
    doc = build({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}})
    assert doc["spec"]["training"]["epochs"] == 2.0


@pytest.mark.parametrize("body, param, text", [
    ({"method": {"type": "reinforcement"}}, "method.type", "method 'reinforcement' is not available"),
    ({"hyperparameters": {"batch_size": 4}, "method": {"type": "supervised", "supervised": {}}},
     "hyperparameters", "not both"),
    # The FineTuneJob's own rule (microBatchSize <= batchSize) refuses it, named by the request's field.
    ({"hyperparameters": {"batch_size": 2}}, "hyperparameters.batch_size", "must not exceed batchSize"),
])
def test_requests_the_operator_would_refuse_are_400(body, param, text):
    with pytest.raises(OpenAIError) as caught:
        build(body, training={"microBatchSize": 8, "batchSize": 16})
    assert caught.value.status == 400 and caught.value.param == param and text in caught.value.message


def test_validation_file_is_the_hold_out_in_place_of_a_split():
    # The catalog's split (and its exact-match scoring of the hold-out) gives way to the file.
    doc = build({"validation_file": "file-val"}, "chat", "chat", dataset={"validationSplit": 0.15},
                evaluation={"exactMatch": True})
    assert doc["spec"]["dataset"] == {"uri": DATA, "validationUri": HELD, "validationSplit": 0.0}
    assert doc["metadata"]["annotations"][mapping.A_VALIDATION_FILE] == "file-val"
    assert FineTuneJob.model_validate(doc).spec.dataset.validation_uri == HELD
    assert mapping.job_object(doc).validation_file == "file-val"
    assert mapping.job_object(build({})).validation_file is None
    assert "validationUri" not in build({})["spec"]["dataset"]


@pytest.mark.parametrize("body, formats, text", [
    ({"validation_file": "file-val"}, ("chat", "prompt-completion"),
     "validation_file 'file-val' is a prompt-completion dataset but training_file 'file-abc' is chat; a validation "
     "file must have the training file's format"),
    ({"validation_file": "file-val", "method": {"type": "dpo"}}, ("preference", "chat"),
     "validation_file 'file-val' is a chat dataset; method dpo needs preference pairs"),
    ({"validation_file": "file-val"}, ("chat", "preference"),
     "validation_file 'file-val' holds preference pairs; use method dpo"),
])
def test_a_validation_file_that_does_not_fit_is_400(body, formats, text):
    with pytest.raises(OpenAIError) as caught:
        build(body, *formats)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, "validation_file",
                                                                            "invalid_validation_file")
    assert text in caught.value.message


def test_unknown_model_lists_the_known_ones():
    catalog = parse_catalog(catalog_configmap("ns", {SAMPLE_MODEL: SAMPLE_ENTRY, "other": SAMPLE_ENTRY}), "ns/c")
    with pytest.raises(OpenAIError) as caught:
        lookup(catalog, "gpt-4o-mini")
    assert caught.value.status == 400 and caught.value.param == "model"
    assert caught.value.message.endswith(f"known models: other, {SAMPLE_MODEL}")


@pytest.mark.parametrize("data, text", [
    (None, "does not exist"),
    ({"data": {}}, "has no key models.yaml"),
    ({"data": {"models.yaml": "smol: {baseModel: {uri: ftp://x}}"}}, "model smol: baseModel.uri"),
    ({"data": {"models.yaml": "[1, 2]"}}, "must map model names"),
])
def test_a_broken_catalog_is_503_naming_the_problem(data, text):
    with pytest.raises(OpenAIError) as caught:
        parse_catalog(data, "kubetune-system/models")
    assert caught.value.status == 503 and text in caught.value.message


def ftj(phase: str | None = None, conditions=(), annotations=None, **status) -> dict:
    body = {"metadata": {"name": "ftjob-1", "namespace": "team-a", "creationTimestamp": "2026-12-01T10:00:00Z",
                         "annotations": annotations or {}},
            "spec": {"baseModel": {"uri": "s3://m"}, "dataset": {"uri": DATA}, "training": {"epochs": 2.0}}}
    if phase:
        body["status"] = {"phase": phase, "conditions": [dict(zip(("type", "status", "reason"), c)) for c in conditions],
                          **status}
    return body


@pytest.mark.parametrize("job, expected", [
    (ftj(), "validating_files"),
    (ftj("Pending"), "validating_files"),
    (ftj("Pending", [("Validated", "True")]), "queued"),
    (ftj("Queued", [("Validated", "True")]), "queued"),
    (ftj("Running", [("Validated", "True")]), "running"),
    (ftj("Succeeded"), "succeeded"),
    (ftj("Failed"), "failed"),
    (ftj("Failed", [("Failed", "True", "Cancelled")], annotations={mapping.A_CANCELLED: "t"}), "cancelled"),
    (ftj("Failed", [("Failed", "True", "OutOfMemory")], annotations={mapping.A_CANCELLED: "t"}), "failed"),
    (ftj("Suspended", annotations={mapping.A_CANCELLED: "t"}), "cancelled"),
    (ftj("Running", annotations={mapping.A_CANCELLED: "t"}), "cancelled"),
    # A run that finished before the cancel took effect says what really happened.
    (ftj("Succeeded", annotations={mapping.A_CANCELLED: "t"}), "succeeded"),
])
def test_status_from_phase(job, expected):
    assert mapping.job_status(job) == expected


def test_job_object_fields():
    done = ftj("Succeeded", adapterRef={"name": "ft-smol-1", "uri": "s3://runs/x"},
               completionTime="2026-12-01T10:05:00Z", annotations={mapping.A_MODEL: "smol", mapping.A_FILE: "file-a",
                                                                   mapping.A_LR: "2.0", mapping.A_SUFFIX: "inv"})
    job = mapping.job_object(done, trained_tokens=1234)
    assert (job.id, job.status, job.model, job.training_file, job.fine_tuned_model) == (
        "ftjob-1", "succeeded", "smol", "file-a", "ft-smol-1")
    created = int(datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc).timestamp())
    assert (job.created_at, job.finished_at, job.trained_tokens) == (created, created + 300, 1234)
    assert job.hyperparameters.model_dump() == {"n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 2.0}
    assert job.result_files == ["file-result-ftjob-1"] and job.user_provided_suffix == "inv"
    failed = mapping.job_object(ftj("Failed", [("Failed", "True")], message="line 3: bad"))
    assert failed.error is not None and failed.error.message == "line 3: bad" and failed.fine_tuned_model is None


def test_events_newest_first_with_progress_as_metrics():
    job = ftj("Running", progress={"step": 3, "totalSteps": 6, "loss": 1.5, "updatedAt": "2026-12-01T10:02:00Z"})
    kube = [{"metadata": {"name": "e1", "uid": "u1"}, "type": "Normal", "reason": "JobCreated", "message": "created",
             "involvedObject": {"kind": "FineTuneJob", "name": "ftjob-1"}, "lastTimestamp": "2026-12-01T10:01:00Z"},
            {"metadata": {"name": "e2", "uid": "u2"}, "type": "Warning", "reason": "X", "message": "other job",
             "involvedObject": {"kind": "FineTuneJob", "name": "ftjob-2"}, "lastTimestamp": "2026-12-01T10:01:00Z"}]
    events = mapping.events_of(job, kube)
    assert [e.message for e in events] == ["Step 3/6: training loss=1.5000", "JobCreated: created"]
    assert events[0].type == "metrics" and events[0].data["train_loss"] == 1.5


def test_a_finished_job_has_its_outcome_as_an_event_from_its_status():
    done = ftj("Succeeded", [("Complete", "True")], completionTime="2026-12-01T10:05:00Z")
    failed = ftj("Failed", [("Failed", "True")], message="line 3: bad", completionTime="2026-12-01T10:05:00Z")
    events = {name: mapping.events_of(job, []) for name, job in (("done", done), ("failed", failed))}
    assert [(e.message, e.level) for e in events["done"]] == [("The job has successfully completed", "info")]
    assert [(e.message, e.level) for e in events["failed"]] == [("The job failed: line 3: bad", "error")]
    assert mapping.events_of(ftj("Running", []), []) == []  # no outcome before it has one


def test_paging_follows_after():
    items = list("abcde")
    assert mapping.paginate(items, str, None, 2) == (["a", "b"], True)
    assert mapping.paginate(items, str, "b", 2) == (["c", "d"], True)
    assert mapping.paginate(items, str, "d", 2) == (["e"], False)
    with pytest.raises(OpenAIError):
        mapping.paginate(items, str, "zz", 2)
