"""Reconciling one LoraAdapter: verify the artifact against its manifest, gate promotion, record
metrics, lineage and serving hints. Verification downloads every file once per generation; the
result is kept in the Verified condition."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from kubetune.api import API_VERSION, LoraAdapter
from kubetune.api.loraadapter import Threshold
from kubetune.api.meta import now_rfc3339
from kubetune.api.uris import parse_uri
from kubetune.api.validation import validate_object
from kubetune.contract import MERGED_DIR
from kubetune.controller.artifacts import RUN_MANIFEST, UnsafeManifest, deletion_keys, fingerprint
from kubetune.controller.kube import KubeClient, path_for
from kubetune.controller.merging import build_merge_objects, build_verify_objects, merge_job_name, verify_job_name
from kubetune.controller.objects import create_or_adopt
from kubetune.controller.secrets import NotReady, storage_config
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.status import (
    MESSAGE_LIMIT,
    capped,
    failure_message,
    job_outcome,
    join_problems,
    set_condition,
    termination,
)
from kubetune.serving import publication
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.location import Location, ObjectMissing, open_location
from kubetune.storage.manifest import MANIFEST, Manifest, listing_problems

LABEL_ADAPTER = "kubetune.dev/adapter"
LABEL_STAGE = "kubetune.dev/stage"
MODEL_MANIFEST = "ModelManifest"  # what a merge Job publishes


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


@dataclass
class Verification:
    manifest: Manifest
    problems: list[str]
    reason: str = "ListingVerified"  # or ChecksumMismatch, NotARunManifest
    manifest_sha256: str = ""
    fingerprint: str = ""


def _location(uri: str, storage, retry_budget_s: float = 30) -> Location:
    return open_location(uri, storage=storage, volume_root=Path("/nonexistent"), retry_budget_s=retry_budget_s)


def _verify(uri: str, storage, expected_sha256: str | None, kind: str = RUN_MANIFEST) -> Verification:
    """The operator's check, one GET and one listing whatever the artifact's size: the manifest's
    sha256 against the pinned one, its kind, and every listed file's presence and size. Hashing the
    content is the verification Job's (build_verify_objects)."""
    location = _location(uri, storage)
    try:
        data = location.get_bytes(MANIFEST)
    except ObjectMissing:
        return Verification(Manifest(kind, []), [f"{MANIFEST}: missing"], "ChecksumMismatch")
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        return Verification(Manifest(kind, []), [f"{MANIFEST}: sha256 differs from spec.artifact.manifestSha256"],
                            "ChecksumMismatch", digest)
    try:
        manifest = Manifest.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:
        return Verification(Manifest(kind, []), [f"{MANIFEST}: not a manifest ({exc})"], "ChecksumMismatch", digest)
    if manifest.kind != kind:
        # A model copy or a checkpoint has a manifest too: verifying it as an adapter would make
        # the adapter own (and, with deletionPolicy Delete, delete) what another resource uses.
        return Verification(manifest, [f"{MANIFEST} is a {manifest.kind}, not a {kind}"], "NotARunManifest", digest)
    listing = location.list()
    problems = listing_problems(manifest, listing)
    return Verification(manifest, problems, "ChecksumMismatch" if problems else "ListingVerified", digest,
                        "" if problems else fingerprint(digest, manifest.files, listing))


def _unchanged(uri: str, storage, expected: str) -> bool:
    """The periodic check: the manifest's sha256 and the listing's sizes and ETags, no download of
    the files themselves."""
    location = _location(uri, storage)
    try:
        data = location.get_bytes(MANIFEST)
        manifest = Manifest.from_json(data)
    except (ObjectMissing, ValueError, KeyError, TypeError):
        return False
    return fingerprint(hashlib.sha256(data).hexdigest(), manifest.files, location.list()) == expected


def _condition(conditions: list[dict], type_: str) -> dict:
    return next((c for c in conditions if c.get("type") == type_), {})


def _content_pending(conditions: list[dict]) -> bool:
    """Whether the artifact was checked only by listing, its content not hashed yet."""
    verified = _condition(conditions, "Verified")
    return verified.get("status") == "True" and verified.get("reason") == "ListingVerified"


def content_report(job: dict, pods: list[dict]) -> dict | None:
    """What a finished verification Job found, from its pod's termination message: None while it
    runs, {"failed": (reason, message)} if it could not verify (storage unreachable, out of memory),
    else the report run_verify writes (fingerprint, files, bytes, problems)."""
    finished = job_outcome(job.get("status"))
    if "Complete" in finished:
        reports = [m for p in pods if (m := termination(p)[2]).get("fingerprint") is not None]
        if reports:
            return reports[-1]
        return {"failed": ("VerifyReportMissing", "the Job completed without a report in its termination message")}
    if "Failed" in finished:
        return {"failed": failure_message(pods[-1]) if pods else ("VerifyJobFailed", "the Job failed")}
    return None


