"""Kueue (sigs.k8s.io/kueue's manager, tests/realplane/kueue_manager.py) admits FineTuneJobs on a real
control plane: a ClusterQueue with one GPU of quota, FineTuneJobs with `queueName` asking for one GPU
each, the operator (`kubetune operator`, as the plane's admin) making their suspended Jobs, Kueue's
webhooks called by kube-apiserver at https://127.0.0.1:PORT, and the real Job controller.

No node runs here: the admitted Job's pods wait unscheduled, which is all admission needs. What is
judged is Kueue's decision and what the FineTuneJob says about it.
"""

from __future__ import annotations

import time

import pytest

from kubetune.controller.jobs import job_name
from kubetune.local.controlplane import ControlPlane, free_port
from tests.realplane.kueue_manager import queued_plane
from tests.realplane.operator_process import start_operator
from tests.support import eventually, minimal_job

NAMESPACE, QUEUE = "research", "gpus"
WORKLOADS = "/apis/kueue.x-k8s.io/v1beta2/namespaces/research/workloads"


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> ControlPlane:
    urgent = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "urgent"},
              "value": 1000, "description": "preempts other fine-tuning runs"}
    with queued_plane(tmp_path_factory.mktemp("kueue"), NAMESPACE, QUEUE, [urgent]) as plane:
        yield plane


@pytest.fixture(scope="module")
def operator(plane, tmp_path_factory):
    plane.kubectl("create", "serviceaccount", "kubetune-trainer", "-n", NAMESPACE)
    process = start_operator(tmp_path_factory.mktemp("operator") / "operator.log", [NAMESPACE],
                             kubeconfig=plane.admin_kubeconfig, env={"KUBETUNE_METRICS_PORT": str(free_port())})
    yield process
    process.stop()


def workload_of(plane: ControlPlane, name: str) -> dict | None:
    """The Workload Kueue made for the Job of the FineTuneJob `name` (the Job owns it)."""
    status, listed = plane.request("GET", WORKLOADS)
    assert status == 200, listed
    return next((w for w in listed["items"] if any(o["kind"] == "Job" and o["name"] == job_name(name)
                                                   for o in w["metadata"].get("ownerReferences", []))), None)


def condition(obj: dict | None, type_: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def ftj(plane: ControlPlane, name: str) -> dict:
    status, body = plane.request("GET", f"/apis/kubetune.dev/v1alpha1/namespaces/{NAMESPACE}/finetunejobs/{name}")
    assert status == 200, body
    return body


def job_suspended(plane: ControlPlane, name: str) -> bool | None:
    status, body = plane.request("GET", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{job_name(name)}")
    return body["spec"].get("suspend") if status == 200 else None


def submit(plane: ControlPlane, name: str, **resources) -> None:
    job = minimal_job(queueName=QUEUE, resources={"gpus": 1, **resources}, output={"uri": f"pvc://runs/{name}"})
    job["metadata"] = {"name": name, "namespace": NAMESPACE}
    status, body = plane.request("POST", f"/apis/kubetune.dev/v1alpha1/namespaces/{NAMESPACE}/finetunejobs", job)
    assert status == 201, body


async def test_kueue_admits_queues_and_preempts(plane, operator):
    began = time.monotonic()
    timings: dict[str, float] = {}

    def admitted(name: str):
        w = workload_of(plane, name)
        return w if condition(w, "Admitted").get("status") == "True" and job_suspended(plane, name) is False else None

    submit(plane, "first")
    await eventually(lambda: admitted("first"), timeout=90, what="Kueue to admit the first job")
    timings["first admitted"] = time.monotonic() - began
    await eventually(lambda: condition(ftj(plane, "first"), "Admitted").get("status") == "True", timeout=60,
                     what="the first FineTuneJob to say it is admitted")

    submit(plane, "second")
    await eventually(lambda: condition(workload_of(plane, "second"), "QuotaReserved").get("status") == "False",
                     timeout=60, what="Kueue to hold the second job")
    held = condition(workload_of(plane, "second"), "QuotaReserved")
    assert "insufficient unused quota for nvidia.com/gpu" in held["message"], held
    await eventually(lambda: ftj(plane, "second").get("status", {}).get("phase") == "Queued", timeout=60,
                     what="the second FineTuneJob to be Queued")
    # The FineTuneJob says why in Kueue's own words, from the Workload, not guessed from the Job.
    await eventually(lambda: condition(ftj(plane, "second"), "Admitted").get("reason") == "WaitingForQuota",
                     timeout=60, what="the second FineTuneJob to quote Kueue's reason")
    assert "insufficient unused quota for nvidia.com/gpu" in ftj(plane, "second")["status"]["message"]
    assert job_suspended(plane, "second") is True
    timings["second held"] = time.monotonic() - began

    # A run of a higher priority class: Kueue evicts the lowest-priority admitted workload for it.
    submit(plane, "urgent", priorityClassName="urgent")
    await eventually(lambda: admitted("urgent"), timeout=90, what="Kueue to admit the urgent job by preemption")
    timings["urgent admitted by preemption"] = time.monotonic() - began
    evicted = condition(workload_of(plane, "first"), "Evicted")
    assert evicted.get("status") == "True" and evicted.get("reason") == "Preempted", evicted
    assert job_suspended(plane, "first") is True
    await eventually(lambda: ftj(plane, "first").get("status", {}).get("phase") == "Queued"
                     and condition(ftj(plane, "first"), "Admitted").get("reason") == "Preempted", timeout=60,
                     what="the preempted FineTuneJob to be Queued again, saying Kueue preempted it")
    assert ftj(plane, "first")["status"]["message"].startswith("evicted by Kueue: ")

    # The urgent run goes away: the quota is free again and one of the waiting runs is admitted.
    status, _ = plane.request("DELETE", f"/apis/kubetune.dev/v1alpha1/namespaces/{NAMESPACE}/finetunejobs/urgent",
                              {"propagationPolicy": "Foreground"})
    assert status in (200, 202)
    readmitted = await eventually(lambda: next((n for n in ("first", "second") if admitted(n)), None), timeout=120,
                                  what="Kueue to admit a waiting job once the quota is free")
    timings[f"{readmitted} admitted after the urgent run left"] = time.monotonic() - began
    print("Kueue timings (s from the first submission):",
          ", ".join(f"{k}: {v:.1f}" for k, v in timings.items()))
