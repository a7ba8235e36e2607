"""Watches that survive the real API server: while the quickstart's run trains, kube-apiserver is
restarted, etcd is compacted and the API server restarted again (so the operator's watches resume
from a compacted resourceVersion and get 410 Gone), and etcd is restarted. After each fault a new
FineTuneJob is applied at once: its event must not be lost. At the end the run has Succeeded with
its adapter Ready, each FineTuneJob got exactly one Job (the API server's audit log counts the
operator's creates) and the first Job is the one created before the faults.

Run with -s to see the figures (downtimes, how long the operator took to act after each fault,
410s seen)."""

from __future__ import annotations

import json
import time

import pytest

from kubetune.controller.jobs import job_name
from kubetune.controller.kube import path_for
from kubetune.controller.merging import merge_job_name
from tests.realplane.kubetune_install import (audited_calls, install, prepare_inputs, quickstart_doc, running_node,
                                              storage_secret, uninstall)
from tests.realplane.operator_process import kubectl_apply
from tests.support import eventually, minimal_job, patched

FTJ_API = "kubetune.dev/v1alpha1"
WATCH_RESTARTED = "Restarting the watch-stream"  # what Kopf logs on a 410 Gone


def _get(plane, api_version: str, plural: str, namespace: str, name: str) -> dict:
    status, body = plane.request("GET", path_for(api_version, plural, namespace, name))
    return body if status == 200 else {}


def _phase(plane, namespace: str, name: str) -> str:
    return (_get(plane, FTJ_API, "finetunejobs", namespace, name).get("status") or {}).get("phase") or ""


@pytest.fixture
def installed(control_plane, kubetune_crds, s3_server, tmp_path):
    installation = install(control_plane, watch=[f"faults-{tmp_path.name[-6:].lower().replace('_', '')}"])
    storage_secret(control_plane, installation.namespaces[0], s3_server.config)
    prepare_inputs(s3_server.config)
    installation.start_operator(tmp_path)
    yield installation
    uninstall(installation)


async def test_watches_survive_apiserver_and_etcd_faults(control_plane, installed, tmp_path):
    plane, namespace = control_plane, installed.namespaces[0]
    doc = quickstart_doc()
    doc["metadata"] = {"name": "survivor"}
    figures: dict[str, float | int | str] = {}

    async def reconciled_after(name: str, began: float) -> float:
        """Applies a suspended FineTuneJob; seconds until the operator created its Job."""
        kubectl_apply(plane, namespace, patched(minimal_job(suspend=True), {"metadata": {"name": name}}))
        await eventually(lambda: _get(plane, "batch/v1", "jobs", namespace, job_name(name)), timeout=120,
                         interval=0.2, what=f"{name}'s Job")
        return round(time.monotonic() - began, 1)

    with running_node(plane, tmp_path / "node"):
        kubectl_apply(plane, namespace, doc)
        await eventually(lambda: _phase(plane, namespace, "survivor") == "Running", timeout=600, interval=1,
                         what="the run running")
        job_uid = _get(plane, "batch/v1", "jobs", namespace, job_name("survivor"))["metadata"]["uid"]

        began = time.monotonic()
        plane.restart_apiserver()
        figures["apiserver restart, s"] = round(time.monotonic() - began, 1)
        figures["apiserver restart -> new job reconciled, s"] = await reconciled_after("after-apiserver", began)

        restarts_before = installed.operator.output().count(WATCH_RESTARTED)
        began = time.monotonic()
        figures["compacted at revision"] = plane.compact_etcd()
        plane.restart_apiserver()
        figures["compaction + apiserver restart -> new job reconciled, s"] = await reconciled_after(
            "after-compaction", began)
        figures["watch streams restarted on 410 Gone"] = installed.operator.output().count(WATCH_RESTARTED) - restarts_before

        began = time.monotonic()
        plane.restart_etcd()
        figures["etcd restart (until the API server is ready), s"] = round(time.monotonic() - began, 1)
        figures["etcd restart -> new job reconciled, s"] = await reconciled_after("after-etcd", began)
        figures["survivor still training after the faults"] = _phase(plane, namespace, "survivor") == "Running"

        began = time.monotonic()
        await eventually(lambda: _phase(plane, namespace, "survivor") in ("Succeeded", "Failed"), timeout=1200,
                         interval=2, what="the run's end")
        figures["run ended after the last fault, s"] = round(time.monotonic() - began, 1)

        # Inside the node's block: the adapter's merge and verification Jobs run pods on it.
        status = _get(plane, FTJ_API, "finetunejobs", namespace, "survivor")["status"]
        adapter = status.get("adapterRef", {}).get("name", "")
        began = time.monotonic()
        await eventually(lambda: (_get(plane, FTJ_API, "loraadapters", namespace, adapter).get("status") or {})
                         .get("phase") == "Ready", timeout=300, interval=2, what="the adapter Ready")
        figures["adapter merged and verified after the run, s"] = round(time.monotonic() - began, 1)
    creates = [c for c in audited_calls(plane, installed.user) if (c.verb, c.resource) == ("create", "jobs")]
    created = sorted(c.name or "?" for c in creates if c.code == 201)
    figures["Job creates answered 409 (adopted)"] = sum(c.code == 409 for c in creates)
    print("\nwatch faults:", json.dumps(figures, indent=1))

    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == doc["spec"]["training"]["maxSteps"]
    assert _get(plane, "batch/v1", "jobs", namespace, job_name("survivor"))["metadata"]["uid"] == job_uid
    # The operator's other creates are the adapter's merge Job and its verification Job.
    adapter_jobs = {merge_job_name(adapter)} | {n for n in created if n.startswith(f"{adapter}-verify-")}
    assert sorted(n for n in created if n not in adapter_jobs) == sorted(
        job_name(n) for n in ("survivor", "after-apiserver", "after-compaction", "after-etcd"))
    assert created.count(merge_job_name(adapter)) == 1
    assert figures["watch streams restarted on 410 Gone"] >= 1
    assert installed.operator.process.poll() is None, installed.operator.output()[-3000:]
