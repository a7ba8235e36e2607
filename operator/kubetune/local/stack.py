"""The local stack in one process: API server, S3 server, the operator (unchanged, over HTTP) and
the executor, on 127.0.0.1, with a kubeconfig for kubectl."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from contextlib import AsyncExitStack
from pathlib import Path

import kmock
import yaml

from kubetune.api import FineTuneJob, LoraAdapter
from kubetune.api.crd import build_crd
from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.local.apiserver import ApiServer
from kubetune.local.executor import LocalExecutor
from kubetune.local.s3server import S3Server
from kubetune.storage.config import StorageConfig

log = logging.getLogger(__name__)
S3_SECRET = "local-s3"  # the Secret that holds the local S3 server's endpoint and credentials


def write_kubeconfig(path: Path, server: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubetune-local",
        "clusters": [{"name": "kubetune-local", "cluster": {"server": server}}],
        "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "namespace": "default"}}],
        "users": [{"name": "kubetune-local", "user": {}}]}))


class LocalStack:
    def __init__(self, state: Path, *, api_port: int = 0, with_s3: bool = True, gpus: int = 0):
        self.state, self.api_port, self.with_s3, self.gpus = state.resolve(), api_port, with_s3, gpus
        self.kubeconfig = self.state / "kubeconfig"
        self.s3: S3Server | None = None
        self._exit = AsyncExitStack()
        self._stop = asyncio.Event()
        self._operator_ready = asyncio.Event()

    @property
    def storage(self) -> StorageConfig | None:
        return self.s3.config if self.s3 else None

    async def __aenter__(self) -> "LocalStack":
        try:
            return await self._start()
        except BaseException:
            await self._exit.aclose()
            raise

    async def _start(self) -> "LocalStack":
        self.state.mkdir(parents=True, exist_ok=True)
        self.api = await self._exit.enter_async_context(ApiServer())
        self.api.request_log_limit = 32
        self.api.history_limit = 4
        server = await self._exit.enter_async_context(kmock.Server(self.api, port=self.api_port or None))
        self.url = str(server.url).rstrip("/")
        write_kubeconfig(self.kubeconfig, self.url)
        self.client = KubeClient(KubeConfig(server=self.url))
        self._exit.push_async_callback(self.client.close)
        for kind in (FineTuneJob, LoraAdapter):
            await self.client.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", build_crd(kind))
        if self.with_s3:
            await self._start_s3()
        executor = LocalExecutor(self.client, self.state, self.url, gpus=self.gpus)
        self.executor = executor
        self._tasks = [asyncio.create_task(executor.run(self._stop), name="executor"),
                       asyncio.create_task(self._run_operator(), name="operator")]
        await asyncio.wait_for(self._operator_ready.wait(), 30)
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._exit.aclose()

    async def _start_s3(self) -> None:
        self.s3 = S3Server(self.state / "s3", self.state / "s3.log")
        await asyncio.to_thread(self.s3.start)
        self._exit.callback(self.s3.stop)
        config = self.s3.config
        data = {"endpoint": f"http://{config.endpoint}", "accessKey": config.access_key,
                "secretKey": config.secret_key, "region": config.region or ""}
        await self.client.create(path_for("v1", "secrets", "default"), {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET, "namespace": "default"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    async def _run_operator(self) -> None:
        import kopf

        import kubetune.controller.handlers  # noqa: F401  (registers the handlers)

        # The operator reads its connection from KUBECONFIG, as it would on a workstation.
        os.environ["KUBECONFIG"] = str(self.kubeconfig)
        os.environ.pop("KUBERNETES_SERVICE_HOST", None)
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True
        await kopf.operator(settings=settings, clusterwide=True, standalone=True, stop_flag=self._stop,
                            ready_flag=self._operator_ready, memo=kopf.Memo())

    async def apply(self, doc: dict) -> dict:
        """Create the object, or merge-patch it if it exists (what `kubectl apply` amounts to here)."""
        api_version, kind = doc["apiVersion"], doc["kind"]
        plural = {"FineTuneJob": "finetunejobs", "LoraAdapter": "loraadapters"}[kind]
        namespace = doc["metadata"].get("namespace", "default")
        existing = await self.client.get(path_for(api_version, plural, namespace, doc["metadata"]["name"]))
        if existing is None:
            return await self.client.create(path_for(api_version, plural, namespace), doc)
        return await self.client.patch(path_for(api_version, plural, namespace, doc["metadata"]["name"]), doc)
