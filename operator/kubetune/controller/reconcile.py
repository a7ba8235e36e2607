"""Reconciling one FineTuneJob: read the world, compute the desired objects, apply the difference,
record what was observed. Idempotent: running it twice, or after a restart, changes nothing more."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import kopf

from kubetune.api import API_VERSION, FineTuneJob
from kubetune.api.finetunejob import IMMUTABLE_AFTER_START, FineTuneJobSpec, changed_immutable_fields
from kubetune.api.meta import now_rfc3339
from kubetune.api.validation import validate_object
from kubetune.controller import metrics
from kubetune.controller.admission import WAITING_REASON, Turn
from kubetune.controller.jobs import (
    KUEUE_API,
    KUEUE_JOB_UID_LABEL,
    LABEL_JOB,
    SPEC_FILE,
    build_configmap,
    build_job,
    build_rendezvous_service,
    configmap_name,
    job_name,
    multi_node,
)
from kubetune.controller.kube import ApiError, KubeClient, path_for
from kubetune.controller.objects import create_or_adopt
from kubetune.controller.planning import plan_job
from kubetune.controller.registry import ensure_adapter
from kubetune.controller.secrets import NotReady
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.status import (
    CANCELLED_ANNOTATION,
    TERMINAL,
    Counters,
    Observation,
    broken_group,
    cancellation,
    count_pods,
    job_finished,
    join_problems,
    merge_patch_changes,
    observe,
    set_condition,
    settle_phase,
    status_patch,
)
from kubetune.planning import DoesNotFit

FTJ_PLURAL = "finetunejobs"
NOT_READY_RETRY_S = 5  # a missing Secret or an unreachable store is looked at again this often


def ftj_path(namespace: str, name: str, sub: str | None = None) -> str:
    return path_for(API_VERSION, FTJ_PLURAL, namespace, name, sub)


async def write_status(client: KubeClient, body: dict, patch: dict[str, Any]) -> None:
    """Write a status patch, unless it would change nothing: concurrent events often reconcile to
    the same status, and each needless write races with whatever else changes the object (Kopf
    removing its finalizer tests the resourceVersion it read)."""
    meta = body["metadata"]
    if merge_patch_changes(body.get("status") or {}, patch):
        await client.patch(ftj_path(meta["namespace"], meta["name"], "status"), {"status": patch})
    metrics.status_recorded(body, patch)


def _job_ran(job: dict | None) -> bool:
    """The Job controller counted a finished pod: even if that pod is gone, a pod ran."""
    status = (job or {}).get("status") or {}
    return bool(status.get("succeeded") or status.get("failed") or status.get("completionTime"))


def _spec_for_run(data: str) -> dict[str, Any]:
    """A run spec (ConfigMap data) without spec.suspend, which the Job carries instead."""
    run = json.loads(data)
    run["spec"].pop("suspend", None)
    return run


def spec_drifted(actual: dict, desired: dict) -> bool:
    return _spec_for_run(actual["data"][SPEC_FILE]) != _spec_for_run(desired["data"][SPEC_FILE])


def with_running_fields(ftj: FineTuneJob, running: FineTuneJobSpec) -> FineTuneJob:
    """The job as it runs: the training fields it started with, the others (suspend, ...) as now."""
    now, before = (s.model_dump(by_alias=True, mode="json") for s in (ftj.spec, running))
    spec = FineTuneJobSpec.model_validate({**now, **{f: before[f] for f in IMMUTABLE_AFTER_START}})
    return ftj.model_copy(update={"spec": spec})


async def _start_over(client: KubeClient, body: dict, ftj: FineTuneJob) -> None:
    """Before any pod ran, a changed spec is applied: the Job (its pod template is immutable) and its
    run spec go, and are created again from the new spec."""
    namespace = ftj.metadata.namespace
    await client.delete(path_for("batch/v1", "jobs", namespace, job_name(ftj)))
    await client.delete(path_for("v1", "configmaps", namespace, configmap_name(ftj)))
    for pod in await client.list(path_for("v1", "pods", namespace), {LABEL_JOB: ftj.metadata.name}):
        await client.delete(path_for("v1", "pods", namespace, pod["metadata"]["name"]))
    kopf.info(body, reason="RunSpecUpdated", message="the spec changed before any pod ran: the Job and its run "
                                                     "spec are created again from it")
    if await client.get(path_for("batch/v1", "jobs", namespace, job_name(ftj))) is not None:
        raise kopf.TemporaryError("waiting for the Job to be deleted", delay=1)


async def _apply_configmap(client: KubeClient, collection: str, desired: dict) -> None:
    configmap, created = await create_or_adopt(client, collection, desired)
    if not created and configmap.get("data") != desired["data"]:
        # Left by a reconcile that stopped before creating the Job: no pod has read it.
        await client.patch(f"{collection}/{desired['metadata']['name']}", {"data": desired["data"]})


@dataclass(frozen=True)
class Children:
    """A FineTuneJob's Job and pods as the operator's watches last saw them (Kopf's indexes)."""
    job: dict | None
    pods: list[dict]


async def reconcile(client: KubeClient, settings: OperatorSettings, body: dict, turn: Turn,
                    children: Children) -> None:
    """One pass. `turn` holds the namespace's admission lock: the running-jobs check and the Job's
    creation must not interleave with another job's, or the limit is exceeded."""
    meta, status = body["metadata"], dict(body.get("status") or {})
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    now = now_rfc3339()
    resource, problems = validate_object({k: v for k, v in body.items() if k != "status"})
    if problems:
        message = join_problems([f"{p.path}: {p.message}" for p in problems])
        conditions = set_condition(status.get("conditions") or [], "Validated", "False", "InvalidSpec", message,
                                   generation, now)
        conditions = set_condition(conditions, "Failed", "True", "InvalidSpec", message, generation, now)
        await write_status(client, body, {"phase": "Failed", "message": message, "conditions": conditions,
                                          "observedGeneration": generation})
        kopf.warn(body, reason="InvalidSpec", message=message)
        return
    ftj: FineTuneJob = resource  # type: ignore[assignment]
    cm_path, jobs_path = path_for("v1", "configmaps", namespace), path_for("batch/v1", "jobs", namespace)
    job = children.job
    pods = children.pods if job else []
    if job is not None and job_finished(job.get("status")):
        # Jobs and pods arrive on separate watch streams: a Job seen finished can be ahead of its pods'
        # last state, whose termination message holds the run's result. Read them fresh, once a run.
        pods = await client.list(path_for("v1", "pods", namespace), {LABEL_JOB: name})
    started = bool(status.get("startTime")) or count_pods(Counters(), pods).attempts > 0 or _job_ran(job)
    running_spec = await client.get(f"{cm_path}/{configmap_name(ftj)}") if job else None
    validated = ("True", "Valid", "")
    if running_spec is not None and started:
        before = FineTuneJobSpec.model_validate(json.loads(running_spec["data"][SPEC_FILE])["spec"])
        changed = changed_immutable_fields(before, ftj.spec)
        if changed:
            message = (f"spec.{', spec.'.join(changed)} cannot change once the job has started; "
                       "the run continues with the spec it started with. Create a new FineTuneJob instead")
            previous: dict = next((c for c in status.get("conditions") or [] if c["type"] == "Validated"), {})
            if (previous.get("reason"), previous.get("message")) != ("ImmutableFieldChanged", message):
                kopf.warn(body, reason="ImmutableFieldChanged", message=message)
            validated = ("False", "ImmutableFieldChanged", message)
            ftj = with_running_fields(ftj, before)
    elif running_spec is not None and spec_drifted(running_spec, build_configmap(ftj, settings)):
        await _start_over(client, body, ftj)
        job, pods = None, []
    status["conditions"] = set_condition(status.get("conditions") or [], "Validated", *validated, generation, now)
    if cancelled := cancellation((meta.get("annotations") or {}).get(CANCELLED_ANNOTATION), status, pods):
        counters = count_pods(Counters.from_status(status), pods)
        await record(client, body, status, replace(cancelled, **counters.fields()), generation)
        return
    if job is None and status.get("phase") in TERMINAL:
        return  # a finished run is never started again
    if job is None:
        if not await _planned(client, settings, body, ftj, status):
            return
        async with turn.state.lock:
            limit = settings.max_running_per_namespace
            if limit and turn.ahead(name, meta.get("creationTimestamp") or "") >= limit:
                await record(client, body, status, Observation("Queued", WAITING_REASON,
                                                               f"{limit} job(s) already run in {namespace}"),
                             generation)
                return
            await _apply_configmap(client, cm_path, build_configmap(ftj, settings))
            if multi_node(ftj):
                await create_or_adopt(client, path_for("v1", "services", namespace), build_rendezvous_service(ftj))
            job, created = await create_or_adopt(client, jobs_path, build_job(ftj, settings))
            turn.state.admitted.add(name)
        if created:
            kopf.info(body, reason="JobCreated", message=f"created Job {job_name(ftj)}")
    elif not ftj.spec.queue_name and bool((job.get("spec") or {}).get("suspend")) != ftj.spec.suspend:
        job = await client.patch(f"{jobs_path}/{job_name(ftj)}", {"spec": {"suspend": ftj.spec.suspend}})
        kopf.info(body, reason="Suspended" if ftj.spec.suspend else "Resumed",
                  message="pods stopped (the trainer checkpoints on SIGTERM)" if ftj.spec.suspend else "resuming")
    elif ftj.spec.queue_name and ftj.spec.suspend and not (job.get("spec") or {}).get("suspend"):
        job = await client.patch(f"{jobs_path}/{job_name(ftj)}", {"spec": {"suspend": True}})
    await observe_and_record(client, body, ftj, status, job, pods)


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


async def observe_and_record(client: KubeClient, body: dict, ftj: FineTuneJob, status: dict, job: dict | None,
                             pods: list[dict]) -> None:
    namespace = body["metadata"]["namespace"]
    for pod in broken_group(job, pods):
        await client.delete(path_for("v1", "pods", namespace, pod["metadata"]["name"]))
        kopf.info(body, reason="GroupRestart", message=f"stopped {pod['metadata']['name']}: a pod of its group "
                                                       "stopped, so all ranks restart and resume together")
    counters = count_pods(Counters.from_status(status), pods)
    workload = (await _workload(client, namespace, job)
                if job is not None and ftj.spec.queue_name and _suspended(job) else None)
    obs = replace(observe(ftj.spec.suspend, job, pods, workload), **counters.fields())
    obs = settle_phase(status.get("phase"), bool(status.get("startTime")) or counters.attempts > 0, obs)
    if obs.phase == "Succeeded" and not status.get("adapterRef"):
        status["adapterRef"] = await ensure_adapter(client, body, ftj, obs.result.get("manifestSha256", ""))
    await record(client, body, status, obs, body["metadata"].get("generation"))


def _suspended(job: dict | None) -> bool:
    return bool(job and (job.get("spec") or {}).get("suspend"))


async def _workload(client: KubeClient, namespace: str, job: dict) -> dict | None:
    """The Workload Kueue made for the Job (labelled with the Job's uid), read only while Kueue holds
    the Job; none where Kueue is not installed."""
    try:
        found = await client.list(path_for(KUEUE_API, "workloads", namespace),
                                  {KUEUE_JOB_UID_LABEL: job["metadata"]["uid"]})
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
    return found[0] if found else None


async def record(client: KubeClient, body: dict, status: dict, obs: Observation, generation: int | None) -> None:
    patch = status_patch(status, obs, generation, now_rfc3339())
    if status.get("adapterRef"):
        patch["adapterRef"] = status["adapterRef"]
    if status.get("phase") != obs.phase:
        event = kopf.warn if obs.phase == "Failed" else kopf.info
        event(body, reason=obs.reason, message=f"{status.get('phase', 'None')} -> {obs.phase}"
                                               + (f": {obs.message}" if obs.message else ""))
    await write_status(client, body, patch)


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
