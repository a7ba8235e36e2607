"""The chart installed by helm (the release pinned in ecosystem/helm/go.mod) on a real control plane:
install with its CRDs, upgrade to a changed value, a bad upgrade refused, uninstall and what it leaves.

No node runs here, so the operator Deployment's pods stay unscheduled and helm does not wait for
them: these tests judge what helm does with the chart, and the real Deployment controller's
acknowledgement of each revision; running the operator with the chart's identity is the business
of tests/realplane/kubetune_install.py's tests.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from kubetune.local.controlplane import ControlPlane
from tests.chart.tools import ecosystem_tool
from tests.support import REPO, eventually, minimal_job

CHART = REPO / "charts" / "kubetune"
RELEASE, NAMESPACE = "kt", "kubetune-system"
CRDS = ("finetunejobs.kubetune.dev", "loraadapters.kubetune.dev", "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev")
FINETUNEJOB = {**minimal_job(), "metadata": {"name": "invoices", "namespace": "team-a"}}


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> ControlPlane:
    """A plane of its own: whether helm creates the CRDs, and leaves them, is only seen where no other
    test has applied them."""
    with ControlPlane(tmp_path_factory.mktemp("helm-plane")) as plane:
        yield plane


def helm(plane: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([ecosystem_tool("helm"), "--kubeconfig", str(plane.admin_kubeconfig), *args],
                          capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def get(plane: ControlPlane, path: str) -> dict | None:
    status, body = plane.request("GET", path)
    assert status in (200, 404), (path, status, body)
    return body if status == 200 else None


def operator_env(plane: ControlPlane) -> dict[str, str]:
    deployment = get(plane, f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}-kubetune")
    assert deployment is not None
    return {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}


def kind_and_group(doc: dict) -> str:
    """What kubectl get takes to name the kind unambiguously: Kind.group, or Kind for the core group."""
    group, _, _ = doc["apiVersion"].rpartition("/")
    return f"{doc['kind']}.{group}" if group else doc["kind"]


def release(plane: ControlPlane) -> tuple[str, int]:
    """The release's status and revision, as helm records them."""
    found = json.loads(helm(plane, "status", RELEASE, "--namespace", NAMESPACE, "--output", "json").stdout)
    return found["info"]["status"], found["version"]


def observed(plane: ControlPlane, generation: int) -> bool:
    """The Deployment controller has acted on this generation of the operator's Deployment."""
    deployment = get(plane, f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}-kubetune")
    return bool(deployment) and deployment["metadata"]["generation"] == generation and \
        deployment.get("status", {}).get("observedGeneration") == generation


async def test_install_upgrade_uninstall(plane):
    assert all(get(plane, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{c}") is None for c in CRDS)
    helm(plane, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace")
    assert release(plane) == ("deployed", 1)
    for crd in CRDS:
        found = get(plane, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
        assert found and any(c["type"] == "Established" and c["status"] == "True"
                             for c in found["status"]["conditions"]), crd
    await eventually(lambda: observed(plane, 1), timeout=60, what="the Deployment controller to see revision 1")
    assert get(plane, f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{RELEASE}-kubetune") is not None
    assert get(plane, f"/apis/kopf.dev/v1/clusterkopfpeerings/{RELEASE}-kubetune") is not None
    assert operator_env(plane).get("KUBETUNE_MAX_RUNNING_PER_NAMESPACE") == "0"

    # A user's FineTuneJob, made while the release is installed.
    plane.kubectl("create", "namespace", "team-a")
    status, body = plane.request("POST", "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs", FINETUNEJOB)
    assert status == 201, body.get("message")

    helm(plane, "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values",
         "--set", "operator.maxRunningPerNamespace=3")
    assert release(plane) == ("deployed", 2)
    assert operator_env(plane)["KUBETUNE_MAX_RUNNING_PER_NAMESPACE"] == "3"
    await eventually(lambda: observed(plane, 2), timeout=60, what="the Deployment controller to see revision 2")

    # A value values.schema.json refuses: nothing is applied, the release stays at revision 2.
    refused = helm(plane, "upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, "--reuse-values",
                   "--set", "operator.maxRunningPerNamespace=-1", check=False)
    assert refused.returncode != 0 and "maxRunningPerNamespace" in refused.stderr
    assert release(plane) == ("deployed", 2)
    assert operator_env(plane)["KUBETUNE_MAX_RUNNING_PER_NAMESPACE"] == "3"

    manifest = [d for d in yaml.safe_load_all(helm(plane, "get", "manifest", RELEASE, "--namespace", NAMESPACE).stdout)
                if d]
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterKopfPeering"} <= {d["kind"] for d in manifest}
    helm(plane, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "180s")
    assert json.loads(helm(plane, "list", "--all-namespaces", "--output", "json").stdout) == []
    gone = helm(plane, "status", RELEASE, "--namespace", NAMESPACE, check=False)
    assert gone.returncode != 0 and "not found" in gone.stderr
    # Every object of the release's manifest is gone...
    for doc in manifest:
        left = plane.kubectl("get", kind_and_group(doc), doc["metadata"]["name"], "--ignore-not-found", "-o", "name",
                             "--namespace", doc["metadata"].get("namespace") or NAMESPACE).stdout
        assert left == "", f"{doc['kind']} {doc['metadata']['name']} outlived helm uninstall"
    # ...but by Helm's convention the CRDs of crds/ stay, and with them every user's resources;
    # the namespace --create-namespace made stays too.
    for crd in CRDS:
        assert get(plane, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}") is not None, crd
    assert get(plane, "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/invoices") is not None
    assert get(plane, f"/api/v1/namespaces/{NAMESPACE}") is not None
