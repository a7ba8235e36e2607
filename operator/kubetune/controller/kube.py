"""A small asynchronous Kubernetes API client (aiohttp): the operator's only way to the API server
besides Kopf's own watches.

Where the API server is and who we are comes from the `kubernetes` package's loaders, for these
calls and for Kopf's login alike: the pod's service account (its token file re-read as the kubelet
rotates it), or kubeconfig files (merged from $KUBECONFIG) with tokens, token files, client
certificates, exec plugins (EKS, GKE, AKS) or auth providers.

The calls themselves stay on aiohttp rather than the `kubernetes` client: that client is synchronous
(every call of the asyncio operator would need a thread), its typed models do not cover our own
resources (which would go through its untyped custom-objects API anyway), and Kopf already talks
aiohttp, so one HTTP stack and one error type (ApiError) serve both.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kopf
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from kubetune import __version__

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Where the service account's token and CA are mounted when not at the default path (a projected
# volume of one's own).
SA_DIR_ENV = "KUBETUNE_SERVICE_ACCOUNT_DIR"
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
RETRY_DELAYS_S = (0.2, 0.5, 1.0)
ERROR_TEXT_LIMIT = 500  # characters of a non-JSON error body kept in the message
# Tells our calls from Kopf's ("kopf/VERSION") in audit logs and the API server's metrics.
USER_AGENT = f"kubetune/{__version__}"


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else str(body)[:ERROR_TEXT_LIMIT]
        super().__init__(f"HTTP {status}: {message}")


class CredentialsError(RuntimeError):
    """No usable configuration: neither a service account nor a kubeconfig."""


@dataclass(frozen=True)
class KubeConfig:
    """One way to the API server: where it is, how to trust it and who we are.

    `source` is the `kubernetes` package's Configuration it was loaded into, asked on each request
    for the Authorization header: its refresh hook re-reads a rotated service-account token (each
    minute) and re-runs an exec plugin whose credential expired. `reload` loads it all anew (the
    token file now, the kubeconfig's client certificate, a fresh exec credential): the client does
    so when the API server answers 401."""

    server: str
    token: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    source: k8s_client.Configuration | None = field(default=None, compare=False, repr=False)
    reload: Callable[[], KubeConfig] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls) -> KubeConfig:
        """In a pod, its service account; elsewhere $KUBECONFIG (or ~/.kube/config)."""
        sa_dir = Path(os.environ.get(SA_DIR_ENV, SA_DIR))
        if os.environ.get("KUBERNETES_SERVICE_HOST") and (sa_dir / "token").exists():
            return cls.in_cluster(sa_dir)
        return cls.from_kubeconfig(os.environ.get("KUBECONFIG", "~/.kube/config"))

    @classmethod
    def in_cluster(cls, sa_dir: Path = SA_DIR) -> KubeConfig:
        source = k8s_client.Configuration()
        try:
            k8s_config.incluster_config.InClusterConfigLoader(
                token_filename=str(sa_dir / "token"), cert_filename=str(sa_dir / "ca.crt"),
                try_refresh_token=True).load_and_set(source)
        except k8s_config.ConfigException as exc:
            raise CredentialsError(f"service account in {sa_dir}: {exc}") from exc
        return cls._from_source(source, lambda: cls.in_cluster(sa_dir))

    @classmethod
    def from_kubeconfig(cls, path: str | Path, context: str | None = None) -> KubeConfig:
        """`path` may list several files separated by ':', merged as kubectl does."""
        source = k8s_client.Configuration()
        try:
            # persist_config=False: a refreshed credential must not be written into the user's file.
            k8s_config.load_kube_config(config_file=str(path), context=context, client_configuration=source,
                                        persist_config=False)
        except (k8s_config.ConfigException, OSError) as exc:
            raise CredentialsError(f"kubeconfig {path}: {exc}") from exc
        return cls._from_source(source, lambda: cls.from_kubeconfig(path, context))

    @classmethod
    def _from_source(cls, source: k8s_client.Configuration, reload: Callable[[], KubeConfig]) -> KubeConfig:
        return cls(server=source.host, ca_file=source.ssl_ca_cert, insecure=not source.verify_ssl,
                   cert_file=source.cert_file, key_file=source.key_file, source=source, reload=reload)

    def authorization(self) -> str | None:
        """The Authorization header's value now ("Bearer ..." or "Basic ..."), if any. An exec
        plugin whose credential expired runs here, in the caller's thread: once per credential
        lifetime, which is cheaper than a thread hop on every call."""
        if self.source is not None:
            setting = self.source.auth_settings().get("BearerToken")
            return setting["value"] if setting else None
        return f"Bearer {self.token}" if self.token else None

    def reloaded(self) -> KubeConfig:
        return self.reload() if self.reload is not None else self

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        else:
            context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def kopf_connection(self) -> kopf.ConnectionInfo:
        """The same identity for Kopf's own API calls (its watches and patches)."""
        scheme, _, credential = (self.authorization() or "").partition(" ")
        return kopf.ConnectionInfo(server=self.server, ca_path=self.ca_file, insecure=self.insecure,
                                   scheme=scheme or None, token=credential or None,
                                   certificate_path=self.cert_file, private_key_path=self.key_file)


def path_for(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [base] + ([f"namespaces/{namespace}"] if namespace else []) + [plural]
    parts += [name] if name else []
    parts += [subresource] if subresource else []
    return "/" + "/".join(p.strip("/") for p in parts)


def decode_body(raw: bytes) -> Any:
    """JSON as the API server answers; anything else (a proxy's or a size limit's text or HTML
    page) as text, so that an error keeps its status instead of becoming a JSONDecodeError."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


class KubeClient:
    def __init__(self, config: KubeConfig):
        self.config = config
        self._ssl = config.ssl_context()
        self._session: aiohttp.ClientSession | None = None

    async def _request(self, method: str, path: str, *, json: Any = None, params: dict | None = None,
                       content_type: str = "application/json") -> Any:
        """One API call, retried a few times on what a busy or restarting API server answers
        (429, 5xx, a dropped connection): every call the operator makes is safe to repeat."""
        for delay in RETRY_DELAYS_S:
            try:
                return await self._authenticated(method, path, json=json, params=params, content_type=content_type)
            except ApiError as exc:
                if exc.status not in TRANSIENT_STATUS:
                    raise
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(delay)
        return await self._authenticated(method, path, json=json, params=params, content_type=content_type)

    async def _authenticated(self, method: str, path: str, **kwargs: Any) -> Any:
        """A 401 means our credential went stale (a rotated token, an expired exec credential, a
        renewed client certificate): load the configuration anew once and repeat the call."""
        try:
            return await self._send(method, path, **kwargs)
        except ApiError as exc:
            if exc.status != 401 or self.config.reload is None:
                raise
        self.config = await asyncio.to_thread(self.config.reloaded)  # an exec plugin may take a while
        self._ssl = self.config.ssl_context()
        return await self._send(method, path, **kwargs)

    async def _send(self, method: str, path: str, *, json: Any, params: dict | None, content_type: str) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                                  headers={"User-Agent": USER_AGENT})
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if authorization := self.config.authorization():
            headers["Authorization"] = authorization
        async with self._session.request(method, self.config.server.rstrip("/") + path, json=json, params=params,
                                         headers=headers, ssl=self._ssl) as resp:
            body = decode_body(await resp.read())
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

    async def delete(self, path: str, propagation: str = "Background", grace_period_s: int | None = None) -> None:
        options: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        if grace_period_s is not None:
            options["gracePeriodSeconds"] = grace_period_s
        try:
            await self._request("DELETE", path, json=options)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
