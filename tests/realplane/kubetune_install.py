"""kubetune installed on the real plane as its chart installs it: the chart rendered by helm, its
ServiceAccounts, RBAC, peering and admission policy applied, and the operator run with the
Deployment's own arguments and environment under the chart's ServiceAccount token. With the node's
kubelet (kubetune's executor), the local S3 server and the quickstart's inputs, the whole flow runs.

The API server's audit log (service accounts only, see `ControlPlane.audit_log`) says which calls
each identity made and what it was answered."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import yaml

from kubetune.controller.kube import KubeClient, KubeConfig
from kubetune.local.controlplane import ControlPlane, free_port
from tests.chart.tools import ecosystem_tool
from tests.realplane.conftest import apply_crds
from tests.realplane.operator_process import OperatorProcess, service_account_dir, start_operator
from tests.support import REPO, patched

CHART = REPO / "charts" / "kubetune"
INSTALLED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "KopfPeering",
                   "ClusterKopfPeering", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
QUICKSTART = REPO / "examples" / "local" / "finetunejob.yaml"
S3_SECRET = "local-s3"  # the Secret examples/local/finetunejob.yaml names


def helm() -> str:
    return ecosystem_tool("helm")  # built from its Go module by scripts/ecosystem-tools


def render(release: str, namespace: str, *sets: str) -> list[dict]:
    args = [helm(), "template", release, str(CHART), "--namespace", namespace]
    for value in sets:
        args += ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@dataclass(frozen=True)
class Call:
    """One request of the audit log."""
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    code: int
    user_agent: str
    time: str

    @property
    def resource_path(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def audited_calls(plane: ControlPlane, user: str) -> list[Call]:
    """Each request of `user` once: a watch is logged when it starts and again when it ends."""
    calls, seen = [], set()
    for line in plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("user", {}).get("username") != user or "objectRef" not in event or event["auditID"] in seen:
            continue
        seen.add(event["auditID"])
        ref = event["objectRef"]
        calls.append(Call(event["verb"], ref.get("apiGroup", ""), ref.get("resource", ""), ref.get("subresource", ""),
                          ref.get("namespace", ""), ref.get("name", ""), event.get("responseStatus", {}).get("code", 0),
                          event.get("userAgent", ""), event.get("stageTimestamp", "")))
    return calls


@dataclass
class Installation:
    plane: ControlPlane
    release: str
    release_namespace: str
    namespaces: list[str]
    objects: list[dict]
    operator: OperatorProcess | None = None

    @property
    def account(self) -> str:
        return f"{self.release}-kubetune"

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.release_namespace}:{self.account}"

    def trainer_user(self, namespace: str) -> str:
        return f"system:serviceaccount:{namespace}:kubetune-trainer"

    def rbac(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def deployment(self) -> dict:
        return next(o for o in self.objects if o["kind"] == "Deployment")

    def start_operator(self, directory: Path, **env: str) -> OperatorProcess:
        """The Deployment's container, as a process: its arguments, its environment, the chart's
        ServiceAccount's token where a pod has it."""
        container = self.deployment()["spec"]["template"]["spec"]["containers"][0]
        values = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        values["POD_NAME"] = f"{self.account}-0"
        token = self.plane.token_for(self.release_namespace, self.account)
        sa_dir = service_account_dir(directory / "serviceaccount", self.plane, token)
        args = [a for a in container["args"] if a != "operator"]
        self.operator = start_operator(directory / "operator.log", [], service_account_dir=sa_dir, plane=self.plane,
                                       env={**values, **env}, args=tuple(args), standalone=False)
        return self.operator


def install(plane: ControlPlane, *, watch: list[str] | None = None, sets: tuple[str, ...] = ()) -> Installation:
    """The chart's identity objects in a new release namespace; `watch`: namespaces for per-namespace
    Roles (created here), else one ClusterRole."""
    suffix = uuid.uuid4().hex[:6]
    release, release_namespace = f"r{suffix}", f"kubetune-{suffix}"
    namespaces = list(watch or [])
    for name in [release_namespace, *namespaces]:
        plane.kubectl("create", "namespace", name)
    values = [f"health.port={free_port()}", f"metrics.port={free_port()}", "replicas=1", *sets]
    if namespaces:
        values.append("watch.namespaces={" + ",".join(namespaces) + "}")
    objects = render(release, release_namespace, *values)
    apply_crds(plane, CHART / "crds")
    installed = [o for o in objects if o["kind"] in INSTALLED_KINDS]
    plane.kubectl("apply", "--server-side", "--field-manager=helm", "-f", "-",
                  input=yaml.safe_dump_all(installed))
    return Installation(plane, release, release_namespace, namespaces, objects)


def uninstall(installation: Installation) -> None:
    if installation.operator is not None:
        installation.operator.stop()
    cluster_scoped = [o for o in installation.objects if o["kind"] in INSTALLED_KINDS
                      and not o["metadata"].get("namespace") and o["kind"] != "ClusterKopfPeering"]
    for obj in cluster_scoped:
        installation.plane.kubectl("delete", obj["kind"], obj["metadata"]["name"], "--ignore-not-found", "--wait=false")
    for name in [installation.release_namespace, *installation.namespaces]:
        installation.plane.kubectl("delete", "namespace", name, "--wait=false")


def storage_secret(plane: ControlPlane, namespace: str, config) -> None:
    data = {"endpoint": f"http://{config.endpoint}", "accessKey": config.access_key,
            "secretKey": config.secret_key, "region": config.region or ""}
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}))


def quickstart_doc() -> dict:
    """The quickstart's FineTuneJob with exact-match generation off: its 2 x 18 answers of 48 tokens
    take most of an hour of a shared 2-core machine, and change no call the operator makes."""
    return patched(yaml.safe_load(QUICKSTART.read_text()), {"spec": {"evaluation": {"exactMatch": False}}})


def prepare_inputs(storage) -> None:
    """The quickstart's base model and dataset in the S3 server (as `kubetune local demo` does)."""
    from kubetune.local.demo import prepare_inputs as demo_inputs

    demo_inputs(SimpleNamespace(storage=storage))


@contextmanager
def running_node(plane: ControlPlane, root: Path) -> Iterator[None]:
    """The node's kubelet (kubetune's executor in node mode) in a thread of its own, for as long as
    the block runs; a node's graceful shutdown at the end."""
    from kubetune.local.kubelet import NodeKubelet

    ready, stopping = threading.Event(), {}

    async def serve() -> None:
        client = KubeClient(KubeConfig(server=plane.url, token=plane.node_token(), ca_file=str(plane.ca_file)))
        stop = asyncio.Event()
        stopping["loop"], stopping["stop"] = asyncio.get_running_loop(), stop
        ready.set()
        try:
            await NodeKubelet(client, root, plane.url).run(stop)
        finally:
            await client.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="kubelet", daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield
    finally:
        stopping["loop"].call_soon_threadsafe(stopping["stop"].set)
        thread.join(60)
