"""The emulator's executor as a node: pods beyond its allocatable CPU, memory or GPUs stay Pending
with the scheduler's reason and start when room frees up; each running pod gets a cpuset and an
OMP_NUM_THREADS from its CPU limit; a claim's parent directory (KUBETUNE_VOLUME_ROOT) is there for
the process as in the pod. Small Python programs stand in for the trainer."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

import kmock
import pytest

from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.local.apiserver import ApiServer
from kubetune.local.executor import LocalExecutor
from kubetune.local.resources import Allocatable, Defaults
from tests.support import eventually

# Reports what it was given, then holds its resources until the test writes to its gate (a FIFO).
WORKLOAD = """
import json, os, sys
out, gate = sys.argv[1], sys.argv[2]
root = os.environ.get("KUBETUNE_VOLUME_ROOT")
data = open(os.path.join(root, "data", "train.jsonl")).read() if root else None
report = {"omp": os.environ.get("OMP_NUM_THREADS"), "cpus": sorted(os.sched_getaffinity(0)), "data": data}
with open(out + ".tmp", "w") as f:
    json.dump(report, f)
os.replace(out + ".tmp", out)
open(gate).read()
"""
NODE_CPUS = sorted(os.sched_getaffinity(0))


def job(name: str, tmp: Path, resources: dict | None = None, **pod: object) -> dict:
    os.mkfifo(tmp / f"{name}.gate")
    container = {"name": "work", "image": "local", "command": [sys.executable, "-c", WORKLOAD, str(tmp / f"{name}.json"),
                                                               str(tmp / f"{name}.gate")]}
    if resources:
        container["resources"] = resources
    container.update(pod.pop("container", {}))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "default"},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container],
                                                              **pod}}}}


@pytest.fixture
async def node(tmp_path):
    """An API server and an executor whose node has every CPU of this machine and no GPU, with the
    local stack's default: a container that says nothing asks for the whole node."""
    cpus = Decimal(len(NODE_CPUS))
    async with ApiServer() as api, kmock.Server(api) as server:
        client = KubeClient(KubeConfig(server=str(server.url).rstrip("/")))
        executor = LocalExecutor(client, tmp_path / "state", str(server.url), poll_s=0.1,
                                 node=Allocatable(cpu=cpus, memory=Decimal(8 * 2**30), gpus=0),
                                 defaults=Defaults(limits={"cpu": str(cpus)}, requests={"cpu": str(cpus)}))
        stop = asyncio.Event()
        task = asyncio.create_task(executor.run(stop))
        yield client, executor
        stop.set()
        await task
        await client.close()


async def pod_of(client: KubeClient, job_name: str) -> dict | None:
    pods = await client.list(path_for("v1", "pods", "default"), {"job-name": job_name})
    return pods[0] if pods else None


async def pending_reason(client: KubeClient, job_name: str) -> str | None:
    pod = await pod_of(client, job_name)
    scheduled = [c for c in ((pod or {}).get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"]
    if pod and pod["status"]["phase"] == "Pending" and scheduled and scheduled[0]["status"] == "False":
        return f'{scheduled[0]["reason"]}: {scheduled[0]["message"]}'
    return None


def report(tmp: Path, name: str) -> dict | None:
    path = tmp / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


async def release(tmp: Path, name: str) -> None:
    def write() -> None:
        with open(tmp / f"{name}.gate", "w") as gate:
            gate.write("go")
    await asyncio.to_thread(write)


async def phase(client: KubeClient, job_name: str) -> str | None:
    return ((await pod_of(client, job_name)) or {}).get("status", {}).get("phase")


async def test_pods_beyond_allocatable_wait_and_each_gets_its_cpus(node, tmp_path):
    client, executor = node
    half = {"limits": {"cpu": str(Decimal(len(NODE_CPUS)) / 2)}}
    for name, resources in (("half-a", half), ("half-b", half)):
        await client.create(path_for("batch/v1", "jobs", "default"), job(name, tmp_path, resources))
    a = await eventually(lambda: report(tmp_path, "half-a"), 60, "the first half-node pod to run")
    b = await eventually(lambda: report(tmp_path, "half-b"), 60, "the second half-node pod to run")
    threads = str(max(1, len(NODE_CPUS) // 2))
    assert a["omp"] == b["omp"] == threads
    assert len(a["cpus"]) == len(b["cpus"]) == int(threads)
    if len(NODE_CPUS) > 1:
        assert not set(a["cpus"]) & set(b["cpus"]), (a, b)  # a core each, not the same one twice

    # Asks for nothing: the default is the whole node, which the two hold between them.
    await client.create(path_for("batch/v1", "jobs", "default"), job("whole", tmp_path))
    await client.create(path_for("batch/v1", "jobs", "default"), job(
        "gpu", tmp_path, {"limits": {"nvidia.com/gpu": 1, "cpu": "100m"}}))
    assert await eventually(lambda: pending_reason(client, "whole"), 30) == \
        "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu."
    assert await eventually(lambda: pending_reason(client, "gpu"), 30) == \
        "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient nvidia.com/gpu."
    assert report(tmp_path, "whole") is None

    await release(tmp_path, "half-a")
    await eventually(lambda: _is(phase(client, "half-a"), "Succeeded"), 30, "the first pod to finish")
    assert await pending_reason(client, "whole")  # half the node is not enough
    await release(tmp_path, "half-b")
    whole = await eventually(lambda: report(tmp_path, "whole"), 60, "the whole-node pod to run")
    assert whole["omp"] == str(len(NODE_CPUS)) and whole["cpus"] == NODE_CPUS
    await eventually(lambda: _is(pending_reason(client, "gpu"), "Unschedulable: 0/1 nodes are available: "
                                 "1 Insufficient cpu, 1 Insufficient nvidia.com/gpu."), 30,
                     "the GPU pod to wait for the CPUs the whole-node pod holds")
    await release(tmp_path, "whole")
    await eventually(lambda: _is(phase(client, "whole"), "Succeeded"), 30, "the whole-node pod to finish")
    await eventually(lambda: _is(pending_reason(client, "gpu"),
                                 "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."), 30,
                     "the GPU pod's reason to be the GPU alone")


async def test_the_volume_root_above_claims_is_there(node, tmp_path):
    client, executor = node
    claim = executor.volume_dir("data")
    claim.mkdir(parents=True)
    (claim / "train.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    await client.create(path_for("batch/v1", "jobs", "default"), job(
        "reader", tmp_path, volumes=[{"name": "pvc-0", "persistentVolumeClaim": {"claimName": "data"}}],
        container={"env": [{"name": "KUBETUNE_VOLUME_ROOT", "value": "/mnt/volumes"}],
                   "volumeMounts": [{"name": "pvc-0", "mountPath": "/mnt/volumes/data"}]}))
    seen = await eventually(lambda: report(tmp_path, "reader"), 60, "the pod to read its claim")
    assert seen["data"] == '{"prompt": "p", "completion": "c"}\n'
    await release(tmp_path, "reader")


async def _is(value, wanted) -> bool:
    return (await value) == wanted
