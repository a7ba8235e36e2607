"""A small asynchronous Kubernetes API client (aiohttp): the operator's only way to the API server
besides Kopf's own watches. Configured from the pod's service account or a kubeconfig."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
RETRY_DELAYS_S = (0.2, 0.5, 1.0)


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")


@dataclass(frozen=True)
class KubeConfig:
    server: str
    token: str | None = None
    ca_file: str | None = None
    insecure: bool = False

    @classmethod
    def load(cls) -> "KubeConfig":
        if os.environ.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
            host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            return cls(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(), str(SA_DIR / "ca.crt"))
        return cls.from_kubeconfig(Path(os.environ.get("KUBECONFIG", Path.home() / ".kube" / "config")))

    @classmethod
    def from_kubeconfig(cls, path: Path) -> "KubeConfig":
        doc = yaml.safe_load(path.read_text())
        context_name = doc.get("current-context")
        context = next(c["context"] for c in doc["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == context["cluster"])
        user = next((u["user"] for u in doc.get("users", []) if u["name"] == context.get("user")), {})
        ca_file = cluster.get("certificate-authority")
        if cluster.get("certificate-authority-data"):
            handle = tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False)
            handle.write(base64.b64decode(cluster["certificate-authority-data"]))
            handle.close()
            ca_file = handle.name
        return cls(cluster["server"], user.get("token"), ca_file, bool(cluster.get("insecure-skip-tls-verify")))


def path_for(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base] + ([f"namespaces/{namespace}"] if namespace else []) + [plural]
    parts += [name] if name else []
    parts += [subresource] if subresource else []
    return "/" + "/".join(p.strip("/") for p in parts)


class KubeClient:
    def __init__(self, config: KubeConfig):
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.server.startswith("https"):
            return False
        if self.config.insecure:
            return False
        return ssl.create_default_context(cafile=self.config.ca_file) if self.config.ca_file else True

    async def _request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                       content_type: str = "application/json") -> Any:
        """One API call, retried a few times on what a busy or restarting API server answers
        (429, 5xx, a dropped connection): every call the operator makes is safe to repeat."""
        for delay in RETRY_DELAYS_S:
            try:
                return await self._send(method, path, json=json, params=params, content_type=content_type)
            except ApiError as exc:
                if exc.status not in TRANSIENT_STATUS:
                    raise
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(delay)
        return await self._send(method, path, json=json, params=params, content_type=content_type)

    async def _send(self, method: str, path: str, *, json: Any, params: dict | None, content_type: str) -> Any:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30))
        async with self._session.request(method, self.config.server.rstrip("/") + path, json=json, params=params,
                                         headers={"Content-Type": content_type}, ssl=self._ssl()) as resp:
            body = await resp.json(content_type=None) if resp.content_length != 0 else None
            if resp.status >= 400:
                raise ApiError(resp.status, body)
            return body

    async def get(self, path: str) -> dict | None:
        try:
            return await self._request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, labels: dict[str, str] | None = None) -> list[dict]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        body = await self._request("GET", path, params=params)
        return body.get("items", []) if body else []

    async def create(self, path: str, body: dict) -> dict:
        return await self._request("POST", path, json=body)

    async def patch(self, path: str, body: dict) -> dict:
        return await self._request("PATCH", path, json=body, content_type="application/merge-patch+json")

    async def delete(self, path: str, propagation: str = "Background") -> None:
        try:
            await self._request("DELETE", path, json={"kind": "DeleteOptions", "apiVersion": "v1",
                                                       "propagationPolicy": propagation})
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
