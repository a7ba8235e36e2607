"""Kueue's manager (sigs.k8s.io/kueue, the release pinned in ecosystem/kueue/go.mod) run as a local
process against a real control plane.

What Kueue's manifests do with a Service and cert-manager is done here by address: the plane has no
kube-proxy, so kube-apiserver calls the admission and CRD-conversion webhooks at
`https://127.0.0.1:PORT/PATH` (clientConfig.url), over a serving certificate the plane's CA issues.
Kueue's own certificate management is off (it would write a Secret and patch a Service's webhooks).
"""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml

from kubetune.local.controlplane import HOST, Component, ControlPlane, free_port
from tests.chart.tools import ecosystem_tool
from tests.realplane.conftest import apply_crds
from tests.support import REPO

MODULE = REPO / "ecosystem" / "kueue"
# The webhooks of the integrations enabled below (batch/v1 Jobs) and of Kueue's own kinds; the rest
# serve frameworks not installed here.
WEBHOOK_PATHS = ("-batch-v1-job", "-kueue-x-k8s-io-")
METRICS_CERTS = "/etc/kueue/metrics/certs"


def kueue_source() -> Path:
    """Kueue's module source (CRDs and webhook manifests under config/), from the module cache."""
    version = next(line.split()[-1] for line in (MODULE / "go.mod").read_text().splitlines()
                   if line.strip().startswith(("require sigs.k8s.io/kueue ", "sigs.k8s.io/kueue ")))
    done = subprocess.run(["go", "mod", "download", "-json", f"sigs.k8s.io/kueue@{version}"], cwd=MODULE,
                          capture_output=True, text=True, timeout=600, check=True)
    return Path(json.loads(done.stdout)["Dir"])


def _by_url(client_config: dict, base: str, ca_bundle: str) -> dict:
    return {"url": base + client_config["service"]["path"], "caBundle": ca_bundle}


def start_kueue(plane: ControlPlane, state: Path, timeout_s: float = 180) -> Component:
    """Installs Kueue's CRDs and webhook configurations on `plane` and starts its manager (as the
    plane's admin); returns once its webhooks answer and the CRDs are Established."""
    source = kueue_source()
    state.mkdir(parents=True, exist_ok=True)
    certs = state / "certs"
    certs.mkdir(exist_ok=True)
    plane.ca.issue(certs, "tls", "kueue-webhook", hosts=(HOST,))  # tls.crt, tls.key: what Kueue looks for
    ca_bundle = base64.b64encode(plane.ca_file.read_bytes()).decode()
    port, health_port = free_port(), free_port()
    base = f"https://{HOST}:{port}"

    crd_dir = source / "config" / "components" / "crd"
    # The CRDs Kueue's kustomization gives a conversion webhook (v1beta1 <-> v1beta2), by its patches.
    converted = {yaml.safe_load((crd_dir / patch["path"]).read_text())["metadata"]["name"]
                 for patch in yaml.safe_load((crd_dir / "kustomization.yaml").read_text())["patches"]}
    crds = []
    for path in sorted((crd_dir / "bases").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["metadata"]["name"] in converted:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "conversionReviewVersions": ["v1"], "clientConfig": {"url": f"{base}/convert", "caBundle": ca_bundle}}}
        crds.append(crd)
    webhooks = []
    for doc in yaml.safe_load_all((source / "config" / "components" / "webhook" / "manifests.yaml").read_text()):
        if not doc:
            continue
        kept = [dict(w, clientConfig=_by_url(w["clientConfig"], base, ca_bundle)) for w in doc["webhooks"]
                if any(p in w["clientConfig"]["service"]["path"] for p in WEBHOOK_PATHS)]
        webhooks.append({**doc, "metadata": {"name": f"kueue-{doc['metadata']['name']}"}, "webhooks": kept})

    config = state / "config.yaml"
    config.write_text(yaml.safe_dump({
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"{HOST}:{health_port}"},
        "metrics": {"bindAddress": "0"},  # none: nothing scrapes it here
        "webhook": {"host": HOST, "port": port, "certDir": str(certs)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "integrations": {"frameworks": ["batch/job"]},
    }))
    plane.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in crds))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                  *[f"customresourcedefinition/{c['metadata']['name']}" for c in crds])
    plane.kubectl("create", "namespace", "kueue-system")
    # Without its internal certificate management Kueue reads the metrics server's certificate from
    # a fixed path, /etc/kueue/metrics/certs (cmd/kueue/main.go), metrics off or not: a mount
    # namespace of its own (bubblewrap) puts the serving pair there. The visibility API is an
    # aggregated API server of its own: off, not registered here.
    # --die-with-parent: stopping bwrap (SIGTERM) must stop the manager too, or it outlives the test.
    manager = Component("kueue", ["bwrap", "--die-with-parent", "--dev-bind", "/", "/",
                                  "--bind", str(certs), METRICS_CERTS, "--", ecosystem_tool("kueue"), f"--config={config}",
                                  f"--kubeconfig={plane.admin_kubeconfig}", "--feature-gates=VisibilityOnDemand=false"],
                        state / "kueue.log", lambda: _ready(health_port))
    manager.start(timeout_s)
    try:
        plane.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(yaml.safe_dump(w) for w in webhooks))
    except BaseException:
        manager.stop()
        raise
    return manager


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def queued_plane(state: Path, namespace: str, queue: str, extra: Sequence[dict] = ()) -> Iterator[ControlPlane]:
    """A plane of its own with kubetune's CRDs and Kueue's manager, and one ClusterQueue `queue` (one
    GPU of quota, lower priorities preempted) with its LocalQueue in `namespace`; `extra` objects
    (priority classes) applied last. A plane of its own because Kueue's Job webhook (failurePolicy
    Fail) would judge every other test's Jobs."""
    with ControlPlane(state / "plane") as plane:
        apply_crds(plane)
        manager = start_kueue(plane, state / "kueue")
        try:
            plane.kubectl("create", "namespace", namespace)
            for doc in [
                {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
                {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": queue}, "spec": {
                    "namespaceSelector": {},
                    "preemption": {"withinClusterQueue": "LowerPriority"},
                    "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": [{
                        "name": "default-flavor", "resources": [
                            {"name": "cpu", "nominalQuota": 64}, {"name": "memory", "nominalQuota": "512Gi"},
                            {"name": "nvidia.com/gpu", "nominalQuota": 1}]}]}]}},
                {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                 "metadata": {"name": queue, "namespace": namespace}, "spec": {"clusterQueue": queue}},
                *extra,
            ]:
                plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc))
            yield plane
        finally:
            manager.stop()
