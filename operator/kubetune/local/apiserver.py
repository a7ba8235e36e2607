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
import itertools
import json
import re
import uuid

import aiohttp.web
import kmock
from kmock import KubernetesEmulator, KubernetesScaffold

from kubetune.local.selectors import field_selector, label_selector
from kubetune.local.tables import to_table, wants_table

WITH_STATUS = {"finetunejobs", "loraadapters", "jobs", "pods", "customresourcedefinitions"}
CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
NAMESPACE_LIST = re.compile(r"^/api/v1/namespaces/?$")
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
    """Use as kmock's handler: `async with ApiServer() as api, kmock.Server(api): ...`.

    kmock keeps every request and every version of every object for assertions, and matches each
    new request against that log; a long-running stack keeps only the most recent
    `request_log_limit` requests and `history_limit` versions of each object, so that a request
    costs the same and memory stays flat after a day of status patches (tests leave both unlimited
    to assert on what was sent)."""

    request_log_limit: int | None = None
    history_limit: int | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.revisions = itertools.count(1000)
        self.revision = 1000
        self.printer_columns: dict[tuple[str, str], list[dict]] = {}
        self.created_namespaces: set[str] = set()
        self.faults: list[list] = []
        self.watch_drops: set[asyncio.Event] = set()
        self.resources.load_bundled()
        for name in BUILTINS:
            self.resources[name].verbs = {"create", "delete", "get", "list", "patch", "update", "watch"}
        self.fallback["get /openapi/v3"] << self._serve_openapi_root
        self.fallback["get", re.compile(r"/openapi/v3/apis?/.+")] << self._serve_openapi_group_version

    # -- fault injection, for the fault tests ------------------------------------------------------
    def inject(self, method: str, path: str, status: int, times: int = 1) -> None:
        """Answer the next `times` requests whose method matches and whose path matches the regex
        `path` with an error of `status`, as an overloaded or restarting API server would."""
        self.faults.append([method.upper(), re.compile(path), status, times])

    def drop_watches(self) -> int:
        """End every open watch stream, as an API server restart or a load balancer timeout does."""
        drops = list(self.watch_drops)
        for drop in drops:
            drop.set()
        return len(drops)

    def _fault(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.Response | None:
        for fault in self.faults:
            method, path, status, times = fault
            if times > 0 and raw_request.method == method and path.search(raw_request.path):
                fault[3] -= 1
                return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                                  "code": status, "reason": "InjectedFault",
                                                  "message": f"injected {status}"}, status=status)
        return None

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if (fault := self._fault(raw_request)) is not None:
            return fault
        if raw_request.method == "GET" and NAMESPACE_LIST.match(raw_request.path):
            return await self._serve_namespaces(raw_request)
        if raw_request.method == "POST" and NAMESPACE_LIST.match(raw_request.path):
            body = await raw_request.json()
            self.created_namespaces.add(body["metadata"]["name"])
            return aiohttp.web.json_response({**body, "status": {"phase": "Active"}}, status=201)
        return await super().__call__(raw_request)

    def _namespaces(self) -> list[str]:
        return sorted({"default"} | self.created_namespaces
                      | {ns for (_, ns, _), o in list(self.objects.items()) if ns and not o.deleted})

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Namespaces: default, those created, and every one that holds an object. (kmock cannot
        route the cluster-scoped /api/v1/namespaces, which Kopf lists to find what to watch.)"""
        def namespace(name: str) -> dict:
            return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                    "status": {"phase": "Active"}}
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response({"kind": "NamespaceList", "apiVersion": "v1",
                                              "metadata": {"resourceVersion": str(self.revision)},
                                              "items": [namespace(n) for n in self._namespaces()]})
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        sent: set[str] = set()
        try:
            while True:
                for name in self._namespaces():
                    if name not in sent:
                        sent.add(name)
                        await response.write(json.dumps({"type": "ADDED", "object": namespace(name)}).encode() + b"\n")
                await asyncio.sleep(1)
        except (ConnectionError, asyncio.CancelledError):
            return response

    def _next_revision(self) -> str:
        self.revision = next(self.revisions)
        return str(self.revision)

    # -- writes -----------------------------------------------------------------------------------
    async def _handle(self, request):
        if self.request_log_limit and len(self._requests) > self.request_log_limit:
            del self._requests[: -self.request_log_limit // 2]
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
        response = await super()._handle(request)
        key = (request.resource, request.namespace, request.name)
        if self.history_limit and request.name is not None and request.resource is not None and key in self.objects:
            history = self.objects[key].history
            if len(history) > self.history_limit:
                del history[:-self.history_limit]
        return response

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
        assert isinstance(listing, dict)  # kmock's APIResourceList
        listing["groupVersion"] = _group_version(request.resource)  # "v1" for the core group, not "/v1"
        for entry in listing["resources"]:
            if "/" in entry["name"]:  # subresources have no short names or categories of their own
                entry["shortNames"], entry["categories"] = [], []
        return listing

    def _matching(self, request) -> list[dict]:
        labels = label_selector(request.params.get("labelSelector"))
        fields = field_selector(request.params.get("fieldSelector"))
        group, plural = request.resource.group, request.resource.plural
        found = []
        for (resource, namespace, name), o in list(self.objects.items()):
            # Plain string comparisons first: this runs over every object on every list.
            if resource.plural != plural or resource.group != group or o.deleted:
                continue
            if (request.namespace is None or namespace == request.namespace) and (
                    request.name is None or name == request.name):
                raw = o.raw
                if labels(raw) and fields(raw):
                    found.append(raw)
        return found

    def _render(self, request, items: list[dict]) -> dict:
        if wants_table(request.headers.get("Accept", "")):
            columns = self.printer_columns.get((request.resource.group, request.resource.plural))
            return to_table(items, columns, str(self.revision))
        info = self.resources[request.resource]
        return {"kind": f"{info.kind or request.resource.plural.capitalize()}List",
                "apiVersion": _group_version(request.resource),
                "metadata": {"resourceVersion": str(self.revision)}, "items": items}

    # kmock finds an object by scanning them all; these look it up by key, so a request costs the
    # same with ten objects as with ten thousand.
    def _object(self, request, namespace: str | None = None, name: str | None = None):
        key = (request.resource, namespace or request.namespace, name or request.name)
        return self.objects[key] if key in self.objects else None

    async def _serve_create(self, request) -> kmock.Payload:
        meta = request.data.get("metadata", {})
        return self._object(request, meta.get("namespace"), meta.get("name")).raw

    async def _serve_update(self, request) -> kmock.Payload:
        return self._object(request).last.raw

    async def _serve_delete(self, request) -> kmock.Payload:
        return self._object(request).last.raw

    async def _serve_list(self, request) -> kmock.Payload:
        if request.resource not in KubernetesScaffold._get_resources(self):  # declared ones: no object scan
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = self._matching(request)
        return self._render(request, sorted(items, key=lambda o: (o["metadata"].get("namespace") or "",
                                                                  o["metadata"]["name"])))

    async def _serve_fetch(self, request) -> kmock.Payload:
        obj = self._object(request)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        found = obj.raw
        if wants_table(request.headers.get("Accept", "")):
            columns = self.printer_columns.get((request.resource.group, request.resource.plural))
            return to_table([found], columns, str(self.revision))
        return found

    # The ignore: kmock's is an async generator of payloads; kmock serves a handler's own aiohttp
    # response just as well, and this one must set headers that a payload cannot.
    async def _serve_watch(self, request) -> aiohttp.web.StreamResponse:  # type: ignore[override]
        """A JSON event stream (kmock's is untyped octet-stream, which client-go refuses), with the
        bookmark that ends the initial events when the client asks for them (sendInitialEvents)."""
        labels = label_selector(request.params.get("labelSelector"))
        fields = field_selector(request.params.get("fieldSelector"))
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request._raw_request)
        dropped = asyncio.Event()
        self.watch_drops.add(dropped)

        async def send(event: dict) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        following = drop = mark = None
        bus = self._buses[request.resource]
        try:
            # The follow position is taken with the snapshot, under the lock writers publish under:
            # an object created while the initial events are being sent is in one or the other.
            async with self._lock:
                mark = await bus.mark()
                initial = self._matching(request)
            for obj in initial:
                await send({"type": "ADDED", "object": obj})
            if request.params.get("sendInitialEvents") == "true":
                info = self.resources[request.resource]
                await send({"type": "BOOKMARK", "object": {
                    "kind": info.kind, "apiVersion": _group_version(request.resource),
                    "metadata": {"resourceVersion": str(self.revision),
                                 "annotations": {"k8s.io/initial-events-end": "true"}}}})
            events = aiter(bus.stream(since=mark))
            while True:
                following = asyncio.ensure_future(anext(events))
                drop = asyncio.ensure_future(dropped.wait())
                done, _ = await asyncio.wait({following, drop}, return_when=asyncio.FIRST_COMPLETED)
                if drop in done:
                    following.cancel()
                    await response.write_eof()  # a clean end of stream: the client lists and watches again
                    break
                drop.cancel()
                event = following.result()
                obj = event.get("object") or {}
                meta = obj.get("metadata") or {}
                if ((request.namespace is None or meta.get("namespace") == request.namespace)
                        and (request.name is None or meta.get("name") == request.name)
                        and labels(obj) and fields(obj)):
                    await send(event)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the stream was dropped
        finally:
            self.watch_drops.discard(dropped)
            for waiting in (following, drop):
                if waiting is not None:
                    waiting.cancel()
            if mark is not None:
                await bus.unmark(mark)
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
