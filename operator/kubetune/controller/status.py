"""FineTuneJob status from what is observed (its Job and pods): pure functions.

Conditions follow metav1.Condition: lastTransitionTime changes only when status changes, and
each carries the generation it was computed for, so `kubectl wait --for=condition=Complete`
and Argo CD health read them directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kubetune.contract import EXIT_PREEMPTED, PROGRESS_ANNOTATION

# Set (to the time of the request) by whoever cancels a job, together with spec.suspend: true; the
# OpenAI-compatible API's cancel does exactly that. Suspension alone can be undone, a cancel cannot.
CANCELLED_ANNOTATION = "kubetune.dev/cancelled-at"

TERMINAL = ("Succeeded", "Failed")
MESSAGE_LIMIT = 32768  # the CRD's maxLength for status.message and condition messages
OOM_ADVICE = ("the trainer ran out of memory (OOMKilled): lower training.maxSeqLength or "
              "training.microBatchSize, or give it more memory (resources.memory) or GPUs")


def join_problems(problems: list[str], limit: int = MESSAGE_LIMIT) -> str:
    """The problems joined with '; ', as many as fit in limit characters, then how many were left
    out: a status the API server refuses for its size is no status at all."""
    message = "; ".join(problems)
    if len(message) <= limit:
        return message
    shown: list[str] = []
    size = 0
    for problem in problems:
        note = f"; and {len(problems) - len(shown) - 1} more problem(s) not shown"
        if size + len(problem) + 2 + len(note) > limit:
            break
        shown.append(problem)
        size += len(problem) + 2
    return "; ".join([*shown, f"and {len(problems) - len(shown)} more problem(s) not shown"])


def capped(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message cut to fit limit characters, saying how much was cut."""
    if len(message) <= limit:
        return message
    kept = limit - 64  # room for the note
    return message[:kept] + f" ... ({len(message) - kept} more characters not shown)"


def merge_patch(current: dict, desired: dict) -> dict:
    """The JSON merge patch (RFC 7396) that turns current into desired; empty when they are equal.
    Written here: the jsonpatch package makes RFC 6902 operations, whose paths fail where a
    concurrent write removed a key; a merge patch of the whole difference does not."""
    patch: dict = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            if nested := merge_patch(old, value):
                patch[key] = nested
        elif key not in current or old != value:
            patch[key] = value
    return patch


def set_condition(conditions: list[dict], type_: str, status: str, reason: str, message: str,
                  generation: int | None, now: str) -> list[dict]:
    message = capped(message)
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    changed = old is None or old.get("status") != status
    out.append({"type": type_, "status": status, "reason": reason, "message": message,
                "lastTransitionTime": now if changed or old is None else old.get("lastTransitionTime", now),
                "observedGeneration": generation})
    return sorted(out, key=lambda c: c["type"])


def _job_condition(job: dict, type_: str) -> dict | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def job_outcome(job_status: Mapping[str, Any] | None) -> dict[str, dict]:
    """A batch/v1 Job status's true Complete or Failed condition, by type; empty while it runs."""
    return {c["type"]: c for c in (job_status or {}).get("conditions") or []
            if c.get("status") == "True" and c.get("type") in ("Complete", "Failed")}


def job_finished(job_status: Mapping[str, Any] | None) -> bool:
    return bool(job_outcome(job_status))


def termination(pod: dict) -> tuple[int | None, str | None, dict]:
    """Exit code, reason and parsed termination message of a pod's trainer container."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if cs.get("name") == "trainer" and terminated:
            try:
                message = json.loads(terminated.get("message") or "{}")
            except ValueError:
                message = {}
            return terminated.get("exitCode"), terminated.get("reason"), message if isinstance(message, dict) else {}
    return None, None, {}


def is_preempted(pod: dict) -> bool:
    code, _, _ = termination(pod)
    disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                    for c in (pod.get("status") or {}).get("conditions") or [])
    return code == EXIT_PREEMPTED or disrupted or (pod.get("status") or {}).get("reason") == "Evicted"


def failure_message(pod: dict) -> tuple[str, str]:
    code, reason, message = termination(pod)
    if reason == "OOMKilled":
        return "OOMKilled", OOM_ADVICE
    if message.get("error"):
        return message["error"].get("reason", "TrainerError"), message["error"].get("message", "")
    return "TrainerFailed", f"the trainer exited with code {code}" if code is not None else "the trainer pod failed"


def _created(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("creationTimestamp") or ""


def _finished(pod: dict) -> str:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        finished = ((cs.get("state") or {}).get("terminated") or {}).get("finishedAt")
        if finished:
            return finished
    return _created(pod)


def broken_group(job: dict | None, pods: list[dict]) -> list[dict]:
    """Pods of a multi-node run that outlived a member's failure or preemption.

    The ranks of one attempt are one group: once a pod has stopped, the others wait in collectives
    that can never complete, and the pod the Job controller starts in its place cannot join them.
    These survivors are to be stopped, so that the whole group starts again and resumes together.
    """
    if job is None or (job.get("spec") or {}).get("completionMode") != "Indexed":
        return []
    stopped = [_finished(p) for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not stopped:
        return []
    last_stop = max(stopped)
    return [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")
            and not (p.get("metadata") or {}).get("deletionTimestamp") and _created(p) < last_stop]


@dataclass
class Observation:
    phase: str
    reason: str
    message: str
    progress: dict[str, Any] | None = None
    attempts: int = 0
    failures: int = 0
    preemptions: int = 0
    last_checkpoint: str | None = None
    result: dict[str, Any] = field(default_factory=dict)  # the succeeded pod's termination message
    counted: tuple[tuple[str, str], ...] = ()  # Counters.counted, recorded with the counters


@dataclass(frozen=True)
class Counters:
    """Attempts, failures and preemptions, kept in status: the pods that made them may be gone
    (a suspension deletes them, and so do the Job controller and the garbage collector)."""

    attempts: int = 0
    failures: int = 0
    preemptions: int = 0
    counted: tuple[tuple[str, str], ...] = ()  # (uid, outcome) of existing pods already counted

    @classmethod
    def from_status(cls, status: dict) -> Counters:
        return cls(status.get("attempts") or 0, status.get("failures") or 0, status.get("preemptions") or 0,
                   tuple((p["uid"], p["outcome"]) for p in status.get("countedPods") or []))

    def fields(self) -> dict[str, Any]:
        """As Observation's fields."""
        return {"attempts": self.attempts, "failures": self.failures, "preemptions": self.preemptions,
                "counted": self.counted}


