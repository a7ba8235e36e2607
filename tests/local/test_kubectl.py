"""The real kubectl against the local stack's API server: what a user does with a cluster works the
same (apply, get with printer columns, -o yaml, describe with Events, wait, delete)."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.local.apiserver import ApiServer

pytestmark = pytest.mark.kmock(cls=ApiServer)
ROOT = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
FTJ = "/apis/kubetune.dev/v1alpha1/namespaces/default/finetunejobs"


@pytest.fixture
def kubectl(kmock, tmp_path):
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "namespace": "default"}}],
        "users": [{"name": "local", "user": {}}]}))
    env = {**os.environ, "KUBECONFIG": str(config), "HOME": str(tmp_path)}  # HOME: a fresh discovery cache

    async def run(*args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(KUBECTL, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
        assert not check or proc.returncode == 0, f"kubectl {' '.join(args)} -> {proc.returncode}: {out}"
        return out
    return run


async def test_kubectl_works_as_against_a_cluster(kmock, kubectl):
    assert "created" in await kubectl("apply", "-f", str(ROOT / "crds"))
    assert "invoices-local created" in await kubectl("apply", "-f", str(ROOT / "examples/local/finetunejob.yaml"))
    assert "invoices-local unchanged" in await kubectl("apply", "-f", str(ROOT / "examples/local/finetunejob.yaml"))

    await kmock.patch(f"{FTJ}/invoices-local/status", json={"status": {
        "phase": "Running", "progress": {"step": 12, "percent": 40, "loss": 0.5}}})
    table = (await kubectl("get", "ftj")).splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "ADAPTER", "AGE"]
    assert table[1].split()[:3] == ["invoices-local", "Running", "40"]
    assert (await kubectl("get", "ftj", "-o", "wide")).splitlines()[0].split() == [
        "NAME", "PHASE", "PROGRESS", "LOSS", "ADAPTER", "AGE"]
    assert "finetunejob.kubetune.dev/invoices-local" in await kubectl("get", "kubetune")  # the CRD's category

    doc = yaml.safe_load(await kubectl("get", "ftj", "invoices-local", "-o", "yaml"))
    assert doc["spec"]["baseModel"]["uri"] == "s3://models/smollm2" and doc["metadata"]["uid"]
    assert doc["status"]["phase"] == "Running"

    await kmock.post("/api/v1/namespaces/default/events", json={
        "metadata": {"generateName": "invoices-local.", "namespace": "default"}, "reason": "JobCreated",
        "message": "created Job invoices-local-train", "type": "Normal", "source": {"component": "kubetune"},
        "involvedObject": {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "invoices-local",
                           "namespace": "default", "uid": doc["metadata"]["uid"]}})
    described = await kubectl("describe", "ftj", "invoices-local")
    assert "JobCreated" in described and "created Job invoices-local-train" in described

    waiting = asyncio.create_task(kubectl("wait", "--for=condition=Complete", "ftj/invoices-local", "--timeout=30s"))
    await kmock.patch(f"{FTJ}/invoices-local/status", json={"status": {"phase": "Succeeded", "conditions": [
        {"type": "Complete", "status": "True", "reason": "Succeeded", "message": "",
         "lastTransitionTime": "2026-11-22T00:00:00Z"}]}})
    assert "condition met" in await waiting

    assert "deleted" in await kubectl("delete", "ftj", "invoices-local")
    assert "No resources found" in await kubectl("get", "ftj")


async def test_selectors_and_lists_follow_the_api(kmock):
    for name, team in (("a", "x"), ("b", "y"), ("c", "x")):
        await kmock.post("/api/v1/namespaces/default/configmaps", json={
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"team": team}}})
    listing = await (await kmock.get("/api/v1/namespaces/default/configmaps?labelSelector=team%3Dx")).json()
    assert (listing["kind"], listing["apiVersion"]) == ("ConfigMapList", "v1")
    assert [i["metadata"]["name"] for i in listing["items"]] == ["a", "c"]
    assert int(listing["metadata"]["resourceVersion"]) >= int(listing["items"][-1]["metadata"]["resourceVersion"])
    listing = await (await kmock.get("/api/v1/namespaces/default/configmaps?labelSelector=team+notin+(x)")).json()
    assert [i["metadata"]["name"] for i in listing["items"]] == ["b"]
    listing = await (await kmock.get("/api/v1/namespaces/default/configmaps?fieldSelector=metadata.name!%3Da")).json()
    assert [i["metadata"]["name"] for i in listing["items"]] == ["b", "c"]


async def test_the_aibrix_secret_command_copies_the_storage_credentials_under_aibrix_keys(kmock, kubectl, tmp_path):
    from kubetune.serving.manifests import AIBRIX_SECRET_KEYS, aibrix_secret_note

    ours = {"endpoint": "http://minio:9000", "accessKey": "AK", "secretKey": "s3cr3t/+=", "region": "eu-1"}
    await kmock.post("/api/v1/namespaces/default/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3", "namespace": "default"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in ours.items()}})
    command = aibrix_secret_note("s3", "default").split("with: ", 1)[1].split(". A non-AWS", 1)[0]
    script = tmp_path / "make-secret.sh"
    script.write_text(command.replace("kubectl ", f"{KUBECTL} "))
    proc = await asyncio.create_subprocess_exec("sh", str(script), env={**os.environ, "KUBECONFIG": str(
        tmp_path / "kubeconfig"), "HOME": str(tmp_path)}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 0, out
    made = yaml.safe_load(await kubectl("get", "secret", "s3-aibrix", "-o", "yaml"))
    decoded = {k: base64.b64decode(v).decode() for k, v in made["data"].items()}
    assert decoded == {theirs: ours[key] for key, theirs in AIBRIX_SECRET_KEYS.items()}