async def _job_of(client: KubeClient, body: dict, job_name: str, created_reason: str,
                  build: Callable[[], tuple[dict, dict]]) -> dict:
    """An adapter's merge or verification Job: the one that exists (a restarted operator adopts it),
    else created with its spec ConfigMap from build()."""
    namespace = body["metadata"]["namespace"]
    jobs = path_for("batch/v1", "jobs", namespace)
    job = await client.get(f"{jobs}/{job_name}")
    if job is None:
        configmap, desired = build()
        await create_or_adopt(client, path_for("v1", "configmaps", namespace), configmap)
        job, created = await create_or_adopt(client, jobs, desired)
        if created:
            kopf.info(body, reason=created_reason, message=f"created Job {job_name}")
    return job


async def _content_checked(client: KubeClient, settings: OperatorSettings, body: dict, adapter: LoraAdapter,
                           status: dict, conditions: list[dict], generation: int | None,
                           now: str) -> tuple[list[dict], str]:
    """Run (or adopt) the verification Job for the listing the operator checked, and fold its
    report into the Verified condition; the problems it found ("" if none, or not known yet)."""
    namespace, name = body["metadata"]["namespace"], adapter.metadata.name
    fingerprint_ = status.get("artifactFingerprint") or ""
    job_name = verify_job_name(name, fingerprint_)
    job = await _job_of(client, body, job_name, "VerifyJobCreated", lambda: build_verify_objects(
        adapter, settings, status.get("verifiedManifestSha256") or "", fingerprint_))
    pods = await client.list(path_for("v1", "pods", namespace), {"batch.kubernetes.io/job-name": job_name})
    report = content_report(job, pods)
    verified = _condition(conditions, "Verified")
    if report is None:
        return conditions, ""
    if "failed" in report:
        reason, detail = report["failed"]
        message = (f"the manifest's sha256 and every file's size match; the content check (Job {job_name}) failed: "
                   f"{reason}: {detail} (delete the Job to run it again)")
        if verified.get("message") != message:
            kopf.warn(body, reason="VerifyJobFailed", message=message)
        return set_condition(conditions, "Verified", "True", "ListingVerified", message, generation, now), ""
    if report["fingerprint"] != fingerprint_:
        # The objects hashed are not the ones listed: the periodic check sees the new listing and verifies again.
        message = f"the artifact changed while Job {job_name} hashed it; it is verified again"
        return set_condition(conditions, "Verified", "True", "ListingVerified", message, generation, now), ""
    if report["problems"]:
        return conditions, report["problems"]
    kopf.info(body, reason="ContentVerified", message=f"Job {job_name}: {report['files']} files match their sha256")
    return set_condition(conditions, "Verified", "True", "ContentVerified",
                         f"{report['files']} files, {report['bytes']:,d} bytes match their sha256 (Job {job_name})",
                         generation, now), ""


