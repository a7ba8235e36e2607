"""The operator as a cluster runs it (`kubetune operator`, its own process) against the real plane,
with the identity a test gives it: a kubeconfig, or a service-account directory as a pod has."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from kubetune.local.controlplane import ControlPlane

FORBIDDEN = re.compile(r"\b403\b|[Ff]orbidden")


@dataclass
class OperatorProcess:
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def forbidden_lines(self) -> list[str]:
        return [line for line in self.output().splitlines() if FORBIDDEN.search(line)]

    def stop(self, timeout_s: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # Kopf's graceful stop
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_operator(log: Path, namespaces: list[str], *, kubeconfig: Path | None = None,
                   service_account_dir: Path | None = None, plane: ControlPlane | None = None,
                   env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                   standalone: bool = True) -> OperatorProcess:
    """`kubetune operator` watching `namespaces` (all when empty), configured either by
    `kubeconfig` or, as in a pod, by `service_account_dir` (token, ca.crt) and the
    KUBERNETES_SERVICE_* variables of `plane`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_SERVICE_", "KUBECONFIG"))}
    if kubeconfig is not None:
        base["KUBECONFIG"] = str(kubeconfig)
    else:
        assert service_account_dir is not None and plane is not None
        base.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(plane.port),
                    KUBETUNE_SERVICE_ACCOUNT_DIR=str(service_account_dir),
                    KUBECONFIG=str(log.parent / "no-such-kubeconfig"))
    argv = [str(Path(sys.executable).parent / "kubetune"), "operator", "--verbose",
            *(["--standalone"] if standalone else []), *[f"--namespace={ns}" for ns in namespaces], *args]
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**base, **(env or {})})
    return OperatorProcess(process, log)


def service_account_dir(directory: Path, plane: ControlPlane, token: str) -> Path:
    """What the kubelet mounts for a pod's service account: token, ca.crt, namespace."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plane.ca_file, directory / "ca.crt")
    rotate_token(directory, token)
    return directory


def rotate_token(directory: Path, token: str) -> None:
    """Replaces the token file in one step, as the kubelet's atomic writer does."""
    staged = directory / ".token.new"
    staged.write_text(token)
    os.replace(staged, directory / "token")


def kubectl_apply(plane: ControlPlane, namespace: str, doc: dict) -> None:
    """`kubectl apply` of doc into `namespace` (whatever namespace doc names)."""
    doc = {**doc, "metadata": {k: v for k, v in doc["metadata"].items() if k != "namespace"}}
    plane.kubectl("apply", "--server-side", "--field-manager=kubetune-tests", "-n", namespace, "-f", "-",
                  input=yaml.safe_dump(doc))
