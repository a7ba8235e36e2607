"""The API served from the test's event loop on 127.0.0.1, over a local stack (the API emulator,
the S3 server, the operator and the executor), with the official `openai` client pointed at it."""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import asynccontextmanager

import aiohttp
from openai import AsyncOpenAI

from kubetune.local.stack import LocalStack
from kubetune.openai_api.local import catalog_configmap, ensure_catalog, local_settings, stack_storage
from kubetune.openai_api.server import make_service, serve
from kubetune.controller.kube import path_for

TOKEN = "local-test-token"


@asynccontextmanager
async def api_server(stack: LocalStack, models: dict | None = None, **settings):
    """(service, port) of an API on the stack, set up as `kubetune api --local` does: the stack's S3
    Secret, and its sample catalog unless `models` gives another."""
    config = dataclasses.replace(local_settings(), **settings)
    namespace, name = config.catalog.split("/")
    if models is not None:
        await stack.client.create(path_for("v1", "configmaps", namespace), catalog_configmap(namespace, models))
    await ensure_catalog(stack.client, namespace)
    service = make_service(config, stack.client, await stack_storage(stack.client, namespace), TOKEN)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, "127.0.0.1", 0, stop, started))
    try:
        yield service, await asyncio.wait_for(started, 10)
    finally:
        stop.set()
        await task


def openai_client(port: int, *, token: str = TOKEN, namespace: str | None = None) -> AsyncOpenAI:
    prefix = f"/namespaces/{namespace}" if namespace else ""
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{port}{prefix}/v1", api_key=token, max_retries=0)


async def without_token(url: str) -> tuple[int, dict]:
    """A GET with no Authorization header at all (the official client refuses to send one)."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()