def _outcome(pod: dict) -> str | None:
    """What a pod counts as: None until its container ran."""
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Failed":
        return "Preempted" if is_preempted(pod) else "Failed"
    if phase == "Running" and (pod.get("metadata") or {}).get("deletionTimestamp"):
        # Being stopped (a suspended Job, an eviction): counted now, because the pod and its
        # SIGTERM exit (75) may be gone before a reconcile lists it again.
        return "Preempted"
    return {"Succeeded": "Succeeded", "Running": "Ran"}.get(phase or "")


def count_pods(before: Counters, pods: list[dict]) -> Counters:
    """The counters after seeing pods: each pod that ran is one attempt, once; each one that ended
    in a failure or a preemption counts there, once. Only the existing pods are remembered."""
    previous = dict(before.counted)
    attempts, failures, preemptions = before.attempts, before.failures, before.preemptions
    counted: list[tuple[str, str]] = []
    for pod in sorted(pods, key=_created):
        meta = pod.get("metadata") or {}
        uid, outcome = meta.get("uid") or meta.get("name", ""), _outcome(pod)
        old = previous.get(uid)
        if outcome is None:
            continue
        attempts += old is None
        if outcome != old and old in (None, "Ran"):  # an ending counts once: the first one seen
            failures += outcome == "Failed"
            preemptions += outcome == "Preempted"
        counted.append((uid, outcome))
    return Counters(attempts, failures, preemptions, tuple(counted))


def settle_phase(previous: str | None, started: bool, obs: Observation) -> Observation:
    """No backward phase: a finished run stays finished, and a started one stays Running between
    one pod's end and the next one's start (or the Job's completion)."""
    if previous in TERMINAL and obs.phase != previous:
        return replace(obs, phase=previous)
    if started and obs.phase == "Pending":
        return replace(obs, phase="Running")
    return obs


def cancellation(cancelled_at: str | None, status: dict, pods: list[dict]) -> Observation | None:
    """A cancelled job fails as Cancelled once none of its pods is still running: a pod being
    stopped writes its checkpoint on SIGTERM first, and the checkpoints are kept. A run that ended
    before the cancel keeps its own outcome; one that ended as Cancelled stays so (its suspended Job
    would otherwise be observed as Suspended)."""
    phase = status.get("phase")
    failed_as = next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Failed"), None)
    if not cancelled_at or phase == "Succeeded" or (phase == "Failed" and failed_as != "Cancelled"):
        return None
    if any((p.get("status") or {}).get("phase") in ("Pending", "Running") for p in pods):
        return None
    return Observation("Failed", "Cancelled", f"cancelled at {cancelled_at}; its checkpoints are kept")


def kueue_wait(workload: dict | None) -> tuple[str, str]:
    """Why Kueue holds the Job, in Kueue's own words from its Workload: an eviction (a preemption,
    say) or why no quota is reserved yet. Before Kueue has made the Workload there is nothing to quote."""
    conditions = {c.get("type"): c for c in ((workload or {}).get("status") or {}).get("conditions") or []}
    evicted, reserved = conditions.get("Evicted", {}), conditions.get("QuotaReserved", {})
    if evicted.get("status") == "True":
        return evicted.get("reason") or "Evicted", f"evicted by Kueue: {evicted.get('message', '')}"
    if reserved.get("status") == "False" and reserved.get("message"):
        return "WaitingForQuota", f"Kueue: {reserved['message']}"
    return "WaitingForAdmission", "waiting for Kueue to admit the Job"


