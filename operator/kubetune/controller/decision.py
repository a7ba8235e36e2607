"""What one reconcile of a FineTuneJob does, decided from what it read: one pure function.

`decide` takes everything the reconcile read (the FineTuneJob, its Job and pods from Kopf's indexes,
the run spec the Job started with, and, when it asks for them, the plan, the namespace's turn and
Kueue's Workload) and returns either what else it must read (`Needs`) or a `Decision`: the actions
to carry out, the events to post and the job's whole typed status. `reconcile` does the reading and
the carrying out, and writes that status once, only where it differs from what is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from kubetune.api import FineTuneJob, FineTuneJobStatus
from kubetune.api.finetunejob import IMMUTABLE_AFTER_START, FineTuneJobSpec, changed_immutable_fields
from kubetune.api.validation import validate_object
from kubetune.controller.admission import WAITING_REASON
from kubetune.controller.jobs import (
    SPEC_FILE,
    build_configmap,
    build_job,
    build_rendezvous_service,
    job_name,
    multi_node,
)
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
    join_problems,
    observe,
    set_condition,
    settle_phase,
    status_patch,
)
from kubetune.planning import DoesNotFit, RunPlan

NOT_READY_RETRY_S = 5  # a missing Secret or an unreachable store is looked at again this often
START_OVER_RETRY_S = 1  # the new Job is created once the old one is gone


# What the reconcile reads -------------------------------------------------------------------------

@dataclass(frozen=True)
class Observed:
    """What one reconcile read. The optional parts are read only when `decide` asks for them."""
    body: dict  # the FineTuneJob, read fresh
    job: dict | None  # its batch/v1 Job
    pods: list[dict]
    run_spec: dict | None  # the ConfigMap holding the spec the Job runs with
    settings: OperatorSettings
    now: str
    plan: RunPlan | DoesNotFit | NotReady | None = None  # Needs.plan
    places_ahead: int | None = None  # Needs.turn: read under the namespace's admission lock
    workload: dict | None = None  # Needs.workload: the Workload Kueue made for the Job
    workload_read: bool = False


@dataclass(frozen=True)
class Needs:
    """Read these, then decide again."""
    plan: bool = False
    turn: bool = False
    workload: bool = False


# What it does -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StartOver:
    """Delete the Job, its run spec and its pods: no pod ran, and the spec changed."""


@dataclass(frozen=True)
class CreateRun:
    """Create the run spec, the rendezvous Service (several nodes) and the Job; adopt any that exist."""
    configmap: dict
    job: dict
    service: dict | None


@dataclass(frozen=True)
class SetSuspend:
    suspend: bool


@dataclass(frozen=True)
class StopPod:
    name: str


@dataclass(frozen=True)
class RegisterAdapter:
    """Register (or adopt) the finished run's LoraAdapter; its name goes into status.adapterRef."""
    ftj: FineTuneJob  # as it ran: its output is where the adapter is
    manifest_sha256: str


Action = StartOver | CreateRun | SetSuspend | StopPod | RegisterAdapter


@dataclass(frozen=True)
class Event:
    warning: bool
    reason: str
    message: str


@dataclass(frozen=True)
class Retry:
    """Reconcile again after delay seconds, once the actions are done and the status written."""
    delay: float
    message: str


@dataclass(frozen=True)
class Decision:
    status: FineTuneJobStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    retry: Retry | None = None


# Pure helpers -------------------------------------------------------------------------------------

def typed_status(status: dict[str, Any]) -> FineTuneJobStatus:
    return FineTuneJobStatus.model_validate(status)


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


def _suspended(job: dict | None) -> bool:
    return bool(job and (job.get("spec") or {}).get("suspend"))


def _with_suspend(job: dict, suspend: bool) -> dict:
    return {**job, "spec": {**(job.get("spec") or {}), "suspend": suspend}}


def _planned_for(status: dict, generation: int | None) -> bool:
    done = next((c for c in status.get("conditions") or [] if c["type"] == "Planned"), None)
    return bool(done and done["status"] == "True" and done.get("observedGeneration") == generation)


def _recorded(status: dict, obs: Observation, generation: int | None, now: str,
              events: list[Event], actions: tuple[Action, ...] = ()) -> Decision:
    """The status that records an observation, with an event where the phase changes."""
    if status.get("phase") != obs.phase:
        events.append(Event(obs.phase == "Failed", obs.reason, f"{status.get('phase', 'None')} -> {obs.phase}"
                            + (f": {obs.message}" if obs.message else "")))
    patch = status_patch(status, obs, generation, now)
    return Decision(typed_status({**status, **patch}), actions, tuple(events))


# The decision -------------------------------------------------------------------------------------

