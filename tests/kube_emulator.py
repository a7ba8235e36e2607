"""The Kubernetes API emulator for operator tests: kmock's KubernetesEmulator plus the parts of the
real API server the operator relies on, kept small and faithful:

- creation assigns metadata.name from generateName, and metadata.uid, resourceVersion, creationTimestamp and generation;
- every merge-patch write bumps resourceVersion; a change of spec bumps generation;
- resources with a status subresource split writes: the main resource ignores `status`, and
  `/status` changes nothing but `status`.
"""

from __future__ import annotations

import datetime
import itertools
import uuid

from kmock import KubernetesEmulator

WITH_STATUS = {"finetunejobs", "loraadapters", "jobs", "pods"}
_versions = itertools.count(1000)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class ApiEmulator(KubernetesEmulator):
    async def _handle(self, request):
        data = request.data
        if request.resource is not None and isinstance(data, dict) and request.action is not None:
            action = request.action.name
            plural = request.resource.plural
            meta = data.setdefault("metadata", {})
            if action == "CREATE":
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(_versions)),
                            creationTimestamp=_now(), generation=1)
            elif action == "UPDATE" and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key] if key in self.objects else None
                if plural in WITH_STATUS and request.subresource == "status":
                    for key in [k for k in data if k not in ("status", "metadata")]:
                        del data[key]
                    data["metadata"] = {}
                elif plural in WITH_STATUS:
                    data.pop("status", None)
                if current is not None and not current.deleted:
                    spec = data.get("spec")
                    merged = _merged(current.raw.get("spec") or {}, spec) if isinstance(spec, dict) else None
                    if merged is not None and merged != current.raw.get("spec"):
                        data["metadata"]["generation"] = (current.raw["metadata"].get("generation") or 1) + 1
                data["metadata"]["resourceVersion"] = str(next(_versions))
        return await super()._handle(request)


def _merged(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        out[key] = _merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out