def observe(spec_suspend: bool, job: dict | None, pods: list[dict], workload: dict | None = None) -> Observation:
    """What phase the run is in, from its Job and pods (oldest first), and for a queued Job the
    Workload Kueue made for it."""
    pods = sorted(pods, key=_created)
    finished = [p for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
    preempted = [p for p in finished if (p.get("status") or {}).get("phase") == "Failed" and is_preempted(p)]
    failed = [p for p in finished if (p.get("status") or {}).get("phase") == "Failed" and not is_preempted(p)]
    progress = None
    for pod in reversed(pods):
        raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(PROGRESS_ANNOTATION)
        if raw:
            try:
                progress = json.loads(raw)
                break
            except ValueError:
                continue
    obs = Observation("Pending", "Created", "", progress, len(pods), len(failed), len(preempted),
                      (progress or {}).get("lastCheckpoint"))
    if job is None:
        obs.phase, obs.reason = "Pending", "Creating"
        return obs
    if _job_condition(job, "Complete"):
        succeeded = [p for p in finished if (p.get("status") or {}).get("phase") == "Succeeded"]
        # Several nodes: the pods of ranks other than 0 succeed with nothing to say.
        obs.result = next((r for r in (termination(p)[2] for p in reversed(succeeded)) if r), {})
        obs.phase, obs.reason, obs.message = "Succeeded", "TrainingComplete", "the run finished and was published"
        return obs
    failed_cond = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if failed_cond:
        reason, message = failure_message(failed[-1]) if failed else (failed_cond.get("reason", "JobFailed"),
                                                                        failed_cond.get("message", ""))
        obs.phase, obs.reason, obs.message = "Failed", reason, message
        return obs
    if (job.get("spec") or {}).get("suspend"):
        if spec_suspend:
            obs.phase, obs.reason, obs.message = "Suspended", "Suspended", "spec.suspend is true"
        else:
            obs.phase = "Queued"
            obs.reason, obs.message = kueue_wait(workload)
        return obs
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        obs.phase, obs.reason = "Running", "Training"
        if preempted and finished[-1] in preempted:
            obs.message = f"resumed after {len(preempted)} preemption(s)"
        elif failed:
            obs.message = f"retrying after {len(failed)} failure(s): {failure_message(failed[-1])[1]}"
    else:
        obs.phase, obs.reason = "Pending", "WaitingForPod"
        if failed:
            obs.message = f"retrying after {len(failed)} failure(s): {failure_message(failed[-1])[1]}"
    return obs


def _not_negative(value: Any) -> Any:
    """The trainer's figures are reports, not input to trust: the schema refuses a negative ETA (a
    run resumed past its planned steps computed one), and a refused status write would stop the
    job's status from being recorded at all."""
    return max(0, value) if isinstance(value, int | float) else value


def status_patch(current: dict, obs: Observation, generation: int | None, now: str) -> dict[str, Any]:
    """The merge patch for status.* that records an observation."""
    conditions = current.get("conditions") or []
    active = obs.phase in ("Pending", "Running")
    conditions = set_condition(conditions, "Admitted", "True" if active or obs.phase in TERMINAL else "False",
                               obs.reason if not active else "Admitted", obs.message, generation, now)
    conditions = set_condition(conditions, "Running", "True" if obs.phase == "Running" else "False",
                               obs.reason, obs.message, generation, now)
    conditions = set_condition(conditions, "Complete", "True" if obs.phase == "Succeeded" else "False",
                               obs.reason, obs.message, generation, now)
    conditions = set_condition(conditions, "Failed", "True" if obs.phase == "Failed" else "False",
                               obs.reason, obs.message, generation, now)
    patch: dict[str, Any] = {"phase": obs.phase, "message": capped(obs.message), "conditions": conditions,
                             "observedGeneration": generation,
                             # Never lower: an observation without pods (no Job) does not undo what ran.
                             **{k: max(getattr(obs, k), current.get(k) or 0)
                                for k in ("attempts", "failures", "preemptions")},
                             "countedPods": [{"uid": uid, "outcome": outcome} for uid, outcome in obs.counted]}
    if obs.progress:
        step, total = obs.progress.get("step", 0), obs.progress.get("totalSteps")
        patch["progress"] = {
            "stage": obs.progress.get("phase"), "step": step, "totalSteps": total,
            "percent": min(100, int(100 * step / total)) if total else 0,
            "epoch": obs.progress.get("epoch"), "loss": obs.progress.get("loss"),
            "evalLoss": obs.progress.get("evalLoss"), "tokensPerSecond": obs.progress.get("tokensPerSecond"),
            "etaSeconds": _not_negative(obs.progress.get("etaSeconds")), "updatedAt": obs.progress.get("updatedAt")}
        if obs.phase == "Succeeded":
            patch["progress"]["percent"] = 100
    if obs.last_checkpoint:
        patch["lastCheckpoint"] = obs.last_checkpoint
    if obs.attempts and not current.get("startTime"):
        patch["startTime"] = now  # a pod ran: from now on training fields are immutable
    if obs.phase in TERMINAL and not current.get("completionTime"):
        patch["completionTime"] = now
    return patch
