"""The local stack in one process: an API server, the S3 server, the operator (unchanged, over HTTP)
and the executor, on 127.0.0.1, with a kubeconfig for kubectl.

Two API servers to choose from (`control_plane=`):
- "emulator" (the default, nothing to build): kubetune's own API server (`apiserver.py`), in
  memory; the executor plays the Job controller, the scheduler and the kubelet (`executor.py`);
- "kubernetes": the real control plane (`controlplane.py`: etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, built by `scripts/control-plane build`), its state on
  disk under STATE/controlplane; the executor is only the node's kubelet (`kubelet.py`). A started
  `ControlPlane` may be passed instead (the tests share one), which the stack then leaves running.

Either way each namespace the stack serves gets what the quickstart's FineTuneJob expects: the
Secret `local-s3`, the trainer's ServiceAccount, and a CPU default for containers that ask for
none (the whole node: one CPU training at a time unless jobs ask for less with resources.cpu).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from kubetune.api import FineTuneJob, LoraAdapter
from kubetune.api.crd import build_crd
from kubetune.controller.kube import ApiError, KubeClient, KubeConfig, path_for
from kubetune.local.resources import Allocatable, Defaults
from kubetune.local.s3server import S3Server
from kubetune.storage.config import StorageConfig

if TYPE_CHECKING:
    from kubetune.local.controlplane import ControlPlane

log = logging.getLogger(__name__)
S3_SECRET = "local-s3"  # the Secret that holds the local S3 server's endpoint and credentials
TRAINER_ACCOUNT = "kubetune-trainer"
CPU_DEFAULTS = "kubetune-local-defaults"  # the LimitRange on the real plane


def write_kubeconfig(path: Path, server: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubetune-local",
        "clusters": [{"name": "kubetune-local", "cluster": {"server": server}}],
        "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "namespace": "default"}}],
        "users": [{"name": "kubetune-local", "user": {}}]}))


class LocalStack:
    def __init__(self, state: Path, *, api_port: int = 0, with_s3: bool = True, gpus: int = 0,
                 control_plane: Literal["emulator", "kubernetes"] | ControlPlane = "emulator",
                 namespaces: list[str] | None = None, cpus: float | None = None):
        self.state, self.api_port, self.with_s3 = state.resolve(), api_port, with_s3
        self.kubeconfig = self.state / "kubeconfig"
        self.control_plane = control_plane
        self.namespaces = namespaces or ["default"]
        self.watch_all = namespaces is None  # the operator watches every namespace unless given some
        self.node = Allocatable.of_this_machine(gpus=gpus, cpu=cpus)
        # Without it every CPU training on the stack starts at once and each takes all cores.
        self.defaults = Defaults(limits={"cpu": str(self.node.cpu)}, requests={"cpu": str(self.node.cpu)})
        self.s3: S3Server | None = None
        self.plane: ControlPlane | None = None
        self._exit = AsyncExitStack()
        self._stop, self._stop_executor = asyncio.Event(), asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._operator_ready = asyncio.Event()

    @property
    def storage(self) -> StorageConfig | None:
        return self.s3.config if self.s3 else None

    @property
    def real(self) -> bool:
        return self.control_plane != "emulator"

    async def __aenter__(self) -> LocalStack:
        try:
            return await self._start()
        except BaseException:
            await self._shut_down()
            raise

    async def _start(self) -> LocalStack:
        self.state.mkdir(parents=True, exist_ok=True)
        agent = await (self._start_real() if self.real else self._start_emulator())
        for kind in (FineTuneJob, LoraAdapter):
            await self._install_crd(build_crd(kind))
        if self.with_s3:
            await self._start_s3()
        for namespace in self.namespaces:
            await self.prepare_namespace(namespace)
        self.executor = agent
        self._tasks = [asyncio.create_task(agent.run(self._stop_executor), name="executor"),
                       asyncio.create_task(self._run_operator(), name="operator")]
        await asyncio.wait_for(self._operator_ready.wait(), 60)
        return self

    async def _start_emulator(self):
        import kmock

        from kubetune.local.apiserver import ApiServer
        from kubetune.local.executor import LocalExecutor

        self.api = await self._exit.enter_async_context(ApiServer())
        self.api.request_log_limit = 32
        self.api.history_limit = 4
        server = await self._exit.enter_async_context(kmock.Server(self.api, port=self.api_port or None))
        self.url = str(server.url).rstrip("/")
        write_kubeconfig(self.kubeconfig, self.url)
        self.client = KubeClient(KubeConfig(server=self.url))
        self._exit.push_async_callback(self.client.close)
        return LocalExecutor(self.client, self.state, self.url, node=self.node, defaults=self.defaults)

    async def _start_real(self):
        from kubetune.local.controlplane import DEFAULT_NODE, ControlPlane
        from kubetune.local.kubelet import NodeKubelet

        if isinstance(self.control_plane, ControlPlane):
            plane = self.control_plane
        else:
            plane = await asyncio.to_thread(ControlPlane(self.state / "controlplane").start)
            self._exit.push_async_callback(asyncio.to_thread, plane.stop)
        self.plane, self.url = plane, plane.url
        # A bearer token: kubetune's own client speaks tokens only (kubectl and Kopf take it too).
        plane.kubeconfig_for_token(plane.admin_token, self.kubeconfig)
        self.client = KubeClient(KubeConfig(server=self.url, token=plane.admin_token, ca_file=str(plane.ca_file)))
        self._exit.push_async_callback(self.client.close)
        node_client = KubeClient(KubeConfig(server=self.url, token=plane.node_token(DEFAULT_NODE),
                                            ca_file=str(plane.ca_file)))
        self._exit.push_async_callback(node_client.close)
        return NodeKubelet(node_client, self.state, self.url, node_name=DEFAULT_NODE, node=self.node)

    async def _install_crd(self, crd: dict) -> None:
        try:
            await self.client.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        except ApiError as exc:
            if exc.status != 409:  # installed already (a shared plane): the one there serves
                raise
        if self.real:
            await _until(lambda: self._established(crd["metadata"]["name"]), 60, f"CRD {crd['metadata']['name']}")

    async def _established(self, name: str) -> bool:
        crd = await self.client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        return any(c.get("type") == "Established" and c.get("status") == "True"
                   for c in ((crd or {}).get("status") or {}).get("conditions") or [])

    async def __aexit__(self, *exc) -> None:
        await self._shut_down()

    async def _shut_down(self) -> None:
        # The executor first, and its pods with it: Kopf's shutdown cancels every task it finds that
        # it did not start with, which would cut a pod's graceful stop short and leave it running.
        for stop, name in ((self._stop_executor, "executor"), (self._stop, "operator")):
            stop.set()
            await asyncio.gather(*(t for t in self._tasks if t.get_name() == name), return_exceptions=True)
        await self._exit.aclose()

    async def _start_s3(self) -> None:
        self.s3 = S3Server(self.state / "s3", self.state / "s3.log")
        await asyncio.to_thread(self.s3.start)
        self._exit.callback(self.s3.stop)

    async def prepare_namespace(self, namespace: str) -> None:
        """What a namespace needs to run the local example: the S3 Secret; on the real plane also the
        trainer's ServiceAccount (a pod naming a missing one is refused at admission), its Role
        (get and patch pods, for the progress annotation) and the LimitRange with the CPU default."""
        if self.s3 is not None:
            config = self.s3.config
            data = {"endpoint": f"http://{config.endpoint}", "accessKey": config.access_key,
                    "secretKey": config.secret_key, "region": config.region or ""}
            await self._ensure(path_for("v1", "secrets", namespace), {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET, "namespace": namespace},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
        if not self.real:
            return
        meta = {"name": TRAINER_ACCOUNT, "namespace": namespace}
        await self._ensure(path_for("v1", "serviceaccounts", namespace),
                           {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
        rbac = "rbac.authorization.k8s.io/v1"
        await self._ensure(path_for(rbac, "roles", namespace), {
            "apiVersion": rbac, "kind": "Role", "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]})
        await self._ensure(path_for(rbac, "rolebindings", namespace), {
            "apiVersion": rbac, "kind": "RoleBinding", "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TRAINER_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": TRAINER_ACCOUNT, "namespace": namespace}]})
        await self._ensure(path_for("v1", "limitranges", namespace), self.defaults.as_limit_range(CPU_DEFAULTS,
                                                                                                   namespace))

    async def _ensure(self, collection: str, body: dict) -> None:
        try:
            await self.client.create(collection, body)
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def claim(self, name: str, namespace: str = "default") -> Path:
        """The directory behind `pvc://NAME/...` in `namespace`: on the emulator a directory per claim
        name; on the real plane a hostPath PersistentVolume at the same place, bound to a claim."""
        directory = self.state / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        if not self.real:
            return directory
        volume = f"kubetune-{namespace}-{name}"
        await self._ensure("/api/v1/persistentvolumes", {
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
            "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(directory)},
                     "claimRef": {"namespace": namespace, "name": name}}})
        await self._ensure(path_for("v1", "persistentvolumeclaims", namespace), {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                     "resources": {"requests": {"storage": "1Gi"}}}})
        return directory

    async def _run_operator(self) -> None:
        import kopf

        import kubetune.controller.handlers  # noqa: F401  (registers the handlers)

        # The operator reads its connection from KUBECONFIG, as it would on a workstation.
        os.environ["KUBECONFIG"] = str(self.kubeconfig)
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        scope = {"clusterwide": True} if self.watch_all else {"namespaces": self.namespaces}
        await kopf.operator(settings=settings, standalone=True, stop_flag=self._stop,
                            ready_flag=self._operator_ready, memo=kopf.Memo(), **scope)

    async def apply(self, doc: dict) -> dict:
        """Create the object, or merge-patch it if it exists (what `kubectl apply` amounts to here)."""
        api_version, kind = doc["apiVersion"], doc["kind"]
        plural = {"FineTuneJob": "finetunejobs", "LoraAdapter": "loraadapters"}[kind]
        namespace = doc["metadata"].get("namespace", "default")
        existing = await self.client.get(path_for(api_version, plural, namespace, doc["metadata"]["name"]))
        if existing is None:
            return await self.client.create(path_for(api_version, plural, namespace), doc)
        return await self.client.patch(path_for(api_version, plural, namespace, doc["metadata"]["name"]), doc)


async def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s")
        await asyncio.sleep(0.2)  # nothing to wait on but the API server's answer
