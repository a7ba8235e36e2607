"""Progress reporting: the one channel the operator mirrors into FineTuneJob.status.progress.

In a cluster the trainer patches the annotation `kubetune.dev/progress` on its own Pod (named by
the downward API); the operator watches its Jobs' pods and copies the value into the
FineTuneJob's status, so the operator stays the only writer of status. Local runs may also write
the same JSON to a file. Every report is also a log line. A failed report is logged, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from kubetune.api.meta import now_rfc3339
from kubetune.contract import PROGRESS_ANNOTATION

log = logging.getLogger("kubetune.progress")
# The local executor runs the trainer as a process, which cannot see the pod's mounts at their
# container paths: it says where the service-account volume is instead (as KUBETUNE_TERMINATION_LOG).
SA_DIR = Path(os.environ.get("KUBETUNE_SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount"))


@dataclass
class ProgressReport:
    phase: str  # loading, training, evaluating, publishing, done
    step: int = 0
    totalSteps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    evalLoss: float | None = None
    tokensPerSecond: float | None = None
    etaSeconds: int | None = None
    lastCheckpoint: str | None = None
    updatedAt: str = ""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))


class Channel(Protocol):
    def send(self, payload: str) -> None: ...


class FileChannel:
    def __init__(self, path: Path):
        self.path = path

    def send(self, payload: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(payload)
        os.replace(tmp, self.path)


class PodAnnotationChannel:
    """Merge-patches an annotation on this Pod through the Kubernetes API."""

    def __init__(self, api_url: str, namespace: str, pod: str, token: str | Path | None, ca_file: Path | None):
        # A token file (the pod's service-account token) is re-read on every report: the kubelet
        # rotates it, and bound tokens expire.
        self.url = f"{api_url.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}"
        self.token = token
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @classmethod
    def from_env(cls) -> PodAnnotationChannel | None:
        pod, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        api = os.environ.get("KUBETUNE_API_URL")
        if not api and os.environ.get("KUBERNETES_SERVICE_HOST"):
            api = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ.get('KUBERNETES_SERVICE_PORT', '443')}"
        if not (pod and namespace and api):
            return None
        token_file = SA_DIR / "token"
        token = token_file if token_file.exists() else None
        ca = SA_DIR / "ca.crt"
        return cls(api, namespace, pod, token, ca if api.startswith("https") and ca.exists() else None)

    def send(self, payload: str) -> None:
        body = json.dumps({"metadata": {"annotations": {PROGRESS_ANNOTATION: payload}}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH",
                                         headers={"Content-Type": "application/merge-patch+json"})
        token = self.token.read_text().strip() if isinstance(self.token, Path) else self.token
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
            response.read()


class ProgressReporter:
    """Sends at most one report per `interval` seconds, except forced ones (phase changes, the end)."""

    def __init__(self, channels: list[Channel], interval: float):
        self.channels, self.interval = channels, interval
        self._last = float("-inf")

    def report(self, report: ProgressReport, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        report.updatedAt = now_rfc3339()
        payload = report.to_json()
        log.info("progress %s", payload)
        for channel in self.channels:
            try:
                channel.send(payload)
            except Exception as exc:  # progress must never stop training
                log.warning("progress report through %s failed: %s", type(channel).__name__, exc)
