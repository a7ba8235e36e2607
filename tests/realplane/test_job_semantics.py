"""Kubernetes' own Job semantics under kubetune's Jobs, on the real control plane: the Job
controller of kube-controller-manager creates the pods, kube-scheduler binds them to the one Node,
kube-apiserver carries out evictions, and kubetune's executor is only that node's kubelet.

- the kubelet alone (a small program for a trainer): its Node is Ready with its allocatable and
  its Lease renewed; an evicted pod ends Failed with exit code 75, DisruptionTarget and its
  termination message, is deleted once finished, and the Job's next pod completes it;

- an eviction (DisruptionTarget, SIGTERM, exit 75) and a suspension do not count against
  backoffLimit (0 here), and each next pod resumes from the last checkpoint;
- bad data (exit 65) fails the Job at once through its podFailurePolicy, with one pod;
- a 2-node FineTuneJob's Indexed Job and headless Service bring up both pods at once on the node
  (a CPU gloo run), completion indexes 0 and 1, rank 0 alone publishing; its dataset is on a
  `pvc://` claim (a hostPath PersistentVolume).
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
from contextlib import asynccontextmanager
from decimal import Decimal

import aiohttp
import pytest

from kubetune.api import FineTuneJob
from kubetune.controller.jobs import job_name, pod_failure_policy, run_output_uri
from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.local.kubelet import DEFAULT_NODE, NodeKubelet
from kubetune.local.resources import Allocatable
from kubetune.local.stack import LocalStack
from kubetune.storage.location import open_location
from kubetune_trainer.checkpoints import CheckpointStore
from tests.local.runs import finished, ftj_path, load_inputs, records_jsonl, short_job
from tests.support import eventually

INDEX = "batch.kubernetes.io/job-completion-index"
RESUMED = re.compile(r"resuming from \S+/checkpoints/checkpoint-(\d+)")


@asynccontextmanager
async def real_stack(control_plane, namespace: str, tmp_path, model_dir, *, gpus: int = 0):
    """The local stack on the session's control plane, serving `namespace`, with the inputs loaded.
    (A context manager in the test, not a fixture: Kopf's shutdown must run in the test's task.)"""
    async with LocalStack(tmp_path / "stack", control_plane=control_plane, namespaces=[namespace],
                          gpus=gpus) as stack:
        await load_inputs(stack, model_dir, tmp_path)
        yield stack


async def pods(stack: LocalStack, namespace: str, job: str) -> list[dict]:
    found = await stack.client.list(path_for("v1", "pods", namespace), {"batch.kubernetes.io/job-name": job})
    return sorted(found, key=lambda p: p["metadata"]["creationTimestamp"])


async def running_pod(stack: LocalStack, namespace: str, job: str) -> dict | None:
    return next((p for p in await pods(stack, namespace, job) if p["status"].get("phase") == "Running"
                 and not p["metadata"].get("deletionTimestamp")), None)


def checkpoints(stack: LocalStack, created: dict, tmp_path) -> CheckpointStore:
    run = open_location(run_output_uri(FineTuneJob.model_validate(created)), storage=stack.storage,
                        volume_root=tmp_path)
    return CheckpointStore(run, keep=10)


async def past(store: CheckpointStore, step: int) -> int | None:
    steps = await asyncio.to_thread(store.complete_steps)
    return max(steps) if steps and max(steps) >= step else None


async def pod_ending(plane, namespace: str, name: str) -> dict:
    """The pod as it ended (Failed or Succeeded), from a watch: a finished pod of an evicted or
    suspended Job is deleted moments later, too soon for polling to be sure to see it."""
    url = f"{plane.url}/api/v1/namespaces/{namespace}/pods?watch=true&fieldSelector=metadata.name%3D{name}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {plane.admin_token}"}) as session:
        async with session.get(url, ssl=ssl.create_default_context(cafile=str(plane.ca_file)),
                               timeout=aiohttp.ClientTimeout(total=900)) as response:
            async for line in response.content:
                pod = json.loads(line)["object"]
                if (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                    return pod
    raise AssertionError(f"the watch of pod {namespace}/{name} ended before the pod did")


def log_of(stack: LocalStack, pod: dict) -> str:
    path = stack.state / "pods" / pod["metadata"]["namespace"] / pod["metadata"]["name"] / "container.log"
    return path.read_text(errors="replace") if path.exists() else ""


# Exits 75 with a termination message on SIGTERM (a trainer that checkpointed); once DONE exists, 0.
PREEMPTIBLE = """
import os, signal, sys
done, log = sys.argv[1], os.environ["KUBETUNE_TERMINATION_LOG"]
if os.path.exists(done):
    sys.exit(0)