async def reconcile_adapter(client: KubeClient, settings: OperatorSettings, body: dict) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    now = now_rfc3339()
    conditions = status.get("conditions") or []

    async def write(patch: dict[str, Any]) -> None:
        await write_adapter_status(client, namespace, name, generation, patch)

    resource, problems = validate_object({k: v for k, v in body.items() if k != "status"})
    if problems:
        message = join_problems([f"{p.path}: {p.message}" for p in problems])
        conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", message, generation, now)
        await write({"phase": "Failed", "message": message, "conditions": conditions})
        kopf.warn(body, reason="InvalidSpec", message=message)
        return
    adapter: LoraAdapter = resource  # type: ignore[assignment]
    spec = adapter.spec
    verified = _condition(conditions, "Verified")
    patch: dict[str, Any] = {}

    async def fail(reason: str, problems: list[str]) -> None:
        """Verification failed: not Ready, out of production; nothing is deleted."""
        message = join_problems(problems, MESSAGE_LIMIT - 64)
        message = ("artifact does not match its manifest: " if reason == "ChecksumMismatch"
                   else "artifact is not a run's: ") + message
        failed = set_condition(conditions, "Verified", "False", reason, message, generation, now)
        failed = set_condition(failed, "Ready", "False", "NotVerified", message, generation, now)
        demoted = await _demote_failed(client, body, status)
        await write({"phase": "Failed", "message": capped(message), "conditions": failed, **demoted})
        kopf.warn(body, reason="VerificationFailed", message=message)

    if not (verified.get("status") == "True" and verified.get("observedGeneration") == generation):
        if parse_uri(spec.artifact.uri).scheme != "s3":
            # The operator mounts no volumes: pvc:// artifacts were checked by the trainer as it published them.
            conditions = set_condition(conditions, "Verified", "Unknown", "NotReadableByOperator",
                                       "pvc:// artifacts are verified by the trainer at publication", generation, now)
        else:
            await write({"phase": "Verifying"})
            try:
                storage = await storage_config(client, namespace, spec.storage)
                checked = await asyncio.to_thread(_verify, spec.artifact.uri, storage, spec.artifact.manifest_sha256)
            except (NotReady, StorageUnavailable) as exc:
                reason, message = (exc.reason, exc.message) if isinstance(exc, NotReady) else (
                    "StorageUnavailable", str(exc))
                conditions = set_condition(conditions, "Verified", "Unknown", reason, message, generation, now)
                await write({"phase": "Pending", "message": message, "conditions": conditions})
                kopf.warn(body, reason=reason, message=message)
                raise kopf.TemporaryError(message, delay=10) from exc
            manifest = checked.manifest
            if checked.problems:
                await fail(checked.reason, checked.problems)
                return
            conditions = set_condition(conditions, "Verified", "True", "ListingVerified",
                                       f"{len(manifest.files)} files, {manifest.total_size:,d} bytes: the manifest's "
                                       "sha256 and every file's size match; Job "
                                       f"{verify_job_name(name, checked.fingerprint)} hashes their content",
                                       generation, now)
            kopf.info(body, reason="Verified", message=f"{len(manifest.files)} files match the manifest's listing")
            lineage = manifest.metadata.get("lineage") or {}
            # Informational: an adapter vLLM cannot load still serves through PEFT (and Ollama).
            serving, compat = await asyncio.to_thread(publication.at_publication, spec.adapter_name or name,
                                                      spec.artifact.uri, spec.base_model.uri, manifest, storage)
            conditions = set_condition(conditions, "ServingCompatible", *publication.condition(compat),
                                       generation, now)
            layout = manifest.metadata.get("layout") or {}
            adapter_uri = f"{spec.artifact.uri}/{layout.get('adapter') or 'adapter'}"
            patch |= {"metrics": run_metrics(manifest), "adapterUri": adapter_uri,
                      "verifiedManifestSha256": checked.manifest_sha256, "artifactFingerprint": checked.fingerprint,
                      "lineage": {k: lineage.get(k) for k in ("fineTuneJob", "datasetUri", "datasetSha256",
                                                              "validationDatasetUri", "validationDatasetSha256",
                                                              "baseModelUri", "baseModelRevision", "trainerImage",
                                                              "objective")},
                      "serving": serving}
            if layout.get("merged"):
                patch["mergedModelUri"] = f"{spec.artifact.uri}/{layout['merged']}"
    if _content_pending(conditions):
        conditions, found = await _content_checked(client, settings, body, adapter, {**status, **patch},
                                                   conditions, generation, now)
        if found:
            await fail("ChecksumMismatch", [found])
            return
    if spec.merge.enabled and not (patch.get("mergedModelUri") or status.get("mergedModelUri")):
        merged, conditions = await _merged(client, settings, body, adapter, patch, conditions, generation, now)
        if merged is None:
            return  # the merge Job runs (or failed, recorded): its events bring us back
        patch["mergedModelUri"] = f"{spec.artifact.uri}/{MERGED_DIR}"
        ollama = publication.merged_ollama(spec.adapter_name or name, spec.artifact.uri, merged.get("gguf"))
        if ollama:
            patch["serving"] = {**(patch.get("serving") or status.get("serving") or {}), "ollama": ollama}
    metrics = patch["metrics"] if "metrics" in patch else (status.get("metrics") or {})
    stage, conditions = _promote(spec.stage, status.get("stage") or "candidate", spec.evaluation_gate, metrics,
                                 _content_pending(conditions), conditions, generation, now, body)
    # Labels first: once Ready is visible, `-l kubetune.dev/stage=production` finds it too.
    labels = meta.get("labels") or {}
    wanted = {LABEL_ADAPTER: spec.adapter_name or name, LABEL_STAGE: stage}
    if any(labels.get(k) != v for k, v in wanted.items()):
        await client.patch(adapter_path(namespace, name), {"metadata": {"labels": wanted}})
    conditions = set_condition(conditions, "Ready", "True", "Verified", "", generation, now)
    await write({**patch, "phase": "Ready", "message": "", "stage": stage, "conditions": conditions})


