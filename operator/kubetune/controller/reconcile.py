"""Reconciling one FineTuneJob: read the world, let `decision.decide` say what to do, do it, and
write the status it decided, once. Idempotent: running it twice, or after a restart, changes nothing
more."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import kopf

from kubetune.api import API_VERSION, FineTuneJobStatus
from kubetune.api.finetunejob import AdapterRef
from kubetune.api.meta import now_rfc3339
from kubetune.api.validation import validate_object
from kubetune.controller import metrics
from kubetune.controller.admission import Turn
from kubetune.controller.decision import (
    CreateRun,
    Decision,
    Needs,
    Observed,
    RegisterAdapter,
    SetSuspend,
    StartOver,
    StopPod,
    decide,
)
from kubetune.controller.jobs import KUEUE_API, KUEUE_JOB_UID_LABEL, LABEL_JOB, configmap_name, job_name
from kubetune.controller.kube import ApiError, KubeClient, path_for
from kubetune.controller.objects import create_or_adopt
from kubetune.controller.planning import plan_job
from kubetune.controller.registry import ensure_adapter
from kubetune.controller.secrets import NotReady
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.status import job_finished, merge_patch
from kubetune.planning import DoesNotFit, RunPlan

FTJ_PLURAL = "finetunejobs"


def ftj_path(namespace: str, name: str, sub: str | None = None) -> str:
    return path_for(API_VERSION, FTJ_PLURAL, namespace, name, sub)


@dataclass(frozen=True)
class Children:
    """A FineTuneJob's Job and pods as the operator's watches last saw them (Kopf's indexes)."""
    job: dict | None
    pods: list[dict]


async def reconcile(client: KubeClient, settings: OperatorSettings, body: dict, turn: Turn,
                    children: Children) -> None:
    """One pass. `turn` holds the namespace's admission lock: when `decide` asks for the job's turn,
    the lock is held from counting the running jobs until the Job is created, or two jobs admitted
    at once would exceed the limit."""
    seen = await _read(client, settings, body, children)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(len(fields(Needs)) + 1):  # each need is asked for once at most
            decision = decide(seen)
            if isinstance(decision, Decision):
                break
            seen = await _read_more(client, body, turn, seen, decision, held)
        else:
            raise AssertionError(f"decide kept asking for more: {decision}")
        status = await _carry_out(client, body, turn, decision)
    await write_status(client, body, status)
    if decision.retry:
        raise kopf.TemporaryError(decision.retry.message, delay=decision.retry.delay)


async def _read(client: KubeClient, settings: OperatorSettings, body: dict, children: Children) -> Observed:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    job, pods = children.job, children.pods
    if job is not None and job_finished(job.get("status")):
        # Jobs and pods arrive on separate watch streams: a Job seen finished can be ahead of its pods'
        # last state, whose termination message holds the run's result. Read them fresh, once a run.
        pods = await client.list(path_for("v1", "pods", namespace), {LABEL_JOB: name})
    run_spec = await client.get(path_for("v1", "configmaps", namespace, configmap_name(name))) if job else None
    return Observed(body, job, pods, run_spec, settings, now_rfc3339())


async def _read_more(client: KubeClient, body: dict, turn: Turn, seen: Observed, needs: Needs,
                     held: contextlib.AsyncExitStack) -> Observed:
    meta = body["metadata"]
    if needs.plan:
        seen = replace(seen, plan=await _plan(client, seen))
    if needs.turn:
        await held.enter_async_context(turn.state.lock)
        seen = replace(seen, places_ahead=turn.ahead(meta["name"], meta.get("creationTimestamp") or ""))
    if needs.workload:
        assert seen.job is not None
        seen = replace(seen, workload=await _workload(client, meta["namespace"], seen.job), workload_read=True)
    return seen


async def _plan(client: KubeClient, seen: Observed) -> RunPlan | DoesNotFit | NotReady:
    """The plan, or why there is none: the outcomes are the decision's to judge."""
    ftj, _ = validate_object({k: v for k, v in seen.body.items() if k != "status"})
    try:
        return await plan_job(client, seen.settings, ftj)  # type: ignore[arg-type]
    except (DoesNotFit, NotReady) as exc:
        return exc


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


async def _carry_out(client: KubeClient, body: dict, turn: Turn, decision: Decision) -> FineTuneJobStatus:
    """The decision's actions and events; returns its status with what the actions learned (the
    registered adapter's name)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    status = decision.status
    for action in decision.actions:
        match action:
            case StartOver():
                await _start_over(client, namespace, name)
            case CreateRun(configmap=configmap, job=job, service=service):
                await _apply_configmap(client, path_for("v1", "configmaps", namespace), configmap)
                if service is not None:
                    await create_or_adopt(client, path_for("v1", "services", namespace), service)
                _, created = await create_or_adopt(client, path_for("batch/v1", "jobs", namespace), job)
                turn.state.admitted.add(name)
                if created:
                    kopf.info(body, reason="JobCreated", message=f"created Job {job['metadata']['name']}")
            case SetSuspend(suspend=suspend):
                await client.patch(path_for("batch/v1", "jobs", namespace, job_name(name)),
                                   {"spec": {"suspend": suspend}})
            case StopPod(name=pod):
                await client.delete(path_for("v1", "pods", namespace, pod))
            case RegisterAdapter(ftj=ftj, manifest_sha256=sha):
                ref = await ensure_adapter(client, body, ftj, sha)
                status = status.model_copy(update={"adapter_ref": AdapterRef.model_validate(ref)})
    for event in decision.events:
        (kopf.warn if event.warning else kopf.info)(body, reason=event.reason, message=event.message)
    return status


async def _start_over(client: KubeClient, namespace: str, name: str) -> None:
    """Before any pod ran, a changed spec is applied: the Job (its pod template is immutable) and its
    run spec go, to be created again from the new spec."""
    await client.delete(path_for("batch/v1", "jobs", namespace, job_name(name)))
    await client.delete(path_for("v1", "configmaps", namespace, configmap_name(name)))
    for pod in await client.list(path_for("v1", "pods", namespace), {LABEL_JOB: name}):
        await client.delete(path_for("v1", "pods", namespace, pod["metadata"]["name"]))


async def _apply_configmap(client: KubeClient, collection: str, desired: dict) -> None:
    configmap, created = await create_or_adopt(client, collection, desired)
    if not created and configmap.get("data") != desired["data"]:
        # Left by a reconcile that stopped before creating the Job: no pod has read it.
        await client.patch(f"{collection}/{desired['metadata']['name']}", {"data": desired["data"]})


async def write_status(client: KubeClient, body: dict, status: FineTuneJobStatus) -> None:
    """The one status write of a reconcile, skipped when it would change nothing: concurrent events
    often reconcile to the same status, and each needless write races with whatever else changes the
    object (Kopf removing its finalizer tests the resourceVersion it read)."""
    meta, desired = body["metadata"], status.model_dump(by_alias=True, mode="json", exclude_none=True)
    if patch := merge_patch(body.get("status") or {}, desired):
        await client.patch(ftj_path(meta["namespace"], meta["name"], "status"), {"status": patch})
    metrics.status_recorded(body, desired)


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
