"""Data safety under adversarial use (issue 26), through the operator over HTTP: Kopf against the API
emulator and a real S3 server, as in test_operator.py. Each test reproduces a case that lost data,
served a stale adapter or left a job without a status."""

from __future__ import annotations

import asyncio
import json

import pytest

from kubetune.local.apiserver import ApiServer
from kubetune.storage.manifest import Manifest, describe_dir, publish
from tests.controller.test_operator import (ADAPTERS, FTJ, NS, _events, adapter_condition, adapter_doc,
                                            adapter_status, apply, condition, job_doc, job_status, obj,
                                            objects_of, pod, published_run, run_verify_job, running_operator,
                                            secret_doc, status)
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=ApiServer)
ADAPTERS_PATH = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/loraadapters"
FTJ_PATH = f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs"


def keys(bucket) -> set[str]:
    return {o.rel for o in bucket.list()}


async def _with_secret(cluster, s3_server) -> None:
    await cluster.post(f"/api/v1/namespaces/{NS}/secrets", json=secret_doc(s3_server.config))


async def _delete_adapter(cluster, name: str) -> None:
    await cluster.delete(f"{ADAPTERS_PATH}/{name}")
    await eventually(lambda: obj(cluster, ADAPTERS, name) is None, timeout=20, what=f"{name} deleted")


# 1. deletionPolicy: Delete removes only what the adapter's own verified run manifest lists.

async def test_a_bucket_root_artifact_is_refused_and_its_deletion_removes_nothing(cluster, s3_bucket, s3_server,
                                                                                   tmp_path):
    published_run(tmp_path / "a", s3_bucket.child("run-a"), eval_loss=0.4)
    published_run(tmp_path / "b", s3_bucket.child("run-b"), eval_loss=0.5)
    before = keys(s3_bucket)
    await _with_secret(cluster, s3_server)
    async with running_operator():
        await cluster.post(ADAPTERS_PATH, json=adapter_doc(s3_bucket.bucket, artifact={
            "uri": f"s3://{s3_bucket.bucket}"}, deletionPolicy="Delete"))
        await eventually(lambda: adapter_status(cluster).get("phase") == "Failed", timeout=20, what="Failed")
        assert "spec.artifact.uri" in adapter_status(cluster)["message"]
        await _delete_adapter(cluster, "invoices-v1")
    assert keys(s3_bucket) == before


async def test_a_model_copy_is_no_artifact_and_its_deletion_removes_nothing(cluster, s3_bucket, s3_server, tmp_path):
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    publish(s3_bucket.child("smollm2"), Manifest("ModelManifest", describe_dir(model)), model)
    before = keys(s3_bucket)
    await _with_secret(cluster, s3_server)
    async with running_operator():
        await cluster.post(ADAPTERS_PATH, json=adapter_doc(s3_bucket.bucket, artifact={
            "uri": f"s3://{s3_bucket.bucket}/smollm2"}, deletionPolicy="Delete"))
        await eventually(lambda: adapter_status(cluster).get("phase") == "Failed", timeout=20, what="Failed")
        verified = adapter_condition(cluster, "Verified")
        assert (verified["status"], verified["reason"]) == ("False", "NotARunManifest")
        assert "ModelManifest" in verified["message"]
        await _delete_adapter(cluster, "invoices-v1")
    assert keys(s3_bucket) == before


async def test_delete_removes_exactly_what_the_verified_manifest_lists(cluster, s3_bucket, s3_server, tmp_path):
    published_run(tmp_path, s3_bucket.child("run"), eval_loss=0.4)
    s3_bucket.put_bytes("run/checkpoints/step-10/state.bin", b"not listed")  # under the prefix, not the adapter's
    s3_bucket.put_bytes("run-2/manifest.json", b"{}")  # shares the prefix string, not the prefix
    await _with_secret(cluster, s3_server)
    async with running_operator():
        await cluster.post(ADAPTERS_PATH, json=adapter_doc(s3_bucket.bucket, deletionPolicy="Delete"))
        await eventually(lambda: adapter_status(cluster).get("phase") == "Ready", timeout=20, what="Ready")
        await _delete_adapter(cluster, "invoices-v1")
        await eventually(lambda: any(o.get("reason") == "ArtifactsDeleted" for _, o in _events(cluster)),
                         what="ArtifactsDeleted event")
    assert keys(s3_bucket) == {"run/checkpoints/step-10/state.bin", "run-2/manifest.json"}


