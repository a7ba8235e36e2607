"""Reconciling one LoraAdapter: verify the artifact against its manifest, gate promotion, record
metrics, lineage and serving hints. Verification downloads every file once per generation; the
result is kept in the Verified condition."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import kopf

from kubetune.api import API_VERSION, LoraAdapter
from kubetune.api.loraadapter import Threshold
from kubetune.api.meta import now_rfc3339
from kubetune.api.uris import parse_uri
from kubetune.api.validation import validate_object
from kubetune.controller.kube import KubeClient, path_for
from kubetune.controller.merging import LABEL_ADAPTER_OWNER, build_merge_objects, merge_job_name
from kubetune.controller.objects import create_or_adopt
from kubetune.controller.secrets import NotReady, storage_config
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.status import failure_message, set_condition
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.location import ObjectMissing, open_location
from kubetune.storage.manifest import MANIFEST, Manifest, verify

LABEL_ADAPTER = "kubetune.dev/adapter"
LABEL_STAGE = "kubetune.dev/stage"
MERGED = "merged"  # where a merge Job publishes, under the artifact


def adapter_path(namespace: str, name: str, sub: str | None = None) -> str:
    return path_for(API_VERSION, "loraadapters", namespace, name, sub)


async def write_adapter_status(client: KubeClient, namespace: str, name: str, generation: int | None,
                               patch: dict[str, Any]) -> None:
    await client.patch(adapter_path(namespace, name, "status"), {"status": {"observedGeneration": generation, **patch}})


def run_metrics(manifest: Manifest) -> dict[str, float]:
    """The final hold-out metrics by name, and the training figures as train.NAME."""
    metrics = manifest.metadata.get("metrics") or {}
    out = {k: float(v) for k, v in (metrics.get("final") or {}).items() if isinstance(v, (int, float))}
    out |= {f"train.{k}": float(v) for k, v in (metrics.get("train") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def gate_violations(gate: list[Threshold], metrics: dict[str, float]) -> list[str]:
    problems = []
    for t in gate:
        value = metrics.get(t.metric)
        if value is None:
            problems.append(f"{t.metric} is not among the run's metrics")
        elif t.min is not None and value < t.min:
            problems.append(f"{t.metric} {value:g} < min {t.min:g}")
        elif t.max is not None and value > t.max:
            problems.append(f"{t.metric} {value:g} > max {t.max:g}")
    return problems


def serving_hints(name: str, adapter_uri: str, base_uri: str) -> dict[str, str]:
    return {
        "vllm": f"vllm serve BASE_DIR --enable-lora --max-lora-rank R --lora-modules {name}=ADAPTER_DIR "
                f"(BASE_DIR: a copy of {base_uri}; ADAPTER_DIR: a copy of {adapter_uri})",
        "peft": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), ADAPTER_DIR)",
    }


def _verify(uri: str, storage, expected_sha256: str | None) -> tuple[Manifest, list[str]]:
    location = open_location(uri, storage=storage, volume_root=Path("/nonexistent"), retry_budget_s=30)
    try:
        data = location.get_bytes(MANIFEST)
    except ObjectMissing:
        return Manifest("RunManifest", []), [f"{MANIFEST}: missing"]
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        return Manifest.from_json(data), [f"{MANIFEST}: sha256 differs from spec.artifact.manifestSha256"]
    manifest = Manifest.from_json(data)
    return manifest, verify(location, manifest)


async def reconcile_adapter(client: KubeClient, settings: OperatorSettings, body: dict) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    now = now_rfc3339()
    conditions = status.get("conditions") or []

    async def write(patch: dict[str, Any]) -> None:
        await write_adapter_status(client, namespace, name, generation, patch)

    resource, problems = validate_object({k: v for k, v in body.items() if k != "status"})
    if problems:
        message = "; ".join(f"{p.path}: {p.message}" for p in problems)
        conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", message, generation, now)
        await write({"phase": "Failed", "message": message, "conditions": conditions})
        kopf.warn(body, reason="InvalidSpec", message=message)
        return
    adapter: LoraAdapter = resource  # type: ignore[assignment]
    spec = adapter.spec
    verified = next((c for c in conditions if c["type"] == "Verified"), None)
    patch: dict[str, Any] = {}
    if not (verified and verified["status"] == "True" and verified.get("observedGeneration") == generation):
        if parse_uri(spec.artifact.uri).scheme != "s3":
            # The operator mounts no volumes: pvc:// artifacts were checked by the trainer as it published them.
            conditions = set_condition(conditions, "Verified", "Unknown", "NotReadableByOperator",
                                       "pvc:// artifacts are verified by the trainer at publication", generation, now)
        else:
            await write({"phase": "Verifying"})
            try:
                storage = await storage_config(client, namespace, spec.storage)
                manifest, problems = await asyncio.to_thread(_verify, spec.artifact.uri, storage,
                                                             spec.artifact.manifest_sha256)
            except (NotReady, StorageUnavailable) as exc:
                reason, message = (exc.reason, exc.message) if isinstance(exc, NotReady) else (
                    "StorageUnavailable", str(exc))
                conditions = set_condition(conditions, "Verified", "Unknown", reason, message, generation, now)
                await write({"phase": "Pending", "message": message, "conditions": conditions})
                kopf.warn(body, reason=reason, message=message)
                raise kopf.TemporaryError(message, delay=10) from exc
            if problems:
                message = "artifact does not match its manifest: " + "; ".join(problems)
                conditions = set_condition(conditions, "Verified", "False", "ChecksumMismatch", message,
                                           generation, now)
                conditions = set_condition(conditions, "Ready", "False", "NotVerified", message, generation, now)
                await write({"phase": "Failed", "message": message, "conditions": conditions})
                kopf.warn(body, reason="VerificationFailed", message=message)
                return
            conditions = set_condition(conditions, "Verified", "True", "ChecksumsMatch",
                                       f"{len(manifest.files)} files, {manifest.total_size:,d} bytes match "
                                       "their sha256", generation, now)
            kopf.info(body, reason="Verified", message=f"{len(manifest.files)} files match the manifest")
            lineage = manifest.metadata.get("lineage") or {}
            layout = manifest.metadata.get("layout") or {}
            adapter_uri = f"{spec.artifact.uri}/{layout.get('adapter') or 'adapter'}"
            patch |= {"metrics": run_metrics(manifest), "adapterUri": adapter_uri,
                      "lineage": {k: lineage.get(k) for k in ("fineTuneJob", "datasetUri", "datasetSha256",
                                                              "baseModelUri", "baseModelRevision", "trainerImage")},
                      "serving": serving_hints(spec.adapter_name or name, adapter_uri, spec.base_model.uri)}
            if layout.get("merged"):
                patch["mergedModelUri"] = f"{spec.artifact.uri}/{layout['merged']}"
    if spec.merge.enabled and not (patch.get("mergedModelUri") or status.get("mergedModelUri")):
        merged_uri, conditions = await _merged(client, settings, body, adapter, conditions, generation, now)
        if merged_uri is None:
            return  # the merge Job runs (or failed, recorded): its events bring us back
        patch["mergedModelUri"] = merged_uri
    metrics = patch.get("metrics", status.get("metrics") or {})
    stage, conditions = _promote(spec.stage, status.get("stage") or "candidate", spec.evaluation_gate, metrics,
                                 conditions, generation, now, body)
    # Labels first: once Ready is visible, `-l kubetune.dev/stage=production` finds it too.
    labels = meta.get("labels") or {}
    wanted = {LABEL_ADAPTER: spec.adapter_name or name, LABEL_STAGE: stage}
    if any(labels.get(k) != v for k, v in wanted.items()):
        await client.patch(adapter_path(namespace, name), {"metadata": {"labels": wanted}})
    conditions = set_condition(conditions, "Ready", "True", "Verified", "", generation, now)
    await write({**patch, "phase": "Ready", "message": "", "stage": stage, "conditions": conditions})


async def _merged(client: KubeClient, settings: OperatorSettings, body: dict, adapter: LoraAdapter,
                  conditions: list[dict], generation: int | None, now: str) -> tuple[str | None, list[dict]]:
    """The merged model's URI once a merge Job has published and it verifies; until then, run the
    Job and record Merging (or its failure)."""
    namespace, name = adapter.metadata.namespace, adapter.metadata.name

    async def write(patch: dict[str, Any]) -> None:
        await write_adapter_status(client, namespace, name, generation, patch)
    merged_uri = f"{adapter.spec.artifact.uri}/{MERGED}"
    problems: list[str] = []
    if parse_uri(merged_uri).scheme == "s3":
        storage = await storage_config(client, namespace, adapter.spec.storage)
        manifest, problems = await asyncio.to_thread(_verify, merged_uri, storage, None)
        if not problems:
            message = f"{len(manifest.files)} files, {manifest.total_size:,d} bytes match their sha256"
            return merged_uri, set_condition(conditions, "Merged", "True", "MergedModelVerified", message,
                                             generation, now)
    jobs = path_for("batch/v1", "jobs", namespace)
    job = await client.get(f"{jobs}/{merge_job_name(name)}")
    if job is None:
        configmap, job = build_merge_objects(adapter, settings)
        await create_or_adopt(client, path_for("v1", "configmaps", namespace), configmap)
        job, created = await create_or_adopt(client, jobs, job)
        if created:
            kopf.info(body, reason="MergeJobCreated", message=f"created Job {merge_job_name(name)}")
    finished = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                if c.get("status") == "True" and c.get("type") in ("Complete", "Failed")}
    if finished:
        if "Complete" in finished:  # it published, yet what it published does not verify
            reason, message = "MergedModelInvalid", "the merged model does not match its manifest: " + "; ".join(problems)
        else:
            pods = await client.list(path_for("v1", "pods", namespace), {LABEL_ADAPTER_OWNER: name})
            reason, detail = failure_message(pods[-1]) if pods else (finished["Failed"].get("reason", "MergeFailed"), "")
            message = f"the merge Job failed: {detail or finished['Failed'].get('message', '')}"
        conditions = set_condition(conditions, "Merged", "False", reason, message, generation, now)
        conditions = set_condition(conditions, "Ready", "False", "MergeFailed", message, generation, now)
        await write({"phase": "Failed", "message": message, "conditions": conditions})
        kopf.warn(body, reason="MergeFailed", message=message)
        return None, conditions
    conditions = set_condition(conditions, "Merged", "False", "MergeRunning",
                               f"Job {merge_job_name(name)} merges the adapter into its base", generation, now)
    await write({"phase": "Merging", "message": "", "conditions": conditions})
    return None, conditions


def _promote(requested: str, current: str, gate: list[Threshold], metrics: dict[str, float], conditions: list[dict],
             generation: int | None, now: str, body: dict) -> tuple[str, list[dict]]:
    """The stage in force: the requested one, unless promotion to production fails the gate."""
    if requested == "production" and current != "production":
        problems = gate_violations(gate, metrics)
        if problems:
            message = f"promotion to production blocked, stays {current}: " + "; ".join(problems)
            if next((c for c in conditions if c["type"] == "Promoted" and c.get("message") == message), None) is None:
                kopf.warn(body, reason="PromotionBlocked", message=message)
            return current, set_condition(conditions, "Promoted", "False", "GateBlocked", message, generation, now)
    if requested != current:
        kopf.info(body, reason="Promoted", message=f"{current} -> {requested}")
    return requested, set_condition(conditions, "Promoted", "True", "StageSet", f"stage {requested}", generation, now)


def adapters_table(adapters: list[dict], *, production_only: bool = False) -> str:
    """`kubetune adapters list`: one line per version, grouped by adapter name, newest first."""
    rows = []
    for a in adapters:
        spec, status = a.get("spec") or {}, a.get("status") or {}
        if production_only and status.get("stage") != "production":
            continue
        rows.append((spec.get("adapterName") or a["metadata"]["name"], -int(spec.get("version", 1)),
                     a["metadata"]["name"], status.get("stage") or "-", status.get("phase") or "Pending",
                     status.get("adapterUri") or (spec.get("artifact") or {}).get("uri", "")))
    lines = [("ADAPTER", "VERSION", "RESOURCE", "STAGE", "PHASE", "ADAPTER URI")]
    lines += [(n, str(-v), r, st, ph, uri) for n, v, r, st, ph, uri in sorted(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:5], widths)) + "  " + line[5] for line in lines)


async def delete_artifacts(client: KubeClient, body: dict) -> None:
    """deletionPolicy Delete: the run's objects go with the resource (Retain keeps them)."""
    spec = body.get("spec") or {}
    if spec.get("deletionPolicy") != "Delete" or not str((spec.get("artifact") or {}).get("uri", "")).startswith("s3://"):
        return
    adapter = LoraAdapter.model_validate(body)
    storage = await storage_config(client, body["metadata"]["namespace"], adapter.spec.storage)
    location = open_location(adapter.spec.artifact.uri, storage=storage, volume_root=Path("/nonexistent"))
    # The manifest first: from then on no reader trusts what remains, even if the rest fails half-way.
    removed = await asyncio.to_thread(location.delete_prefix, MANIFEST)
    removed += await asyncio.to_thread(location.delete_prefix, "")
    kopf.info(body, reason="ArtifactsDeleted", message=f"deleted {removed} objects under {adapter.spec.artifact.uri}")
