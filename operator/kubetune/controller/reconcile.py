"""Reconciling one FineTuneJob: read the world, compute the desired objects, apply the difference,
record what was observed. Idempotent: running it twice, or after a restart, changes nothing more."""

from __future__ import annotations

import json
from typing import Any

import kopf

from kubetune.api import API_VERSION, FineTuneJob
from kubetune.api.finetunejob import FineTuneJobSpec, changed_immutable_fields
from kubetune.api.meta import now_rfc3339
from kubetune.api.validation import validate_object
from kubetune.controller.jobs import (LABEL_JOB, SPEC_FILE, build_configmap, build_job, build_rendezvous_service,
                                     configmap_name, job_name, multi_node, run_output_uri)
from kubetune.controller import metrics
from kubetune.controller.kube import KubeClient, path_for
from kubetune.controller.objects import create_or_adopt
from kubetune.controller.planning import plan_job
from kubetune.controller.secrets import NotReady
from kubetune.controller.settings import OperatorSettings
from kubetune.planning import DoesNotFit
from kubetune.controller.status import TERMINAL, Observation, broken_group, observe, set_condition, status_patch

FTJ_PLURAL = "finetunejobs"
NOT_READY_RETRY_S = 5  # a missing Secret or an unreachable store is looked at again this often


def ftj_path(namespace: str, name: str, sub: str | None = None) -> str:
    return path_for(API_VERSION, FTJ_PLURAL, namespace, name, sub)


async def write_status(client: KubeClient, body: dict, patch: dict[str, Any]) -> None:
    meta = body["metadata"]
    await client.patch(ftj_path(meta["namespace"], meta["name"], "status"), {"status": patch})
    if "phase" in patch:
        metrics.phase_recorded(meta["namespace"], meta["name"], patch["phase"])


async def _ahead_of(client: KubeClient, namespace: str, name: str, created: str) -> int:
    """Jobs that hold or come before this one's turn: unfinished Jobs of other FineTuneJobs, and
    FineTuneJobs still waiting that were created earlier."""
    jobs = await client.list(path_for("batch/v1", "jobs", namespace), {"app.kubernetes.io/managed-by": "kubetune"})
    running = sum(1 for j in jobs if (j["metadata"].get("labels") or {}).get(LABEL_JOB) != name
                  and not any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
                              for c in (j.get("status") or {}).get("conditions") or []))
    waiting = await client.list(path_for(API_VERSION, FTJ_PLURAL, namespace))
    earlier = sum(1 for f in waiting if (f.get("status") or {}).get("phase") == "Queued"
                  and (f["metadata"].get("creationTimestamp") or "", f["metadata"]["name"]) < (created, name))
    return running + earlier