def stop(*_):
    open(log, "w").write("checkpointed at step 7")
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""


@pytest.fixture
async def kubelet(control_plane, namespace, tmp_path):
    client = KubeClient(KubeConfig(server=control_plane.url, token=control_plane.node_token(DEFAULT_NODE),
                                   ca_file=str(control_plane.ca_file)))
    admin = KubeClient(KubeConfig(server=control_plane.url, token=control_plane.admin_token,
                                  ca_file=str(control_plane.ca_file)))
    node = NodeKubelet(client, tmp_path / "node", control_plane.url,
                       node=Allocatable(cpu=Decimal(2), memory=Decimal(4 * 2**30), gpus=1))
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    yield admin, node
    stop.set()
    await task
    await client.close()
    await admin.close()


async def test_kubelet_registers_runs_and_honours_eviction(control_plane, kubelet, namespace, tmp_path):
    admin, node = kubelet

    async def ready():
        found = await admin.get(f"/api/v1/nodes/{DEFAULT_NODE}")
        conditions = {c["type"]: c["status"] for c in ((found or {}).get("status") or {}).get("conditions") or []}
        return found if conditions.get("Ready") == "True" else None
    registered = await eventually(ready, 60, "the Node to be Ready")
    assert registered["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert registered["status"]["allocatable"]["cpu"] == "2"
    lease = await admin.get(path_for("coordination.k8s.io/v1", "leases", "kube-node-lease", DEFAULT_NODE))
    assert lease["spec"]["holderIdentity"] == DEFAULT_NODE

    done = tmp_path / "done"
    await admin.create(path_for("batch/v1", "jobs", namespace), {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "preemptible"},
        "spec": {"backoffLimit": 0, "podFailurePolicy": pod_failure_policy(), "template": {"spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 60,
            "containers": [{"name": "trainer", "image": "local", "command": [sys.executable, "-c", PREEMPTIBLE,
                                                                              str(done)],
                            "resources": {"limits": {"cpu": "500m"}}}]}}}})

    async def running():
        found = await admin.list(path_for("v1", "pods", namespace), {"batch.kubernetes.io/job-name": "preemptible"})
        return next((p for p in found if p["status"].get("phase") == "Running"), None)
    first = await eventually(running, 120, "the pod to run")
    name = first["metadata"]["name"]
    assert first["spec"]["nodeName"] == DEFAULT_NODE and (namespace, name) in node.running
    ending = asyncio.create_task(pod_ending(control_plane, namespace, name))
    await admin.create(path_for("v1", "pods", namespace, name, "eviction"), {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}})
    evicted = await asyncio.wait_for(ending, 120)
    assert evicted["status"]["phase"] == "Failed"
    terminated = evicted["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["message"]) == (75, "checkpointed at step 7")
    disruption = next(c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "EvictionByEvictionAPI")
    done.write_text("")
    await eventually(lambda: _job_condition_of(admin, namespace, "preemptible", "Complete"), 120,
                     "the Job to complete with its next pod")
    await eventually(lambda: _gone(admin, namespace, name), 120, "the evicted pod to be deleted")


@pytest.mark.slow
async def test_eviction_and_suspension_do_not_count_and_resume(control_plane, kubetune_crds, namespace, tmp_path,
                                                               smollm2_dir):
    async with real_stack(control_plane, namespace, tmp_path, smollm2_dir) as stack:
        await _eviction_and_suspension(stack, namespace, tmp_path)


async def _eviction_and_suspension(stack: LocalStack, namespace: str, tmp_path) -> None:
    created = await stack.apply(short_job("resumes", namespace, steps=6, every=1, backoffLimit=0))
    store = checkpoints(stack, created, tmp_path)
    job = job_name("resumes")

    # 1. An eviction (a node drain) once a checkpoint is complete: DisruptionTarget, SIGTERM, a
    #    checkpoint at that step, exit 75; the next pod resumes from it.
    first = await eventually(lambda: running_pod(stack, namespace, job), 600, "the first pod to run")
    await eventually(lambda: past(store, 1), 600, "the first checkpoint")
    ending = asyncio.create_task(pod_ending(stack.plane, namespace, first["metadata"]["name"]))
    await stack.client.create(path_for("v1", "pods", namespace, first["metadata"]["name"], "eviction"), {
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": first["metadata"]["name"], "namespace": namespace}})
    evicted = await asyncio.wait_for(ending, 600)
    assert evicted["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75, evicted["status"]
    assert any(c["type"] == "DisruptionTarget" and c["status"] == "True" for c in evicted["status"]["conditions"])
    at = max(await asyncio.to_thread(store.complete_steps))
    second = await eventually(lambda: _other_running(stack, namespace, job, {first["metadata"]["name"]}), 300,
                              "a pod after the eviction")
    assert await eventually(lambda: _resumed_at(stack, second), 300, "the second pod to resume") == at

    # 2. Suspended once the second pod checkpointed: the Job controller deletes the pod (SIGTERM,
    #    exit 75); resumed, the next pod goes on from the last checkpoint.
    await eventually(lambda: past(store, at + 1), 600, "a checkpoint of the second pod")
    ending = asyncio.create_task(pod_ending(stack.plane, namespace, second["metadata"]["name"]))
    await stack.client.patch(ftj_path(namespace, "resumes"), {"spec": {"suspend": True}})
    await eventually(lambda: _job_condition(stack, namespace, job, "Suspended"), 300, "the Job to be suspended")
    stopped = await asyncio.wait_for(ending, 600)
    assert stopped["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75, stopped["status"]
    at = max(await asyncio.to_thread(store.complete_steps))
    await stack.client.patch(ftj_path(namespace, "resumes"), {"spec": {"suspend": False}})
    third = await eventually(lambda: _other_running(stack, namespace, job, {first["metadata"]["name"],
                                                                           second["metadata"]["name"]}), 300,
                             "a pod after the resumption")
    assert await eventually(lambda: _resumed_at(stack, third), 300, "the third pod to resume") == at

    status = await finished(stack, namespace, "resumes")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["failures"] == 0 and status["preemptions"] >= 1, status
    batch = await stack.client.get(path_for("batch/v1", "jobs", namespace, job))
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in batch["status"]["conditions"])
    assert batch["spec"]["backoffLimit"] == 0  # neither interruption counted against it
    assert max(await asyncio.to_thread(store.complete_steps)) == 6


@pytest.mark.slow
async def test_bad_data_fails_the_job_at_once(control_plane, kubetune_crds, namespace, tmp_path, smollm2_dir):
    async with real_stack(control_plane, namespace, tmp_path, smollm2_dir) as stack:
        await _bad_data(stack, namespace)


async def _bad_data(stack: LocalStack, namespace: str) -> None:
    good = json.dumps(json.loads(records_jsonl(1)))
    (await stack.claim("data", namespace) / "bad.jsonl").write_text(f"{good}\n{good}\n{{\"prompt\": \"cut\n")
    doc = short_job("bad-data", namespace, backoffLimit=3)
    doc["spec"]["dataset"]["uri"] = "pvc://data/bad.jsonl"
    await stack.apply(doc)
    status = await finished(stack, namespace, "bad-data", 600)
    assert status["phase"] == "Failed" and status["failures"] == 1, status
    assert "pvc://data/bad.jsonl" in status["message"] and "line 3" in status["message"], status["message"]
    batch = await stack.client.get(path_for("batch/v1", "jobs", namespace, job_name("bad-data")))
    failed = next(c for c in batch["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy", failed  # not BackoffLimitExceeded: no retry
    only = await pods(stack, namespace, job_name("bad-data"))
    assert len(only) == 1 and only[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 65


@pytest.mark.slow
async def test_two_nodes_indexed_job_with_ranks(control_plane, kubetune_crds, namespace, tmp_path, smollm2_dir):
    # The node offers 2 nvidia.com/gpu for the two 1-GPU pods; there is no CUDA: gloo on the CPU.
    async with real_stack(control_plane, namespace, tmp_path, smollm2_dir, gpus=2) as stack:
        await _two_nodes(stack, namespace)


async def _two_nodes(stack: LocalStack, namespace: str) -> None:
    (await stack.claim("data", namespace) / "invoices.jsonl").write_bytes(records_jsonl())
    doc = short_job("two-nodes", namespace, steps=2, every=2,
                    resources={"gpus": 1, "nodes": 2, "cpu": "1"})
    doc["spec"]["dataset"]["uri"] = "pvc://data/invoices.jsonl"
    await stack.apply(doc)
    job = job_name("two-nodes")

    async def both_running():
        found = [p for p in await pods(stack, namespace, job) if p["status"].get("phase") == "Running"]
        return found if len(found) == 2 else None
    both = await eventually(both_running, 600, "both pods running at once")
    assert sorted(p["metadata"]["annotations"][INDEX] for p in both) == ["0", "1"]
    assert {p["spec"]["nodeName"] for p in both} == {"kubetune-node"}
    assert {p["spec"]["hostname"] for p in both} == {f"{job}-0", f"{job}-1"}
    service = await stack.client.get(path_for("v1", "services", namespace, job))
    assert service["spec"]["clusterIP"] == "None"
    batch = await stack.client.get(path_for("batch/v1", "jobs", namespace, job))
    assert (batch["spec"]["completionMode"], batch["spec"]["completions"]) == ("Indexed", 2)

    status = await finished(stack, namespace, "two-nodes")
    assert status["phase"] == "Succeeded", status.get("message")
    logs = {p["metadata"]["annotations"][INDEX]: log_of(stack, p) for p in both}
    for index, text in logs.items():
        assert "x 2 process(es)" in text, (index, text[-2000:])  # one group of two ranks
    assert "published s3://" in logs["0"] and "published s3://" not in logs["1"]  # rank 0 alone publishes


async def _ended(stack: LocalStack, namespace: str, name: str) -> dict | None:
    pod = await stack.client.get(path_for("v1", "pods", namespace, name))
    return pod if pod and pod["status"].get("phase") in ("Failed", "Succeeded") else None


async def _other_running(stack: LocalStack, namespace: str, job: str, not_these: set[str]) -> dict | None:
    pod = await running_pod(stack, namespace, job)
    return pod if pod and pod["metadata"]["name"] not in not_these else None


async def _resumed_at(stack: LocalStack, pod: dict) -> int | None:
    found = RESUMED.search(log_of(stack, pod))
    return int(found.group(1)) if found else None


async def _job_condition(stack: LocalStack, namespace: str, job: str, kind: str) -> bool:
    return await _job_condition_of(stack.client, namespace, job, kind)


async def _job_condition_of(client: KubeClient, namespace: str, job: str, kind: str) -> bool:
    batch = await client.get(path_for("batch/v1", "jobs", namespace, job))
    return any(c["type"] == kind and c["status"] == "True" for c in (batch.get("status") or {}).get("conditions") or [])


async def _gone(client: KubeClient, namespace: str, name: str) -> bool:
    return await client.get(path_for("v1", "pods", namespace, name)) is None


