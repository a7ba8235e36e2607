"""`kubetune local up` keeps a stack running in the background with a kubeconfig that the real
kubectl uses; `kubetune local down` stops it, and no pod process outlives it (one that ignores
SIGTERM, as a trainer in the middle of a long step does, is killed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support import eventually

pytestmark = pytest.mark.slow
KUBECTL = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
# Writes its pid, then ignores SIGTERM and waits for signals that never come.
STUBBORN = "import os, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "open(sys.argv[1], 'w').write(str(os.getpid()));\nwhile True: signal.pause()"
DOWN_WITHIN_S = 60  # the stack's shutdown grace period (20 s) and room to start and stop


def kubetune(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


async def test_up_kubectl_down(tmp_path):
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

        pid_file = tmp_path / "stubborn.pid"
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "stubborn", "namespace": "default"},
               "spec": {"template": {"spec": {
                   "restartPolicy": "Never", "terminationGracePeriodSeconds": 600,
                   "volumes": [{"name": "scratch", "emptyDir": {}}],
                   "containers": [{"name": "work", "image": "local", "command": [sys.executable, "-c", STUBBORN,
                                                                                 str(pid_file)],
                                   "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]}}}}
        subprocess.run([KUBECTL, "apply", "-f", "-"], input=json.dumps(job), env=kube_env, check=True,
                       capture_output=True, text=True, timeout=60)
        stubborn = int(await eventually(lambda: pid_file.exists() and pid_file.read_text(), 120, "the pod to run"))
    finally:
        began = time.monotonic()
        down = kubetune("local", "down", "--state", str(state), env=env)
        took = time.monotonic() - began
    assert down.returncode == 0 and "local stack down" in down.stdout, down.stdout + down.stderr
    assert not _running(stubborn), f"pod process {stubborn} outlived `kubetune local down`"
    assert took < DOWN_WITHIN_S, f"down took {took:.0f} s"
    assert not (state / "stack.pid").exists()
    assert not (state / "ready").exists()  # the stack shut down cleanly, not killed


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # exited, not yet collected by its parent