async def reconcile(client: KubeClient, settings: OperatorSettings, body: dict) -> None:
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    now = now_rfc3339()
    resource, problems = validate_object({k: v for k, v in body.items() if k != "status"})
    if problems:
        message = "; ".join(f"{p.path}: {p.message}" for p in problems)
        conditions = set_condition(status.get("conditions") or [], "Validated", "False", "InvalidSpec", message,
                                   generation, now)
        conditions = set_condition(conditions, "Failed", "True", "InvalidSpec", message, generation, now)
        await write_status(client, body, {"phase": "Failed", "message": message, "conditions": conditions,
                                          "observedGeneration": generation})
        kopf.warn(body, reason="InvalidSpec", message=message)
        return
    ftj: FineTuneJob = resource  # type: ignore[assignment]
    cm_path = path_for("v1", "configmaps", namespace)
    running_spec = await client.get(f"{cm_path}/{configmap_name(ftj)}")
    if running_spec is not None and status.get("startTime"):
        before = FineTuneJobSpec.model_validate(json.loads(running_spec["data"][SPEC_FILE])["spec"])
        changed = changed_immutable_fields(before, ftj.spec)
        if changed:
            message = (f"spec.{', spec.'.join(changed)} cannot change once the job has started; "
                       "the run continues with the spec it started with. Create a new FineTuneJob instead")
            conditions = set_condition(status.get("conditions") or [], "Validated", "False", "ImmutableFieldChanged",
                                       message, generation, now)
            await write_status(client, body, {"conditions": conditions})
            kopf.warn(body, reason="ImmutableFieldChanged", message=message)
            return
    status["conditions"] = set_condition(status.get("conditions") or [], "Validated", "True", "Valid", "",
                                         generation, now)
    jobs_path = path_for("batch/v1", "jobs", namespace)
    job = await client.get(f"{jobs_path}/{job_name(ftj)}")
    if job is None and status.get("phase") in TERMINAL:
        return  # a finished run is never started again
    if job is None:
        if not await _planned(client, settings, body, ftj, status):
            return
        limit = settings.max_running_per_namespace
        if limit and await _ahead_of(client, namespace, name, meta.get("creationTimestamp") or "") >= limit:
            await record(client, body, status, Observation("Queued", "WaitingForCapacity",
                                                           f"{limit} job(s) already run in {namespace}"), generation)
            return
        await create_or_adopt(client, cm_path, build_configmap(ftj, settings))
        if multi_node(ftj):
            await create_or_adopt(client, path_for("v1", "services", namespace), build_rendezvous_service(ftj))
        job, created = await create_or_adopt(client, jobs_path, build_job(ftj, settings))
        if created:
            kopf.info(body, reason="JobCreated", message=f"created Job {job_name(ftj)}")
    elif not ftj.spec.queue_name and bool((job.get("spec") or {}).get("suspend")) != ftj.spec.suspend:
        job = await client.patch(f"{jobs_path}/{job_name(ftj)}", {"spec": {"suspend": ftj.spec.suspend}})
        kopf.info(body, reason="Suspended" if ftj.spec.suspend else "Resumed",
                  message="pods stopped (the trainer checkpoints on SIGTERM)" if ftj.spec.suspend else "resuming")
    elif ftj.spec.queue_name and ftj.spec.suspend and not (job.get("spec") or {}).get("suspend"):
        job = await client.patch(f"{jobs_path}/{job_name(ftj)}", {"spec": {"suspend": True}})
    await observe_and_record(client, body, ftj, status, job)


async def _planned(client: KubeClient, settings: OperatorSettings, body: dict, ftj: FineTuneJob,
                   status: dict) -> bool:
    """Plan once per generation. A job that cannot fit fails; one whose Secret or storage is not
    there yet waits (it may be created after the job, as GitOps tools often do) and is retried."""
    generation, now = body["metadata"].get("generation"), now_rfc3339()
    done = next((c for c in status["conditions"] if c["type"] == "Planned"), None)
    if done and done["status"] == "True" and done.get("observedGeneration") == generation:
        return True
    try:
        plan = await plan_job(client, settings, ftj)
    except DoesNotFit as exc:
        message = f"does not fit its GPUs: {exc}"
        status["conditions"] = set_condition(status["conditions"], "Planned", "False", "DoesNotFit", message,
                                             generation, now)
        await record(client, body, status, Observation("Failed", "DoesNotFit", message), generation)
        return False
    except NotReady as exc:
        if not done or done.get("reason") != exc.reason:
            kopf.warn(body, reason=exc.reason, message=exc.message)
        conditions = set_condition(status["conditions"], "Planned", "False", exc.reason, exc.message, generation, now)
        await write_status(client, body, {"phase": "Pending", "message": exc.message, "conditions": conditions,
                                          "observedGeneration": generation})
        raise kopf.TemporaryError(exc.message, delay=NOT_READY_RETRY_S) from exc
    if plan.estimate is None:
        reason, message = "DeferredToTrainer", ("the model's shape is read when the trainer loads it "
                                                f"(no config.json at an s3:// base model): {plan.summary()}")
    else:
        reason, message = "Fits", plan.summary()
    status["conditions"] = set_condition(status["conditions"], "Planned", "True", reason, message, generation, now)
    return True


