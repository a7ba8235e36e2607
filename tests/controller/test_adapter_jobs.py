"""The verification Job a LoraAdapter runs, as pure decisions: what the builder asks for, and how a
finished Job's pods become a report."""

from __future__ import annotations

import json

from kubetune.api import LoraAdapter
from kubetune.controller.adapters import content_report
from kubetune.controller.merging import build_merge_objects, build_verify_objects, verify_job_name
from kubetune.controller.settings import OperatorSettings
from kubetune.serving.publication import merged_ollama
from kubetune_trainer.merge_job import MergeSpec

SETTINGS = OperatorSettings(trainer_image="registry.local/kubetune/trainer:0.1.0")
ADAPTER = LoraAdapter.model_validate({
    "apiVersion": "kubetune.dev/v1alpha1", "kind": "LoraAdapter",
    "metadata": {"name": "invoices-v1", "namespace": "team-a", "uid": "u-1"},
    "spec": {"baseModel": {"uri": "s3://models/base"}, "artifact": {"uri": "s3://adapters/run"},
             "storage": {"secretRef": {"name": "s3"}}, "merge": {"enabled": True, "gpus": 1}}})


def test_the_verification_job_is_cpu_only_small_and_owned_by_its_adapter():
    configmap, job = build_verify_objects(ADAPTER, SETTINGS, "a" * 64, "f" * 64)
    name = verify_job_name("invoices-v1", "f" * 64)
    assert job["metadata"]["name"] == configmap["metadata"]["name"] == name == "invoices-v1-verify-ffffffff"
    assert job["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "LoraAdapter", "name": "invoices-v1", "uid": "u-1",
        "controller": True, "blockOwnerDeletion": True}
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["verify-job", "--spec", "/etc/kubetune/runspec.json"]
    assert container["resources"] == {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert json.loads(configmap["data"]["runspec.json"]) == {
        "artifactUri": "s3://adapters/run", "manifestSha256": "a" * 64, "fingerprint": "f" * 64}
    assert {"name": "KUBETUNE_S3_SECRET_KEY", "valueFrom": {"secretKeyRef": {
        "name": "s3", "key": "secretKey", "optional": False}}} in container["env"]
    # Built from the same pieces as the merge Job, which alone asks for the GPU.
    _, merge = build_merge_objects(ADAPTER, SETTINGS)
    assert merge["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "kubetune-verify"
    assert merge["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "kubetune-merge"
    # Another artifact state, another Job: a restarted operator adopts the one by name.
    assert verify_job_name("invoices-v1", "e" * 64) != name


def test_the_merge_job_is_told_the_gguf_types_and_the_adapters_name():
    configmap, _ = build_merge_objects(ADAPTER, SETTINGS)
    assert "gguf" not in json.loads(configmap["data"]["runspec.json"])
    asked = ADAPTER.model_copy(update={"spec": ADAPTER.spec.model_copy(update={
        "adapter_name": "invoices", "merge": ADAPTER.spec.merge.model_copy(update={"gguf": ["q8_0", "q4_k_m"]})})})
    configmap, _ = build_merge_objects(asked, SETTINGS)
    spec = json.loads(configmap["data"]["runspec.json"])
    assert (spec["gguf"], spec["name"]) == (["q8_0", "q4_k_m"], "invoices")
    assert MergeSpec.model_validate(spec).gguf == ["q8_0", "q4_k_m"]  # what the trainer image reads


def test_ollama_hint_for_gguf_a_merge_job_wrote():
    assert merged_ollama("invoices", "s3://adapters/run", None) is None
    assert merged_ollama("invoices", "s3://adapters/run", {"error": "architecture GPT2 is not supported"}) is None
    assert merged_ollama("invoices", "s3://adapters/run", {"models": {"q8_0": "model-q8_0.gguf"}}) == {
        "modelfile": "/models/invoices/merged/gguf/Modelfile",
        "copy": ["kubetune adapters pull s3://adapters/run /models/invoices --only merged"],
        "command": "ollama create invoices -f /models/invoices/merged/gguf/Modelfile"}


def _pod(message: dict | None, exit_code: int = 0, reason: str = "Completed") -> dict:
    return {"status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {
        "exitCode": exit_code, "reason": reason, "message": json.dumps(message) if message else ""}}}]}}


def _job(*finished: str) -> dict:
    return {"status": {"conditions": [{"type": t, "status": "True"} for t in finished]}}


def test_a_finished_jobs_report_comes_from_its_pods_termination_message():
    report = {"fingerprint": "f" * 64, "files": 2, "bytes": 10, "problems": "adapter/x: sha256 mismatch"}
    assert content_report(_job(), [_pod(None)]) is None  # still running
    assert content_report(_job("Complete"), [_pod(report)]) == report
    assert content_report(_job("Complete"), [])["failed"][0] == "VerifyReportMissing"
    error = {"error": {"reason": "StorageUnavailable", "message": "s3 unreachable"}}
    assert content_report(_job("Failed"), [_pod(error, exit_code=75)]) == {
        "failed": ("StorageUnavailable", "s3 unreachable")}
    assert content_report(_job("Failed"), [_pod(None, 137, "OOMKilled")])["failed"][0] == "OOMKilled"
