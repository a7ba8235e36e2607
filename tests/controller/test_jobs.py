"""The Job builder: valid batch/v1 for every example, and the properties a shared cluster relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune.api import FineTuneJob
from kubetune.controller.jobs import build_configmap, build_job, build_rendezvous_service, job_name, run_output_uri
from kubetune.controller.settings import OperatorSettings
from tests.support import example_docs, minimal_job, patched

SETTINGS = OperatorSettings(trainer_image="registry.local/kubetune/trainer:0.1.0")
UID = {"metadata": {"uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"}}
JOBS = [(n, FineTuneJob.model_validate(patched(d, UID))) for n, d in example_docs() if d["kind"] == "FineTuneJob"]


@pytest.mark.parametrize("name,ftj", JOBS, ids=[n for n, _ in JOBS])
def test_built_objects_are_valid_kubernetes(name, ftj):
    kubernetes_validate.validate(build_job(ftj, SETTINGS), "1.33", strict=True)
    kubernetes_validate.validate(build_configmap(ftj, SETTINGS), "1.33", strict=True)


@pytest.mark.parametrize("name,ftj", JOBS, ids=[n for n, _ in JOBS])
def test_pod_is_restricted(name, ftj):
    pod = build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/dev/shm", "/scratch", "/etc/kubetune"}
    assert pod["restartPolicy"] == "Never"


def test_qlora_minio_example():
    ftj = dict(JOBS)["qlora-7b-minio.yaml:support-bot-qwen7b"]
    job = build_job(ftj, SETTINGS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert job["metadata"]["name"] == "support-bot-qwen7b-train"
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID["metadata"]["uid"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1, "cpu": "8", "memory": "64Gi"}
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in
                  e.get("valueFrom", {})}
    assert secret_env["KUBETUNE_S3_SECRET_KEY"] == {"name": "minio-credentials", "key": "secretKey", "optional": False}
    assert secret_env["KUBETUNE_S3_CA_BUNDLE"]["optional"] is True
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert job["spec"]["suspend"] is False and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_kueue_job_starts_suspended_with_queue_label():
    ftj = dict(JOBS)["kueue-shared-gpu.yaml:nightly-sql-assistant"]
    job = build_job(ftj, SETTINGS)
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research-gpus"
    assert pod["priorityClassName"] == "batch-low"
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 2}


def test_workload_priority_class_is_the_kueue_priority_label():
    job = build_job(FineTuneJob.model_validate(minimal_job(queueName="gpus", workloadPriorityClassName="nightly")),
                    SETTINGS)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "nightly"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    # Kueue reads it from the Job; the pods are not Kueue's objects.
    assert "kueue.x-k8s.io/priority-class" not in job["spec"]["template"]["metadata"]["labels"]
    unlabelled = build_job(FineTuneJob.model_validate(minimal_job(queueName="gpus")), SETTINGS)
    assert "kueue.x-k8s.io/priority-class" not in unlabelled["metadata"]["labels"]


def test_pvc_sources_are_mounted_read_only_and_output_writable():
    ftj = FineTuneJob.model_validate(patched(minimal_job(
        baseModel={"uri": "pvc://models/llama"},
        dataset={"uri": "pvc://data/d.jsonl", "validationUri": "pvc://holdout/v.jsonl", "validationSplit": 0},
        output={"uri": "pvc://models/runs"}), UID))
    pod = build_job(ftj, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    # models also holds the output: writable; the hold-out file's claim is read like the dataset's
    assert claims == {"data": True, "holdout": True, "models": False}


def test_preemption_does_not_count_and_bad_input_fails_fast():
    rules = build_job(JOBS[0][1], SETTINGS)["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                            "values": [75]}}
    assert rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[2]["action"] == "FailJob" and rules[2]["onExitCodes"]["values"] == [65, 78]


def test_configmap_holds_spec_and_run_info_but_no_credentials():
    ftj = dict(JOBS)["qlora-7b-minio.yaml:support-bot-qwen7b"]
    body = json.loads(build_configmap(ftj, SETTINGS)["data"]["runspec.json"])
    assert body["run"]["output_uri"] == "s3://adapters/ml-team/support-bot/support-bot-qwen7b-0f1e2d3c"
    assert body["spec"]["storage"] == {"secretRef": {"name": "minio-credentials"}}
    from kubetune_trainer.runspec import RunSpec

    RunSpec.model_validate(body)  # the trainer accepts exactly what the operator writes


@settings(max_examples=100, deadline=None)
@given(name=st.from_regex(r"[a-z][a-z0-9-]{0,80}[a-z0-9]", fullmatch=True),
       gpus=st.integers(0, 8), r=st.integers(1, 512), queue=st.none() | st.just("q"))
def test_builder_properties(name, gpus, r, queue):
    doc = patched(minimal_job(resources={"gpus": gpus}, lora={"r": r}, queueName=queue),
                  {"metadata": {"name": name, **UID["metadata"]}})
    ftj = FineTuneJob.model_validate(doc)
    job = build_job(ftj, SETTINGS)
    assert job == build_job(ftj, SETTINGS)  # deterministic: a restarted operator finds the same names
    assert len(job_name(ftj)) <= 63 and job["metadata"]["name"] == job_name(ftj)
    assert job["spec"]["suspend"] is (queue is not None)
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    assert limits.get("nvidia.com/gpu", 0) == gpus
    assert run_output_uri(ftj).startswith("pvc://runs/job/")


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name,ftj", JOBS, ids=[n for n, _ in JOBS])
def test_built_objects_match_the_reviewed_golden_files(name, ftj):
    """Any change to what the operator creates shows up as a diff of tests/controller/golden/ in review.
    After an intended change: KUBETUNE_UPDATE_GOLDEN=1 pytest tests/controller/test_jobs.py"""
    configmap = build_configmap(ftj, SETTINGS)
    readable = {**configmap, "data": {k: json.loads(v) for k, v in configmap["data"].items()}}  # JSON shown as YAML
    built = yaml.safe_dump_all([readable, build_job(ftj, SETTINGS)], sort_keys=True)
    golden = GOLDEN / (name.replace(".yaml", "").replace(":", "--").replace("/", "-") + ".yaml")
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(built)
    assert golden.exists(), f"no golden file {golden.name}: run with KUBETUNE_UPDATE_GOLDEN=1 and review it"
    assert built == golden.read_text()


def test_several_nodes_get_an_indexed_job_and_a_rendezvous_service():
    ftj = dict(JOBS)["qlora-72b-multinode.yaml:legal-qwen72b"]
    job, service = build_job(ftj, SETTINGS), build_rendezvous_service(ftj)
    kubernetes_validate.validate(service, "1.33", strict=True)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["suspend"] is True  # Kueue admits the pod set (both nodes) as a whole
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    # Pod i of an Indexed Job is JOB-i; with the Service as subdomain, JOB-0.JOB resolves to rank 0's node.
    assert pod["subdomain"] == service["metadata"]["name"] == job_name(ftj)
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBETUNE_RENDEZVOUS_HOST"] == f"{job_name(ftj)}-0.{job_name(ftj)}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job_name(ftj)}
    single = dict(JOBS)["qlora-7b-minio.yaml:support-bot-qwen7b"]
    assert build_job(single, SETTINGS)["spec"]["completions"] == 1
    assert "subdomain" not in build_job(single, SETTINGS)["spec"]["template"]["spec"]
