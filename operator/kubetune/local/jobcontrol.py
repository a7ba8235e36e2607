"""What Kubernetes' Job controller decides for a batch/v1 Job, given its pods: pure functions.

Covers what kubetune's Jobs use: one pod at a time, backoffLimit, podFailurePolicy (exit codes and
pod conditions, actions Ignore / FailJob / Count), suspension, completion."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Action = Literal["Ignore", "FailJob", "Count"]


def _exit_code(pod: dict, container: str | None) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        if terminated and (container is None or cs.get("name") == container):
            return terminated.get("exitCode")
    return None


def failure_action(job: dict, pod: dict) -> Action:
    """The first podFailurePolicy rule that matches a failed pod decides; none matching counts it."""
    conditions = {(c.get("type"), c.get("status")) for c in (pod.get("status") or {}).get("conditions") or []}
    for rule in ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []:
        if on_codes := rule.get("onExitCodes"):
            code = _exit_code(pod, on_codes.get("containerName"))
            if code is not None and (code in on_codes["values"]) == (on_codes["operator"] == "In"):
                return rule["action"]
        for wanted in rule.get("onPodConditions") or []:
            if (wanted["type"], wanted.get("status", "True")) in conditions:
                return rule["action"]
    return "Count"


@dataclass(frozen=True)
class JobDecision:
    start_pod: bool = False
    stop_pods: bool = False
    condition: str | None = None  # Complete, Failed or Suspended, to set True
    reason: str = ""
    message: str = ""


def decide(job: dict, pods: list[dict]) -> JobDecision:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in status.get("conditions") or [])
    active = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")]
    if finished:
        return JobDecision(stop_pods=bool(active))
    if spec.get("suspend"):
        return JobDecision(stop_pods=bool(active), condition="Suspended", reason="JobSuspended",
                           message="Job suspended")
    if any((p.get("status") or {}).get("phase") == "Succeeded" for p in pods):
        return JobDecision(condition="Complete", reason="Completed",
                           message="Reached expected number of succeeded pods")
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    actions = [failure_action(job, p) for p in failed]
    if "FailJob" in actions:
        return JobDecision(condition="Failed", reason="PodFailurePolicy",
                           message="Container trainer failed with an exit code the podFailurePolicy fails the Job on")
    if actions.count("Count") > spec.get("backoffLimit", 6):
        return JobDecision(condition="Failed", reason="BackoffLimitExceeded",
                           message="Job has reached the specified backoff limit")
    return JobDecision(start_pod=not active)
