"""Registering a finished run as a LoraAdapter version.

A run never replaces what an adapter name already serves: the first run of a name creates
LoraAdapter NAME (version 1); a re-run of the job, or another job with the same
`output.adapterName`, creates NAME-v2, NAME-v3, ... as a new candidate, with an Event. What is in
production changes only through promotion. The same run is adopted, never registered twice.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.api import API_VERSION, FineTuneJob
from kubetune.controller.adapters import LABEL_ADAPTER
from kubetune.controller.jobs import LABEL_JOB, derived_name, run_output_uri
from kubetune.controller.kube import ApiError, KubeClient, path_for

REGISTRATION_ATTEMPTS = 5


def _artifact_uri(adapter: dict) -> str:
    return ((adapter.get("spec") or {}).get("artifact") or {}).get("uri", "")


def adapter_version(base: str, run_uri: str, existing: list[dict]) -> tuple[str, int, dict | None]:
    """(name, version, the adapter to adopt or None) for the run at run_uri, given the adapters that
    already exist under this adapter name or take one of its names."""
    for adapter in existing:
        if _artifact_uri(adapter) == run_uri:
            return adapter["metadata"]["name"], int(adapter["spec"].get("version", 1)), adapter
    ours = [a for a in existing if (a.get("spec") or {}).get("adapterName", a["metadata"]["name"]) == base]
    taken = {a["metadata"]["name"] for a in existing}
    version = max((int(a["spec"].get("version", 1)) for a in ours), default=0) + 1
    while True:
        name = base if version == 1 else derived_name(base, f"v{version}")
        if name not in taken:
            return name, version, None
        version += 1


def merge_request(ftj: FineTuneJob) -> dict[str, Any]:
    """The run's output.merge and output.gguf, as its LoraAdapter's merge Job does them: the training
    pods publish the adapter and give their GPUs back, and the merge runs on the CPU (or merge.gpus)
    at the precision the training pods would have merged at."""
    output = ftj.spec.output
    gguf = list(dict.fromkeys(output.gguf.types)) if output.gguf.enabled else []
    if not (output.merge or gguf):
        return {"enabled": False}
    return {"enabled": True, "dtype": "bfloat16" if ftj.spec.resources.gpus else "float32",
            **({"gguf": gguf} if gguf else {})}


def _adapter_object(ftj: FineTuneJob, name: str, base: str, version: int, manifest_sha256: str) -> dict[str, Any]:
    adapter: dict[str, Any] = {
        "apiVersion": API_VERSION, "kind": "LoraAdapter",
        "metadata": {"name": name, "namespace": ftj.metadata.namespace,
                     "labels": {LABEL_ADAPTER: base, LABEL_JOB: ftj.metadata.name},
                     "annotations": {"kubetune.dev/manifest-sha256": manifest_sha256}},
        "spec": {"adapterName": base, "version": version,
                 "baseModel": ftj.spec.base_model.model_dump(by_alias=True, exclude_none=True),
                 "artifact": {"uri": run_output_uri(ftj), **({"manifestSha256": manifest_sha256}
                                                             if manifest_sha256 else {})},
                 "merge": merge_request(ftj)},
    }
    if ftj.spec.storage:
        adapter["spec"]["storage"] = ftj.spec.storage.model_dump(by_alias=True)
    return adapter


async def ensure_adapter(client: KubeClient, body: dict, ftj: FineTuneJob, manifest_sha256: str) -> dict[str, str]:
    """The LoraAdapter of this finished run: adopted if an earlier reconcile registered it, else a
    new version of its adapter name."""
    namespace, base = ftj.metadata.namespace, ftj.spec.output.adapter_name or ftj.metadata.name
    collection = path_for(API_VERSION, "loraadapters", namespace)
    for _ in range(REGISTRATION_ATTEMPTS):
        existing = {a["metadata"]["name"]: a for a in await client.list(collection, {LABEL_ADAPTER: base})}
        plain = await client.get(f"{collection}/{base}")  # one made by hand may not carry the label yet
        if plain is not None:
            existing[base] = plain
        name, version, adopted = adapter_version(base, run_output_uri(ftj), list(existing.values()))
        if adopted is not None:
            return {"name": name, "uri": run_output_uri(ftj)}
        try:
            await client.create(collection, _adapter_object(ftj, name, base, version, manifest_sha256))
        except ApiError as exc:
            if exc.status != 409:
                raise
            continue  # another job registering under the same name took this version first: look again
        if version > 1:
            kopf.info(body, reason="AdapterVersionCreated",
                      message=f"LoraAdapter {name} is version {version} of {base}; earlier versions are unchanged")
        return {"name": name, "uri": run_output_uri(ftj)}
    raise kopf.TemporaryError(f"could not register a version of LoraAdapter {base}: names taken concurrently", delay=1)
