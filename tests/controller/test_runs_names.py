"""`kubetune runs show NAME`: a LoraAdapter or FineTuneJob name resolved through the cluster
(kubeconfig) to its run's artifact, whose history is then read from a real S3 server."""

from __future__ import annotations

import asyncio

import pytest

from kubetune.cli import main
from kubetune.local.apiserver import ApiServer
from tests.storage.test_runs_cli import _publish_run
from tests.support import minimal_job

pytestmark = pytest.mark.kmock(cls=ApiServer)
API = "/apis/kubetune.dev/v1alpha1/namespaces/default"


async def test_adapter_and_job_names_lead_to_the_same_history(cluster, store_env, s3_bucket, tmp_path, capsys):
    uri = _publish_run(s3_bucket, tmp_path, "job-1", [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])

    await cluster.post(f"{API}/loraadapters", json={
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": "job-1"},
        "spec": {"adapterName": "job", "version": 1, "baseModel": {"uri": "pvc://models/smollm2"},
                 "artifact": {"uri": uri}, "storage": {"secretRef": {"name": "minio"}}}})
    await cluster.post(f"{API}/finetunejobs", json=minimal_job())
    # The CLI runs its own event loop (asyncio.run), so it runs in a thread beside the emulator's.
    assert await asyncio.to_thread(main, ["runs", "show", "job"]) == 1
    assert "FineTuneJob default/job has published no run yet" in capsys.readouterr().err

    await cluster.patch(f"{API}/finetunejobs/job/status", json={"status": {"adapterRef": {"name": "job-1"}}})
    for name in ("job", "job-1"):
        assert await asyncio.to_thread(main, ["runs", "show", name, "-n", "default"]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["step", "1", "2", "3"]
    assert await asyncio.to_thread(main, ["runs", "show", "nothing"]) == 1
    assert "default/nothing: no LoraAdapter or FineTuneJob of that name" in capsys.readouterr().err
