"""`kubetune local up` keeps a stack running in the background with a kubeconfig that the real
kubectl uses; `kubetune local down` stops it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")


def kubetune(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_up_kubectl_down(tmp_path):
    state = tmp_path / "stack"
    env = {**os.environ, "HOME": str(tmp_path), "TQDM_DISABLE": "1"}
    up = kubetune("local", "up", "--state", str(state), env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        kube_env = {**env, "KUBECONFIG": str(state / "kubeconfig")}
        crds = subprocess.run([KUBECTL, "get", "crd", "-o", "name"], env=kube_env, capture_output=True, text=True,
                              timeout=60)
        assert "customresourcedefinition.apiextensions.k8s.io/finetunejobs.kubetune.dev" in crds.stdout
        secret = yaml.safe_load(subprocess.run([KUBECTL, "get", "secret", "local-s3", "-o", "yaml"], env=kube_env,
                                               capture_output=True, text=True, timeout=60).stdout)
        assert set(secret["data"]) >= {"endpoint", "accessKey", "secretKey"}
        assert kubetune("local", "up", "--state", str(state), env=env).stdout.startswith("already up")
    finally:
        down = kubetune("local", "down", "--state", str(state), env=env)
    assert down.returncode == 0 and "local stack down" in down.stdout
    assert not (state / "stack.pid").exists()
    assert not (state / "ready").exists()  # the stack shut down cleanly, not killed