async def test_a_manifest_replaced_after_verification_deletes_nothing(cluster, s3_bucket, s3_server, tmp_path):
    published_run(tmp_path, s3_bucket.child("run"), eval_loss=0.4)
    await _with_secret(cluster, s3_server)
    async with running_operator():
        await cluster.post(ADAPTERS_PATH, json=adapter_doc(s3_bucket.bucket, deletionPolicy="Delete"))
        await eventually(lambda: adapter_status(cluster).get("phase") == "Ready", timeout=20, what="Ready")
        forged = Manifest("RunManifest", [])  # what someone else's run now claims to be at this prefix
        s3_bucket.put_bytes("run/manifest.json", forged.to_json())
        before = keys(s3_bucket)
        await _delete_adapter(cluster, "invoices-v1")
        await eventually(lambda: any(o.get("reason") == "ArtifactsRetained" and o.get("type") == "Warning"
                                     for _, o in _events(cluster)), what="ArtifactsRetained warning")
    assert keys(s3_bucket) == before


# 2. A re-run, or a second job with the same adapter name, registers a new version.

async def _run_to_success(cluster, name: str, sha: str, **spec) -> dict:
    await apply(cluster, job_doc(name, **spec))
    await eventually(lambda: obj(cluster, "batch/v1/jobs", f"{name}-train"), what=f"{name}'s Job")
    await pod(cluster, f"{name}-p", "Succeeded", ftj=name, exit_code=0, message={"manifestSha256": sha})
    await job_status(cluster, f"{name}-train", Complete="True")
    return await eventually(lambda: status(cluster, name).get("adapterRef"), what=f"{name}'s adapterRef")


async def test_a_rerun_registers_a_new_adapter_version(cluster):
    async with running_operator():
        first = await _run_to_success(cluster, "x", "a" * 64)
        assert first["name"] == "x"
        await cluster.delete(f"{FTJ_PATH}/x")
        await eventually(lambda: obj(cluster, FTJ, "x") is None, timeout=30, what="x deleted")
        second = await _run_to_success(cluster, "x", "b" * 64, training={"maxSteps": 5})
        assert second["name"] == "x-v2" and second["uri"] != first["uri"]
        v2 = obj(cluster, ADAPTERS, "x-v2")
        assert (v2["spec"]["version"], v2["spec"]["adapterName"]) == (2, "x")
        assert (v2["spec"]["artifact"]["uri"], v2["spec"]["artifact"]["manifestSha256"]) == (second["uri"], "b" * 64)
        v1 = obj(cluster, ADAPTERS, "x")  # the first version is untouched
        assert (v1["spec"]["artifact"]["uri"], v1["spec"]["artifact"]["manifestSha256"]) == (first["uri"], "a" * 64)
        await eventually(lambda: any(o.get("reason") == "AdapterVersionCreated" and "version 2" in o.get("message", "")
                                     for _, o in _events(cluster)), what="AdapterVersionCreated event")


async def test_jobs_sharing_an_adapter_name_each_get_a_version(cluster):
    async with running_operator():
        output = {"uri": "pvc://runs/out", "adapterName": "shared"}
        refs = [await _run_to_success(cluster, name, sha * 64, output=output) for name, sha in (("one", "a"), ("two", "b"))]
    assert [r["name"] for r in refs] == ["shared", "shared-v2"]
    adapters = objects_of(cluster, ADAPTERS)
    assert {n: (a["spec"]["version"], a["spec"]["artifact"]["uri"]) for n, a in adapters.items()} == {
        "shared": (1, refs[0]["uri"]), "shared-v2": (2, refs[1]["uri"])}


# 3. Edits before any pod ran are applied; after a refused edit the run is still observed.

