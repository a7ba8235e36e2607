"""The executor's Job controller decisions (pure): what Kubernetes' Job controller does with
backoffLimit, podFailurePolicy and suspension, for the Jobs the operator builds."""

from __future__ import annotations

from kubetune.api import FineTuneJob
from kubetune.controller.jobs import build_job
from kubetune.controller.settings import OperatorSettings
from kubetune.local.jobcontrol import decide, failure_action
from tests.support import minimal_job

JOB = build_job(FineTuneJob.model_validate(minimal_job(backoffLimit=1)), OperatorSettings())


def pod(phase, code=None, conditions=()):
    status = {"phase": phase, "conditions": [{"type": t, "status": "True"} for t in conditions]}
    if code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": code}}}]
    return {"status": status}


def test_failure_policy_of_the_built_job():
    assert failure_action(JOB, pod("Failed", 75)) == "Ignore"  # preempted after a checkpoint
    assert failure_action(JOB, pod("Failed", 137, ["DisruptionTarget"])) == "Ignore"  # evicted
    assert failure_action(JOB, pod("Failed", 65)) == "FailJob"  # bad data fails the same way again
    assert failure_action(JOB, pod("Failed", 1)) == "Count"


def test_decisions():
    assert decide(JOB, []).start_pod
    assert not decide(JOB, [pod("Running")]).start_pod
    assert decide(JOB, [pod("Succeeded", 0)]).condition == "Complete"
    assert decide(JOB, [pod("Failed", 75), pod("Failed", 75), pod("Failed", 1)]).start_pod  # 1 counted <= limit 1
    failed = decide(JOB, [pod("Failed", 1), pod("Failed", 1)])
    assert (failed.condition, failed.reason) == ("Failed", "BackoffLimitExceeded")
    assert decide(JOB, [pod("Failed", 78)]).reason == "PodFailurePolicy"
    suspended = decide({**JOB, "spec": {**JOB["spec"], "suspend": True}}, [pod("Running")])
    assert suspended.stop_pods and suspended.condition == "Suspended" and not suspended.start_pod
    done = {**JOB, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert decide(done, [pod("Running")]).stop_pods and not decide(done, []).start_pod
