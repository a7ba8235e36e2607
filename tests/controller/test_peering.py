"""Two operator replicas, as the chart runs them: Kopf peering keeps one active; when it stops, the
other takes over. Real `kubetune operator` processes against the local API server."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.local.apiserver import ApiServer
from kubetune.local.stack import write_kubeconfig
from tests.support import eventually, minimal_job, patched

pytestmark = pytest.mark.kmock(cls=ApiServer)
NS = "team-p"
CRDS = Path(__file__).resolve().parents[2] / "crds"


def _jobs(kmock) -> set[str]:
    return {name for (res, ns, name), o in list(kmock.objects.items())
            if res.plural == "jobs" and ns == NS and not o.deleted}


async def test_one_replica_is_active_and_the_other_takes_over(kmock, tmp_path):
    for crd in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(crd.read_text()):
            kmock.serve_crd(doc)
    await kmock.post(f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings", json={
        "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kubetune", "namespace": NS}})
    config = tmp_path / "kubeconfig"
    write_kubeconfig(config, str(kmock.url).rstrip("/"))
    env = {**os.environ, "KUBECONFIG": str(config)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    replicas, logs = {}, {}
    for priority in (100, 200):
        logs[priority] = tmp_path / f"operator-{priority}.log"
        replicas[priority] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubetune.cli", "operator", "-n", NS, "--peering", "kubetune",
            "--priority", str(priority), "--verbose", env=env, stdout=open(logs[priority], "wb"), stderr=asyncio.subprocess.STDOUT)
    try:
        def peers() -> dict:
            return (kmock.objects[(next(r for r, _, _ in kmock.objects if r.plural == "kopfpeerings"), NS, "kubetune")]
                    .raw.get("status") or {})
        await eventually(lambda: len([p for p in peers().values() if p]) == 2, 30, "both replicas to register")

        await kmock.post(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs",
                         json=patched(minimal_job(), {"metadata": {"name": "first", "namespace": NS}}))
        await eventually(lambda: "first-train" in _jobs(kmock), 30, "the first Job")
        assert "'name': 'first'" in logs[200].read_text()  # the higher priority is the active one
        assert "'name': 'first'" not in logs[100].read_text()

        replicas[200].terminate()
        assert await asyncio.wait_for(replicas[200].wait(), 30) == 0
        await kmock.post(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs",
                         json=patched(minimal_job(), {"metadata": {"name": "second", "namespace": NS}}))
        await eventually(lambda: "second-train" in _jobs(kmock), 60, "the standby to take over")
        assert "'name': 'second'" in logs[100].read_text()
        assert _jobs(kmock) == {"first-train", "second-train"}  # one Job each: nothing done twice
    finally:
        for process in replicas.values():
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 30)
