"""A stateful Kubernetes API server for the local stack and the tests: kmock's KubernetesEmulator
plus what clients (the operator, the trainer, kubectl) rely on, kept faithful to the real API:

- creation fills metadata.name from generateName, namespace from the URL, uid, resourceVersion,
  creationTimestamp and generation; every write bumps resourceVersion; a spec change bumps generation;
- resources with a status subresource split writes: the main resource ignores `status`, and
  `/status` changes nothing but `status`;
- lists carry kind, apiVersion and resourceVersion, and honour labelSelector and fieldSelector, as
  watches do;
- a created CustomResourceDefinition serves its resource (discovery, short names, categories) and
  its printer columns, rendered as a meta.k8s.io/v1 Table when the client asks for one (kubectl get).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import itertools
import re
import uuid
import aiohttp.web
import kmock
from kmock import KubernetesEmulator

from kubetune.local.selectors import field_selector, label_selector
from kubetune.local.tables import to_table, wants_table

WITH_STATUS = {"finetunejobs", "loraadapters", "jobs", "pods", "customresourcedefinitions"}
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
BUILTINS = ("v1/namespaces", "v1/events", "v1/pods", "v1/configmaps", "v1/secrets", "v1/services",
            "v1/serviceaccounts", "batch/v1/jobs", "coordination.k8s.io/v1/leases", CRD_RESOURCE)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _merged(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _group_version(resource) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else resource.version


class ApiServer(KubernetesEmulator):
    """Use as kmock's handler: `async with ApiServer() as api, kmock.Server(api): ...`."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.revisions = itertools.count(1000)
        self.revision = 1000
        self.printer_columns: dict[tuple[str, str], list[dict]] = {}
        self.resources.load_bundled()
        for name in BUILTINS:
            self.resources[name].verbs = {"create", "delete", "get", "list", "patch", "update", "watch"}
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/apis?/.+")] << self._serve_openapi_group_version

    def _next_revision(self) -> str:
        self.revision = next(self.revisions)
        return str(self.revision)

    # -- writes -----------------------------------------------------------------------------------
    async def _handle(self, request):
        data = request.data
        if request.resource is not None and isinstance(data, dict) and request.action is not None:
            action, plural = request.action.name, request.resource.plural
            meta = data.setdefault("metadata", {})
            if action == "CREATE":
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_revision(),
                            creationTimestamp=_now(), generation=1)
                if plural == "customresourcedefinitions":
                    self.serve_crd(data)
            elif action == "UPDATE" and request.name is not None:
                self._prepare_update(request, data, plural)
        return await super()._handle(request)

    def _prepare_update(self, request, data: dict, plural: str) -> None:
        key = (request.resource, request.namespace, request.name)
        current = self.objects[key] if key in self.objects else None
        if plural in WITH_STATUS and request.subresource == "status":
            for field in [k for k in data if k not in ("status", "metadata")]:
                del data[field]
            data["metadata"] = {}
        elif plural in WITH_STATUS:
            data.pop("status", None)
        if current is not None and not current.deleted:
            spec = data.get("spec")
            merged = _merged(current.raw.get("spec") or {}, spec) if isinstance(spec, dict) else None
            if merged is not None and merged != current.raw.get("spec"):
                data["metadata"]["generation"] = (current.raw["metadata"].get("generation") or 1) + 1
        data["metadata"]["resourceVersion"] = self._next_revision()

    def serve_crd(self, crd: dict) -> None:
        """Serve a CustomResourceDefinition's resource, as the API server does once it is established."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = f"{spec['group']}/{version['name']}/{names['plural']}"
            info = self.resources[resource]
            info.kind, info.singular = names["kind"], names.get("singular", names["kind"].lower())
            info.shortnames = set(names.get("shortNames", []))
            info.categories = set(names.get("categories", []))
            info.namespaced = spec.get("scope", "Namespaced") == "Namespaced"
            info.verbs = {"create", "delete", "get", "list", "patch", "update", "watch"}
            info.subresources = set((version.get("subresources") or {}).keys())
            self.printer_columns[(spec["group"], names["plural"])] = version.get("additionalPrinterColumns", [])

    # -- reads ------------------------------------------------------------------------------------
    async def _serve_version(self, request) -> kmock.Payload:
        listing = await super()._serve_version(request)
        for entry in listing["resources"]:
            if "/" in entry["name"]:  # subresources have no short names or categories of their own
                entry["shortNames"], entry["categories"] = [], []
        return listing

    def _matching(self, request) -> list[dict]:
        labels = label_selector(request.params.get("labelSelector"))
        fields = field_selector(request.params.get("fieldSelector"))
        return [o.raw for (resource, namespace, name), o in list(self.objects.items())
                if resource == request.resource and not o.deleted
                and (request.namespace is None or namespace == request.namespace)
                and (request.name is None or name == request.name)
                and labels(o.raw) and fields(o.raw)]

    def _render(self, request, items: list[dict]) -> dict:
        if wants_table(request.headers.get("Accept", "")):
            columns = self.printer_columns.get((request.resource.group, request.resource.plural))
            return to_table(items, columns, str(self.revision))
        info = self.resources[request.resource]
        return {"kind": f"{info.kind or request.resource.plural.capitalize()}List",
                "apiVersion": _group_version(request.resource),
                "metadata": {"resourceVersion": str(self.revision)}, "items": items}

    async def _serve_list(self, request) -> kmock.Payload:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = self._matching(request)
        return self._render(request, sorted(items, key=lambda o: (o["metadata"].get("namespace") or "",
                                                                  o["metadata"]["name"])))

    async def _serve_fetch(self, request) -> kmock.Payload:
        found = await super()._serve_fetch(request)
        if wants_table(request.headers.get("Accept", "")):
            columns = self.printer_columns.get((request.resource.group, request.resource.plural))
            return to_table([found], columns, str(self.revision))
        return found

    async def _serve_watch(self, request) -> aiohttp.web.StreamResponse:
        """A JSON event stream (kmock's is untyped octet-stream, which client-go refuses), with the
        bookmark that ends the initial events when the client asks for them (sendInitialEvents)."""
        labels = label_selector(request.params.get("labelSelector"))
        fields = field_selector(request.params.get("fieldSelector"))
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)

        async def send(event: dict) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        try:
            async with self._lock:
                initial = self._matching(request)
            for obj in initial:
                await send({"type": "ADDED", "object": obj})
            if request.params.get("sendInitialEvents") == "true":
                info = self.resources[request.resource]
                await send({"type": "BOOKMARK", "object": {
                    "kind": info.kind, "apiVersion": _group_version(request.resource),
                    "metadata": {"resourceVersion": str(self.revision),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}})
            async for event in self._buses[request.resource]:
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                if ((request.namespace is None or meta.get("namespace") == request.namespace)
                        and (request.name is None or meta.get("name") == request.name)
                        and labels(obj) and fields(obj)):
                    await send(event)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away
        return response

    # -- OpenAPI v3 ---------------------------------------------------------------------------------
    # kubectl reads it to learn that the server validates fields itself (the `fieldValidation` query
    # parameter on PATCH); without it, `kubectl apply` refuses to send anything.
    async def _serve_openapi_root(self, request) -> kmock.Payload:
        versions = {_group_version(r) for r in self._get_resources() if r.version}
        return {"paths": {("api/" if "/" not in gv else "apis/") + gv:
                          {"serverRelativeURL": f"/openapi/v3/{'api' if '/' not in gv else 'apis'}/{gv}"}
                          for gv in sorted(versions)}}

    async def _serve_openapi_group_version(self, request) -> kmock.Payload:
        gv = request.url.path.split("/", 4)[4]
        paths = {}
        for resource in self._get_resources():
            info = self.resources[resource]
            if _group_version(resource) != gv or not info.kind:
                continue
            prefix = f"/apis/{gv}" if resource.group else f"/api/{gv}"
            scope = "/namespaces/{namespace}" if info.namespaced else ""
            gvk = {"group": resource.group, "version": resource.version, "kind": info.kind}
            paths[f"{prefix}{scope}/{resource.plural}/{{name}}"] = {"patch": {
                "x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "patch",
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]}}
        return {"openapi": "3.0.0", "info": {"title": "kubetune local API", "version": gv}, "paths": paths,
                "components": {"schemas": {}}}