async def _merged(client: KubeClient, settings: OperatorSettings, body: dict, adapter: LoraAdapter,
                  verified: dict[str, Any], conditions: list[dict], generation: int | None,
                  now: str) -> tuple[dict[str, Any] | None, list[dict]]:
    """What the merged model's manifest records (its `gguf` export among it) once a merge Job has
    published and it verifies; until then, run the Job and record Merging (or its failure), with
    the verification's fields (verified)."""
    # the body's namespace, as reconcile_adapter reads it (the model's field is optional)
    namespace, name = body["metadata"]["namespace"], adapter.metadata.name

    async def write(patch: dict[str, Any]) -> None:
        await write_adapter_status(client, namespace, name, generation, {**verified, **patch})
    merged_uri = f"{adapter.spec.artifact.uri}/{MERGED_DIR}"
    problems: list[str] = []
    if parse_uri(merged_uri).scheme == "s3":
        storage = await storage_config(client, namespace, adapter.spec.storage)
        checked = await asyncio.to_thread(_verify, merged_uri, storage, None, MODEL_MANIFEST)
        manifest, problems = checked.manifest, checked.problems
        if not problems:
            # Listed, not hashed here: the merge Job computed each sha256 from the files it wrote.
            message = (f"{len(manifest.files)} files, {manifest.total_size:,d} bytes: the merged manifest's files "
                       "are all there at their sizes")
            return manifest.metadata, set_condition(conditions, "Merged", "True", "MergedModelVerified", message,
                                                    generation, now)
    job = await _job_of(client, body, merge_job_name(name), "MergeJobCreated",
                        lambda: build_merge_objects(adapter, settings))
    finished = job_outcome(job.get("status"))
    if finished:
        pods = await client.list(path_for("v1", "pods", namespace),
                                 {"batch.kubernetes.io/job-name": merge_job_name(name)})
        report = next((m for p in pods if (m := termination(p)[2]).get("manifestSha256")), None)
        if "Complete" in finished and report and parse_uri(merged_uri).scheme == "pvc":
            # The operator reads no claim (as for the run itself): the Job's report is the record.
            message = f"the merge Job published {report['manifest']} (sha256 {report['manifestSha256']})"
            return report, set_condition(conditions, "Merged", "True", "MergeJobReported", message, generation, now)
        if "Complete" in finished:  # it published, yet what it published does not verify
            reason = "MergedModelInvalid"
            message = "the merged model does not match its manifest: " + "; ".join(problems or ["no report"])
        else:
            reason, detail = (failure_message(pods[-1]) if pods
                              else (finished["Failed"].get("reason", "MergeFailed"), ""))
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


def stage_decision(requested: str, current: str, gate: list[Threshold],
                   metrics: dict[str, float]) -> tuple[str, list[str]]:
    """The stage in force and the gate's objections: production is entered, and kept, only while
    the gate passes; a gate tightened after promotion sends the adapter back to candidate."""
    problems = gate_violations(gate, metrics) if requested == "production" else []
    if problems:
        return ("candidate" if current == "production" else current), problems
    return requested, []


def _promote(requested: str, current: str, gate: list[Threshold], metrics: dict[str, float], content_pending: bool,
             conditions: list[dict], generation: int | None, now: str, body: dict) -> tuple[str, list[dict]]:
    stage, problems = stage_decision(requested, current, gate, metrics)
    if stage == "production" and content_pending:
        # Production serves what was hashed, not only listed: until the verification Job reports,
        # the adapter serves as a candidate (and a production one whose objects changed steps back).
        message = "production waits for the content check: " + _condition(conditions, "Verified")["message"]
        if current == "production":
            kopf.warn(body, reason="Demoted", message=f"production -> candidate: {message}")
        elif _condition(conditions, "Promoted").get("reason") != "ContentNotVerified":
            kopf.info(body, reason="PromotionWaiting", message=message)
        return "candidate", set_condition(conditions, "Promoted", "False", "ContentNotVerified", message, generation,
                                          now)
    if problems:
        verb = "demoted to" if current == "production" else "promotion to production blocked, stays"
        message = f"{verb} {stage}: " + "; ".join(problems)
        if next((c for c in conditions if c["type"] == "Promoted" and c.get("message") == message), None) is None:
            kopf.warn(body, reason="Demoted" if current == "production" else "PromotionBlocked", message=message)
        return stage, set_condition(conditions, "Promoted", "False", "GateBlocked", message, generation, now)
    if stage != current:
        kopf.info(body, reason="Promoted", message=f"{current} -> {stage}")
    return stage, set_condition(conditions, "Promoted", "True", "StageSet", f"stage {stage}", generation, now)


