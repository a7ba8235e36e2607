"""Running the API: its settings, the Service they make, and the HTTP server's lifetime."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from kubetune.controller.kube import KubeClient
from kubetune.openai_api.app import Service, build_app
from kubetune.openai_api.auth import Authorizer, KubernetesAuth, NoAuth, StaticTokenAuth
from kubetune.openai_api.files import FileStore
from kubetune.openai_api.mapping import Placement
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import open_location

log = logging.getLogger(__name__)
TOKEN_ENV = "KUBETUNE_API_TOKEN"


@dataclass(frozen=True)
class Settings:
    files_uri: str = "s3://kubetune-files"
    output_uri: str = "s3://kubetune-runs"
    storage_secret: str = "kubetune-storage"
    catalog: str = f"{os.environ.get('POD_NAMESPACE', 'kubetune-system')}/kubetune-openai-models"
    auth: str = "kubernetes"  # kubernetes | token | none
    default_namespace: str = "default"
    max_upload_bytes: int = 512 * 1024 * 1024


def authorizer(mode: str, client: KubeClient, token: str | None) -> Authorizer:
    if mode == "kubernetes":
        return KubernetesAuth(client)
    if mode == "token":
        return StaticTokenAuth(token or "")
    if mode == "none":
        return NoAuth()
    raise ValueError(f"unknown auth mode {mode!r}: use kubernetes, token or none")


def make_service(settings: Settings, client: KubeClient, storage: StorageConfig | None,
                 token: str | None = None) -> Service:
    namespace, _, name = settings.catalog.partition("/")
    if not name:
        raise ValueError(f"--catalog must be NAMESPACE/NAME, got {settings.catalog!r}")
    files = FileStore(open_location(settings.files_uri, storage=storage, volume_root=Path("/")))
    return Service(client=client, auth=authorizer(settings.auth, client, token), files=files, storage=storage,
                   placement=Placement(settings.output_uri, settings.storage_secret), catalog_ref=(namespace, name),
                   default_namespace=settings.default_namespace, max_upload_bytes=settings.max_upload_bytes)


async def serve(service: Service, host: str, port: int, stop: asyncio.Event,
                started: asyncio.Future | None = None) -> None:
    """Serve until `stop` is set; `started` receives the bound port (useful with port 0)."""
    runner = web.AppRunner(build_app(service), access_log=log)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        log.info("OpenAI fine-tuning API on http://%s:%d/v1", host, bound)
        if started is not None:
            started.set_result(bound)
        await stop.wait()
    finally:
        await runner.cleanup()
