"""The real-plane suite: tests that need Kubernetes itself (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler of the release in controlplane/go.mod) to judge them.
The binaries come from `scripts/control-plane build` (run by `scripts/test`)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from kubetune.local.controlplane import ControlPlane
from tests.support import REPO


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> ControlPlane:
    """One control plane for the session; see kubetune.local.controlplane for what it offers."""
    with ControlPlane(tmp_path_factory.mktemp("controlplane")) as plane:
        yield plane


def apply_crds(plane: ControlPlane, directory: Path = REPO / "crds", timeout_s: int = 60) -> list[str]:
    """Applies every CRD in `directory` server-side and waits until each is Established; returns
    their names."""
    names = [doc["metadata"]["name"] for path in sorted(directory.glob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "CustomResourceDefinition"]
    plane.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-tests", "-f", str(directory))
    plane.kubectl("wait", "--for=condition=Established", f"--timeout={timeout_s}s",
                  *[f"customresourcedefinition/{name}" for name in names])
    return names


@pytest.fixture(scope="session")
def kubetune_crds(control_plane) -> list[str]:
    """kubetune's CRDs (from crds/) installed and Established on the session's plane."""
    return apply_crds(control_plane)


@pytest.fixture
def namespace(control_plane) -> str:
    """A fresh namespace for one test, deleted afterwards (without waiting for it to go)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")
