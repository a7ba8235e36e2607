"""`kubetune local up --control-plane kubernetes`: the local stack on the real control plane, used
as a user would, through the CLI and kubectl."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kubetune.local.controlplane import DEFAULT_NODE, kubectl_binary


def _kubetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True, text=True, timeout=600)


def test_local_up_on_the_real_control_plane(tmp_path):
    state = tmp_path / "stack"
    up = _kubetune("local", "up", "--control-plane", "kubernetes", "--state", str(state))
    try:
        assert up.returncode == 0, up.stderr + (state / "stack.log").read_text(errors="replace")[-3000:]

        def kubectl(*args: str) -> str:
            done = subprocess.run([kubectl_binary(), *args], capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "KUBECONFIG": str(state / "kubeconfig")})
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert json.loads(kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"] == "v1.37.2"
        node = json.loads(kubectl("get", "node", DEFAULT_NODE, "-o", "json"))
        assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
        crds = json.loads(kubectl("get", "crd", "-o", "json"))["items"]
        assert {"finetunejobs.kubetune.dev", "loraadapters.kubetune.dev"} <= {c["metadata"]["name"] for c in crds}
    finally:
        down = _kubetune("local", "down", "--state", str(state))
    assert down.returncode == 0, down.stderr
    # down stopped the control plane too: its API server no longer answers.
    gone = subprocess.run([kubectl_binary(), "get", "namespaces", "--request-timeout=5s"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "KUBECONFIG": str(state / "kubeconfig")})
    assert gone.returncode != 0 and "refused" in gone.stderr, gone.stderr