def decide(seen: Observed) -> Decision | Needs:
    meta, stored = seen.body["metadata"], dict(seen.body.get("status") or {})
    generation, now = meta.get("generation"), seen.now
    resource, problems = validate_object({k: v for k, v in seen.body.items() if k != "status"})
    if problems:
        message = join_problems([f"{p.path}: {p.message}" for p in problems])
        conditions = set_condition(stored.get("conditions") or [], "Validated", "False", "InvalidSpec", message,
                                   generation, now)
        conditions = set_condition(conditions, "Failed", "True", "InvalidSpec", message, generation, now)
        told = (stored.get("phase"), stored.get("message")) == ("Failed", message)
        return Decision(typed_status({**stored, "phase": "Failed", "message": message, "conditions": conditions,
                                      "observedGeneration": generation}),
                        events=() if told else (Event(True, "InvalidSpec", message),))
    ftj: FineTuneJob = resource  # type: ignore[assignment]
    status, events, actions = dict(stored), list[Event](), list[Action]()
    job = seen.job
    pods = seen.pods if job else []
    started = bool(status.get("startTime")) or count_pods(Counters(), pods).attempts > 0 or _job_ran(job)
    validated = ("True", "Valid", "")
    if seen.run_spec is not None and started:
        before = FineTuneJobSpec.model_validate(json.loads(seen.run_spec["data"][SPEC_FILE])["spec"])
        if changed := changed_immutable_fields(before, ftj.spec):
            message = (f"spec.{', spec.'.join(changed)} cannot change once the job has started; "
                       "the run continues with the spec it started with. Create a new FineTuneJob instead")
            previous: dict = next((c for c in status.get("conditions") or [] if c["type"] == "Validated"), {})
            if (previous.get("reason"), previous.get("message")) != ("ImmutableFieldChanged", message):
                events.append(Event(True, "ImmutableFieldChanged", message))
            validated = ("False", "ImmutableFieldChanged", message)
            ftj = with_running_fields(ftj, before)
    elif seen.run_spec is not None and spec_drifted(seen.run_spec, build_configmap(ftj, seen.settings)):
        return Decision(typed_status(stored), (StartOver(),),
                        (Event(False, "RunSpecUpdated", "the spec changed before any pod ran: the Job and its "
                                                        "run spec are created again from it"),),
                        Retry(START_OVER_RETRY_S, "waiting for the Job to be deleted"))
    status["conditions"] = set_condition(status.get("conditions") or [], "Validated", *validated, generation, now)
    if cancelled := cancellation((meta.get("annotations") or {}).get(CANCELLED_ANNOTATION), status, pods):
        counters = count_pods(Counters.from_status(status), pods)
        return _recorded(status, replace(cancelled, **counters.fields()), generation, now, events)
    if job is None and status.get("phase") in TERMINAL:
        return Decision(typed_status(stored))  # a finished run is never started again
    creating = job is None
    if job is None:
        if not _planned_for(status, generation):
            if seen.plan is None:
                return Needs(plan=True)
            planned = _planning_outcome(seen.plan, status, generation, now, events)
            if planned is not None:
                return planned
        if seen.places_ahead is None:
            return Needs(turn=True)
        limit = seen.settings.max_running_per_namespace
        if limit and seen.places_ahead >= limit:
            return _recorded(status, Observation("Queued", WAITING_REASON,
                                                 f"{limit} job(s) already run in {meta['namespace']}"),
                             generation, now, events)
        job = build_job(ftj, seen.settings)
        actions.append(CreateRun(build_configmap(ftj, seen.settings), job,
                                 build_rendezvous_service(ftj) if multi_node(ftj) else None))
    elif not ftj.spec.queue_name and _suspended(job) != ftj.spec.suspend:
        job = _with_suspend(job, ftj.spec.suspend)
        actions.append(SetSuspend(ftj.spec.suspend))
        events.append(Event(False, "Suspended", "pods stopped (the trainer checkpoints on SIGTERM)")
                      if ftj.spec.suspend else Event(False, "Resumed", "resuming"))
    elif ftj.spec.queue_name and ftj.spec.suspend and not _suspended(job):
        job = _with_suspend(job, True)
        actions.append(SetSuspend(True))
    # A Job created by this reconcile has no Workload yet: Kueue makes it on seeing the Job.
    if not creating and ftj.spec.queue_name and _suspended(job) and not seen.workload_read:
        return Needs(workload=True)
    for pod in broken_group(job, pods):
        actions.append(StopPod(pod["metadata"]["name"]))
        events.append(Event(False, "GroupRestart", f"stopped {pod['metadata']['name']}: a pod of its group "
                                                   "stopped, so all ranks restart and resume together"))
    counters = count_pods(Counters.from_status(status), pods)
    obs = replace(observe(ftj.spec.suspend, job, pods, seen.workload), **counters.fields())
    obs = settle_phase(status.get("phase"), bool(status.get("startTime")) or counters.attempts > 0, obs)
    if obs.phase == "Succeeded" and not status.get("adapterRef"):
        actions.append(RegisterAdapter(ftj, obs.result.get("manifestSha256", "")))
    status["jobName"] = job_name(ftj)
    return _recorded(status, obs, generation, now, events, tuple(actions))


def _planning_outcome(plan: RunPlan | DoesNotFit | NotReady, status: dict, generation: int | None, now: str,
                      events: list[Event]) -> Decision | None:
    """Plan once per generation. A job that cannot fit fails; one whose Secret or storage is not
    there yet waits (it may be created after the job, as GitOps tools often do) and is retried.
    None when the plan holds: status gets its Planned condition and the run goes on."""
    if isinstance(plan, DoesNotFit):
        message = f"does not fit its GPUs: {plan}"
        status["conditions"] = set_condition(status["conditions"], "Planned", "False", "DoesNotFit", message,
                                             generation, now)
        return _recorded(status, Observation("Failed", "DoesNotFit", message), generation, now, events)
    if isinstance(plan, NotReady):
        done = next((c for c in status["conditions"] if c["type"] == "Planned"), None)
        if not done or done.get("reason") != plan.reason:
            events.append(Event(True, plan.reason, plan.message))
        conditions = set_condition(status["conditions"], "Planned", "False", plan.reason, plan.message,
                                   generation, now)
        return Decision(typed_status({**status, "phase": "Pending", "message": plan.message,
                                      "conditions": conditions, "observedGeneration": generation}),
                        events=tuple(events), retry=Retry(NOT_READY_RETRY_S, plan.message))
    if plan.estimate is None:
        reason, message = "DeferredToTrainer", ("the model's shape is read when the trainer loads it "
                                                f"(no config.json at an s3:// base model): {plan.summary()}")
    else:
        reason, message = "Fits", plan.summary()
    status["conditions"] = set_condition(status["conditions"], "Planned", "True", reason, message, generation, now)
    return None