async def _demote_failed(client: KubeClient, body: dict, status: dict) -> dict[str, Any]:
    """A production adapter that fails verification leaves production at once: its stage label goes
    (so `-l kubetune.dev/stage=production` no longer finds it) and its stage in force is cleared;
    passing verification again re-applies the gate. The status fields to write."""
    meta = body["metadata"]
    labels = meta.get("labels") or {}
    if labels.get(LABEL_STAGE) != "production" and status.get("stage") != "production":
        return {}
    await client.patch(adapter_path(meta["namespace"], meta["name"]), {"metadata": {"labels": {LABEL_STAGE: None}}})
    kopf.warn(body, reason="Demoted", message="production -> none: the artifact failed verification; "
                                              "it is promoted again only once it verifies and passes its gate")
    return {"stage": None}


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
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:5], widths, strict=True)) + "  " + line[5]
                     for line in lines)


def _verified(status: dict) -> bool:
    return any(c.get("type") == "Verified" and c.get("status") == "True" for c in status.get("conditions") or [])


def _delete_owned(uri: str, storage, verified_sha256: str) -> tuple[int, str]:
    """Delete what the verified run manifest lists, the manifest first; (objects removed, why
    nothing was removed)."""
    location = _location(uri, storage, retry_budget_s=120)
    try:
        data = location.get_bytes(MANIFEST)
    except ObjectMissing:
        return 0, f"{uri}/{MANIFEST} is gone, so what it listed is unknown"
    if hashlib.sha256(data).hexdigest() != verified_sha256:
        return 0, f"{uri}/{MANIFEST} changed since it was verified"
    try:
        keys = deletion_keys(Manifest.from_json(data))
    except UnsafeManifest as exc:
        return 0, str(exc)
    # The manifest alone first: from then on no reader trusts what remains, even if the rest fails.
    removed = location.delete_keys(keys[:1])
    return removed + location.delete_keys(keys[1:]), ""


async def delete_artifacts(client: KubeClient, body: dict) -> None:
    """deletionPolicy Delete: the objects the adapter's verified run manifest lists go with the
    resource, and nothing else (Retain keeps them; an adapter that never verified owns nothing)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    uri = str((spec.get("artifact") or {}).get("uri", ""))
    if spec.get("deletionPolicy") != "Delete" or not uri.startswith("s3://"):
        return
    verified_sha256 = status.get("verifiedManifestSha256")
    if not (_verified(status) and verified_sha256):
        kopf.warn(body, reason="ArtifactsRetained", message=f"nothing under {uri} was deleted: the artifact never "
                                                            "verified as this adapter's run")
        return
    adapter = LoraAdapter.model_validate({k: v for k, v in body.items() if k != "status"})
    storage = await storage_config(client, body["metadata"]["namespace"], adapter.spec.storage)
    removed, refused = await asyncio.to_thread(_delete_owned, uri, storage, verified_sha256)
    if refused:
        kopf.warn(body, reason="ArtifactsRetained", message=f"nothing under {uri} was deleted: {refused}")
    else:
        kopf.info(body, reason="ArtifactsDeleted", message=f"deleted {removed} objects of {uri}'s run manifest")


async def recheck_adapter(client: KubeClient, settings: OperatorSettings, body: dict) -> None:
    """The periodic re-verification of a Ready adapter: if the manifest or a listed object changed
    since verification, verify in full again (which fails, and demotes, if the content is wrong)."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    uri = str((spec.get("artifact") or {}).get("uri", ""))
    if status.get("phase") != "Ready" or not status.get("artifactFingerprint") or not uri.startswith("s3://"):
        return
    adapter = LoraAdapter.model_validate({k: v for k, v in body.items() if k != "status"})
    meta = body["metadata"]
    storage = await storage_config(client, meta["namespace"], adapter.spec.storage)
    if await asyncio.to_thread(_unchanged, uri, storage, status["artifactFingerprint"]):
        return
    message = "the manifest or a file it lists changed since verification: verifying again"
    kopf.info(body, reason="ArtifactChanged", message=message)
    conditions = set_condition(status.get("conditions") or [], "Verified", "Unknown", "ArtifactChanged", message,
                               meta.get("generation"), now_rfc3339())
    await write_adapter_status(client, meta["namespace"], meta["name"], meta.get("generation"),
                               {"conditions": conditions})
    fresh = await client.get(adapter_path(meta["namespace"], meta["name"]))
    if fresh is not None and not fresh["metadata"].get("deletionTimestamp"):
        await reconcile_adapter(client, settings, fresh)