async def observe_and_record(client: KubeClient, body: dict, ftj: FineTuneJob, status: dict, job: dict | None) -> None:
    namespace = body["metadata"]["namespace"]
    pods = await client.list(path_for("v1", "pods", namespace), {LABEL_JOB: ftj.metadata.name}) if job else []
    for pod in broken_group(job, pods):
        await client.delete(path_for("v1", "pods", namespace, pod["metadata"]["name"]))
        kopf.info(body, reason="GroupRestart", message=f"stopped {pod['metadata']['name']}: a pod of its group "
                                                       "stopped, so all ranks restart and resume together")
    obs = observe(ftj.spec.suspend, job, pods)
    if obs.phase == "Succeeded" and not status.get("adapterRef"):
        status["adapterRef"] = await ensure_adapter(client, body, ftj, obs)
    await record(client, body, status, obs, body["metadata"].get("generation"))


async def record(client: KubeClient, body: dict, status: dict, obs: Observation, generation: int | None) -> None:
    patch = status_patch(status, obs, generation, now_rfc3339())
    if status.get("adapterRef"):
        patch["adapterRef"] = status["adapterRef"]
    if status.get("phase") != obs.phase:
        event = kopf.warn if obs.phase == "Failed" else kopf.info
        event(body, reason=obs.reason, message=f"{status.get('phase', 'None')} -> {obs.phase}"
                                               + (f": {obs.message}" if obs.message else ""))
    await write_status(client, body, patch)
    metrics.attempts_recorded(status, patch)
    if "completionTime" in patch and not status.get("completionTime"):
        resources = (body.get("spec") or {}).get("resources") or {}
        metrics.finished(body["metadata"]["namespace"], resources.get("gpus", 1), resources.get("nodes", 1),
                         status.get("startTime") or patch.get("startTime"), patch["completionTime"])


async def ensure_adapter(client: KubeClient, body: dict, ftj: FineTuneJob, obs: Observation) -> dict[str, str]:
    """Create the LoraAdapter for a finished run (or adopt the one an earlier reconcile created)."""
    name = ftj.spec.output.adapter_name or ftj.metadata.name
    adapter = {
        "apiVersion": API_VERSION, "kind": "LoraAdapter",
        "metadata": {"name": name, "namespace": ftj.metadata.namespace,
                     "labels": {"kubetune.dev/adapter": name, LABEL_JOB: ftj.metadata.name},
                     "annotations": {"kubetune.dev/manifest-sha256": obs.result.get("manifestSha256", "")}},
        "spec": {"adapterName": name, "baseModel": ftj.spec.base_model.model_dump(by_alias=True, exclude_none=True),
                 "artifact": {"uri": run_output_uri(ftj),
                              **({"manifestSha256": obs.result["manifestSha256"]}
                                 if obs.result.get("manifestSha256") else {})},
                 "merge": {"enabled": False}},
    }
    if ftj.spec.storage:
        adapter["spec"]["storage"] = ftj.spec.storage.model_dump(by_alias=True)
    created, _ = await create_or_adopt(client, path_for(API_VERSION, "loraadapters", ftj.metadata.namespace),
                                        adapter)
    return {"name": created["metadata"]["name"], "uri": run_output_uri(ftj)}


async def clean_up(client: KubeClient, body: dict) -> None:
    """On deletion: remove the Job and its pods, and wait until they are gone. Artifacts stay."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    jobs_path = path_for("batch/v1", "jobs", namespace)
    await client.delete(f"{jobs_path}/{job_name(name)}", propagation="Foreground")
    await client.delete(path_for("v1", "configmaps", namespace, configmap_name(name)))
    for pod in await client.list(path_for("v1", "pods", namespace), {LABEL_JOB: name}):
        await client.delete(path_for("v1", "pods", namespace, pod["metadata"]["name"]))
    if await client.get(f"{jobs_path}/{job_name(name)}") is not None:
        raise kopf.TemporaryError("waiting for the Job to be deleted", delay=1)
    metrics.phase_recorded(namespace, name, None)