def _run_spec(cluster, name="job") -> dict:
    return json.loads(obj(cluster, "v1/configmaps", f"{name}-spec")["data"]["runspec.json"])["spec"]


async def test_an_edit_before_the_first_pod_ran_is_applied(cluster):
    async with running_operator():
        await apply(cluster, job_doc(suspend=True))
        first = await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train"), what="the Job")
        assert first["spec"]["suspend"] is True
        await cluster.patch(f"{FTJ_PATH}/job", json={"spec": {"training": {"learningRate": 0.001}}})
        await eventually(lambda: (obj(cluster, "v1/configmaps", "job-spec") or {}).get("data")
                         and _run_spec(cluster)["training"]["learningRate"] == 0.001, what="the new run spec")
        job = await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train"), what="the Job again")
        assert job["metadata"]["uid"] != first["metadata"]["uid"]
        await cluster.patch(f"{FTJ_PATH}/job", json={"spec": {"suspend": False}})
        await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train")["spec"]["suspend"] is False, what="resumed")
        await pod(cluster, "p1", "Succeeded", exit_code=0, message={"manifestSha256": "a" * 64})
        await job_status(cluster, Complete="True")
        await eventually(lambda: status(cluster).get("phase") == "Succeeded", what="Succeeded")
        assert condition(cluster, "Validated")["status"] == "True"
        assert obj(cluster, ADAPTERS, "job")


async def test_after_a_refused_edit_the_run_is_still_observed(cluster):
    async with running_operator():
        await apply(cluster, job_doc())
        await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train"), what="the Job")
        await pod(cluster, "p1", "Running", progress={"step": 1, "totalSteps": 100})
        await eventually(lambda: status(cluster).get("startTime"), what="started")
        await cluster.patch(f"{FTJ_PATH}/job", json={"spec": {"training": {"learningRate": 0.001},
                                                               "output": {"uri": "pvc://runs/elsewhere"}}})
        await eventually(lambda: condition(cluster, "Validated").get("reason") == "ImmutableFieldChanged",
                         what="refused change")
        for step in (20, 40, 60):
            await pod(cluster, "p1", "Running", progress={"step": step, "totalSteps": 100})
        await eventually(lambda: (status(cluster).get("progress") or {}).get("step") == 60, what="progress")
        await cluster.patch(f"{FTJ_PATH}/job", json={"spec": {"suspend": True}})
        await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train")["spec"]["suspend"] is True, what="suspend")
        await cluster.patch(f"{FTJ_PATH}/job", json={"spec": {"suspend": False}})
        await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train")["spec"]["suspend"] is False, what="resume")
        await pod(cluster, "p1", "Succeeded", exit_code=0, message={"manifestSha256": "a" * 64})
        await job_status(cluster, Complete="True")
        await eventually(lambda: status(cluster).get("phase") == "Succeeded", what="Succeeded")
        adapter = await eventually(lambda: obj(cluster, ADAPTERS, "job"), what="the adapter")
        assert adapter["spec"]["artifact"]["uri"].startswith("pvc://runs/job/")  # the output it ran with
        warnings = [o for _, o in _events(cluster) if o.get("reason") == "ImmutableFieldChanged"]
        assert len(warnings) == 1  # once for the refused generation, not once per pod event


# 4. The per-namespace limit holds for jobs applied together.

async def test_the_namespace_limit_holds_for_many_jobs_applied_at_once(cluster, monkeypatch):
    monkeypatch.setenv("KUBETUNE_MAX_RUNNING_PER_NAMESPACE", "2")
    names = [f"j{i:02d}" for i in range(20)]
    async with running_operator():
        await asyncio.gather(*(apply(cluster, job_doc(n)) for n in names))
        await eventually(lambda: all(status(cluster, n).get("phase") in ("Pending", "Queued") for n in names),
                         timeout=60, what="every job Pending or Queued")
        assert len(objects_of(cluster, "batch/v1/jobs")) == 2
        assert sum(status(cluster, n)["phase"] == "Queued" for n in names) == 18


# 6. A failed verification demotes; periodic re-verification notices tampering; a tighter gate demotes.

async def _production_adapter(cluster, s3_bucket, s3_server, tmp_path) -> None:
    published_run(tmp_path, s3_bucket.child("run"), eval_loss=0.4)
    await _with_secret(cluster, s3_server)
    await cluster.post(ADAPTERS_PATH, json=adapter_doc(s3_bucket.bucket, stage="production",
                                                       evaluationGate=[{"metric": "evalLoss", "max": 0.5}]))
    await run_verify_job(cluster, s3_server)
    await eventually(lambda: adapter_status(cluster).get("stage") == "production"
                     and (obj(cluster, ADAPTERS, "invoices-v1")["metadata"].get("labels") or {})
                     .get("kubetune.dev/stage") == "production", timeout=20, what="production")


async def test_a_tampered_production_adapter_is_noticed_and_demoted(cluster, s3_bucket, s3_server, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("KUBETUNE_REVERIFY_SECONDS", "1")
    async with running_operator():
        await _production_adapter(cluster, s3_bucket, s3_server, tmp_path)
        s3_bucket.put_bytes("run/adapter/adapter_model.safetensors", bytes(reversed(range(256))) * 64)
        # The new listing (same sizes, another ETag) is not what was hashed: out of production at once,
        # and a verification Job for the new objects.
        await eventually(lambda: adapter_status(cluster).get("stage") == "candidate", timeout=30, what="noticed")
        await run_verify_job(cluster, s3_server)
        await eventually(lambda: adapter_status(cluster).get("phase") == "Failed", timeout=30, what="mismatch")
        verified = adapter_condition(cluster, "Verified")
        assert (verified["status"], verified["reason"]) == ("False", "ChecksumMismatch")
        assert adapter_status(cluster).get("stage") != "production"
        labels = obj(cluster, ADAPTERS, "invoices-v1")["metadata"].get("labels") or {}
        assert labels.get("kubetune.dev/stage") != "production"
        await eventually(lambda: any(o.get("reason") == "Demoted" and o.get("type") == "Warning"
                                     for _, o in _events(cluster)), what="Demoted warning")


async def test_tightening_the_gate_after_promotion_demotes(cluster, s3_bucket, s3_server, tmp_path):
    async with running_operator():
        await _production_adapter(cluster, s3_bucket, s3_server, tmp_path)
        await cluster.patch(f"{ADAPTERS_PATH}/invoices-v1", json={"spec": {"evaluationGate": [
            {"metric": "evalLoss", "max": 0.3}]}})
        await eventually(lambda: adapter_status(cluster).get("stage") == "candidate", what="demoted")
        assert obj(cluster, ADAPTERS, "invoices-v1")["metadata"]["labels"]["kubetune.dev/stage"] == "candidate"
        promoted = adapter_condition(cluster, "Promoted")
        assert (promoted["status"], promoted["reason"]) == ("False", "GateBlocked")


# 7. A spec with thousands of problems still gets a status, capped.

async def test_thousands_of_problems_give_a_capped_status(cluster):
    selector = {f"key-{i}": i for i in range(10_000)}
    async with running_operator():
        await apply(cluster, job_doc(resources={"nodeSelector": selector}))
        await eventually(lambda: status(cluster).get("phase") == "Failed", timeout=30, what="Failed")
    message = status(cluster)["message"]
    assert len(message) <= 32768 and message.startswith("spec.resources.nodeSelector.key-0: input should be")
    assert message.endswith("problem(s) not shown")
    assert condition(cluster, "Validated")["message"] == message


# 8. Deep nesting is refused with a clear message.

async def test_a_deeply_nested_affinity_is_refused(cluster):
    affinity: dict = {}
    for _ in range(10_000):  # the deepest JSON the API server accepts
        affinity = {"x": affinity}
    doc = job_doc()
    doc["spec"]["resources"] = {"affinity": affinity}  # set, not merged: a deep copy of it would not survive
    async with running_operator():
        await apply(cluster, doc)
        await eventually(lambda: status(cluster).get("phase") == "Failed", timeout=30, what="Failed")
    assert "spec.resources.affinity: nested deeper than" in status(cluster)["message"]
    assert obj(cluster, "batch/v1/jobs", "job-train") is None
