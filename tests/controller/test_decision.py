"""The FineTuneJob reconcile's decision (controller/decision.py), without a server: what it asks to
read, the actions it returns, and the typed status it records. The same decisions against an API
server are tests/controller/test_operator.py and tests/realplane."""

from __future__ import annotations

import json

import pytest

from kubetune.api import FineTuneJob
from kubetune.controller.decision import (
    CreateRun,
    Decision,
    Event,
    Needs,
    Observed,
    RegisterAdapter,
    SetSuspend,
    StartOver,
    StopPod,
    decide,
)
from kubetune.controller.jobs import build_configmap, build_job
from kubetune.controller.secrets import NotReady
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.status import CANCELLED_ANNOTATION, merge_patch
from kubetune.planning import DoesNotFit, plan_run
from tests.support import minimal_job, patched

SETTINGS = OperatorSettings()
NOW = "2026-12-02T12:00:00Z"
CREATED = "2026-12-02T11:00:00Z"


def ftj_body(status: dict | None = None, **spec) -> dict:
    body = patched(minimal_job(**spec), {"metadata": {"generation": 1, "creationTimestamp": CREATED, "uid": "u1"}})
    return {**body, "status": status} if status is not None else body


def resource(body: dict) -> FineTuneJob:
    return FineTuneJob.model_validate({k: v for k, v in body.items() if k != "status"})


def the_job(body: dict, *, suspend: bool | None = None, **status) -> dict:
    job = build_job(resource(body), SETTINGS)
    job["metadata"]["uid"] = "job-uid"
    if suspend is not None:
        job["spec"]["suspend"] = suspend
    return {**job, "status": status}


def run_spec(body: dict) -> dict:
    return build_configmap(resource(body), SETTINGS)


def pod(name: str, phase: str, *, exit_code: int | None = None, message: dict | None = None,
        created: str = "2026-12-02T11:10:00Z") -> dict:
    state = {"running": {}} if exit_code is None else {"terminated": {
        "exitCode": exit_code, "message": json.dumps(message or {})}}
    return {"metadata": {"name": name, "uid": name, "creationTimestamp": created},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


def decided(body: dict, *, job: dict | None = None, pods: tuple[dict, ...] = (), spec_of_run: dict | None = None,
            settings: OperatorSettings = SETTINGS, plan=None, ahead: int = 0,
            workload: dict | None = None) -> tuple[Decision, list[str]]:
    """decide, its needs answered the way reconcile answers them; also which needs it asked for."""
    seen = Observed(body, job, list(pods), spec_of_run, settings, NOW)
    asked: list[str] = []
    while isinstance(decision := decide(seen), Needs):
        need = next(n for n in ("plan", "turn", "workload") if getattr(decision, n))
        assert need not in asked, f"asked for {need} twice"
        asked.append(need)
        answer = {"plan": {"plan": plan if plan is not None else plan_run(resource(body).spec, None, 80.0)},
                  "turn": {"places_ahead": ahead},
                  "workload": {"workload": workload, "workload_read": True}}[need]
        seen = Observed(**{**seen.__dict__, **answer})
    return decision, asked


def stored(decision: Decision) -> dict:
    """The status as the one write of the reconcile leaves it."""
    return decision.status.model_dump(by_alias=True, mode="json", exclude_none=True)


def condition(status: dict, type_: str) -> tuple[str, str]:
    found = next(c for c in status["conditions"] if c["type"] == type_)
    return found["status"], found["reason"]


def test_a_new_job_is_planned_then_takes_its_turn_then_its_run_is_created():
    body = ftj_body()
    decision, asked = decided(body)
    assert asked == ["plan", "turn"]
    [create] = decision.actions
    assert isinstance(create, CreateRun) and create.service is None
    assert create.job["metadata"]["name"] == "job-train" and create.configmap["metadata"]["name"] == "job-spec"
    status = stored(decision)
    assert (status["phase"], status["jobName"], status["observedGeneration"]) == ("Pending", "job-train", 1)
    assert condition(status, "Planned") == ("True", "DeferredToTrainer")
    assert condition(status, "Validated") == ("True", "Valid")
    assert decision.events == (Event(False, "WaitingForPod", "None -> Pending"),)


def test_a_job_over_the_namespace_limit_waits_queued_and_creates_nothing():
    decision, asked = decided(ftj_body(), settings=OperatorSettings(max_running_per_namespace=2), ahead=2)
    assert (asked, decision.actions) == (["plan", "turn"], ())
    status = stored(decision)
    assert status["phase"] == "Queued" and condition(status, "Admitted") == ("False", "WaitingForCapacity")
    assert "2 job(s) already run in default" in status["message"]


def test_planning_once_per_generation():
    first, _ = decided(ftj_body())
    again, asked = decided(ftj_body(stored(first)))
    assert asked == ["turn"]  # the Planned condition of this generation stands
    newer = patched(ftj_body(stored(first)), {"metadata": {"generation": 2}})
    assert decided(newer)[1] == ["plan", "turn"]


def test_a_job_that_does_not_fit_fails_and_one_whose_secret_is_missing_waits_and_retries():
    failed, _ = decided(ftj_body(), plan=DoesNotFit("needs 90 GiB"))
    assert failed.actions == () and failed.retry is None
    assert stored(failed)["phase"] == "Failed" and condition(stored(failed), "Planned") == ("False", "DoesNotFit")
    waiting, asked = decided(ftj_body(), plan=NotReady("SecretMissing", "Secret s3 not found"))
    assert (asked, waiting.actions) == (["plan"], ())
    assert waiting.retry is not None and waiting.retry.message == "Secret s3 not found"
    assert (stored(waiting)["phase"], stored(waiting)["message"]) == ("Pending", "Secret s3 not found")
    assert waiting.events == (Event(True, "SecretMissing", "Secret s3 not found"),)
    # Told once: the same reason again posts no event.
    again, _ = decided(ftj_body(stored(waiting)), plan=NotReady("SecretMissing", "Secret s3 not found"))
    assert again.events == () and again.retry is not None


def test_an_invalid_spec_fails_naming_the_field_and_creates_nothing():
    body = patched(ftj_body(), {"spec": {"lora": {"r": 0}}})
    decision, asked = decided(body)
    assert (asked, decision.actions) == ([], ())
    status = stored(decision)
    assert status["phase"] == "Failed" and "spec.lora.r" in status["message"]
    assert condition(status, "Validated") == ("False", "InvalidSpec")


def test_a_training_field_changed_after_start_is_refused_and_the_run_keeps_its_spec():
    body = ftj_body()
    started = ftj_body({"phase": "Running", "startTime": CREATED})
    changed = patched(started, {"spec": {"lora": {"r": 64}}})
    decision, _ = decided(changed, job=the_job(body), pods=(pod("p1", "Running"),), spec_of_run=run_spec(body))
    assert decision.actions == ()
    status = stored(decision)
    assert condition(status, "Validated") == ("False", "ImmutableFieldChanged") and status["phase"] == "Running"
    assert [e.reason for e in decision.events] == ["ImmutableFieldChanged"]


def test_a_spec_changed_before_any_pod_ran_starts_the_run_over():
    body = ftj_body({"phase": "Pending"})
    changed = patched(body, {"spec": {"lora": {"r": 64}}})
    decision, _ = decided(changed, job=the_job(body), spec_of_run=run_spec(body))
    assert decision.actions == (StartOver(),) and decision.retry is not None
    assert [e.reason for e in decision.events] == ["RunSpecUpdated"] and stored(decision)["phase"] == "Pending"


@pytest.mark.parametrize("suspend", [True, False])
def test_suspend_and_resume_patch_the_job(suspend):
    body = ftj_body({"phase": "Running", "startTime": CREATED}, suspend=suspend)
    job = the_job(ftj_body(), suspend=not suspend)
    decision, _ = decided(body, job=job, pods=() if not suspend else (pod("p1", "Running"),),
                          spec_of_run=run_spec(body))
    assert SetSuspend(suspend) in decision.actions
    assert (Event(False, "Suspended", "pods stopped (the trainer checkpoints on SIGTERM)") if suspend
            else Event(False, "Resumed", "resuming")) in decision.events


def test_a_queued_job_reads_kueues_workload_and_quotes_it():
    body = ftj_body({"phase": "Pending"}, queueName="team-a")
    workload = {"status": {"conditions": [{"type": "QuotaReserved", "status": "False",
                                           "message": "couldn't assign flavors"}]}}
    decision, asked = decided(body, job=the_job(body, suspend=True), spec_of_run=run_spec(body), workload=workload)
    assert asked == ["workload"]
    status = stored(decision)
    assert status["phase"] == "Queued" and status["message"] == "Kueue: couldn't assign flavors"


def test_a_job_created_under_kueue_reads_no_workload_yet():
    _, asked = decided(ftj_body(queueName="team-a"))
    assert asked == ["plan", "turn"]


def test_a_finished_run_registers_its_adapter_once():
    body = ftj_body({"phase": "Running", "startTime": CREATED})
    job = the_job(body, conditions=[{"type": "Complete", "status": "True"}], succeeded=1)
    done = pod("p1", "Succeeded", exit_code=0, message={"manifestSha256": "ab" * 32})
    decision, _ = decided(body, job=job, pods=(done,), spec_of_run=run_spec(body))
    [register] = decision.actions
    assert isinstance(register, RegisterAdapter) and register.manifest_sha256 == "ab" * 32
    status = stored(decision)
    assert status["phase"] == "Succeeded" and status["completionTime"] == NOW
    registered = {**status, "adapterRef": {"name": "job", "uri": "pvc://runs/job"}}
    again, _ = decided(ftj_body(registered), job=job, pods=(done,), spec_of_run=run_spec(body))
    assert again.actions == () and merge_patch(registered, stored(again)) == {}


def test_a_finished_run_without_its_job_is_never_started_again():
    for phase in ("Succeeded", "Failed"):
        status = {"phase": phase, "startTime": CREATED}
        decision, asked = decided(ftj_body(status))
        assert (asked, decision.actions, stored(decision)["phase"]) == ([], (), phase)


def test_a_multi_node_group_with_a_failed_member_is_stopped_to_restart_together():
    body = ftj_body({"phase": "Running", "startTime": CREATED}, resources={"nodes": 2, "gpus": 1})
    job = the_job(body)
    pods = (pod("rank0", "Running", created="2026-12-02T11:10:00Z"),
            pod("rank1", "Failed", exit_code=1, created="2026-12-02T11:10:01Z"))
    decision, _ = decided(body, job=job, pods=pods, spec_of_run=run_spec(body))
    assert StopPod("rank0") in decision.actions


def test_a_cancelled_job_fails_as_cancelled_once_its_pods_stopped():
    body = patched(ftj_body({"phase": "Running", "startTime": CREATED}, suspend=True),
                   {"metadata": {"annotations": {CANCELLED_ANNOTATION: NOW}}})
    job = the_job(body, suspend=True)
    stopping, _ = decided(body, job=job, pods=(pod("p1", "Running"),), spec_of_run=run_spec(body))
    assert stored(stopping)["phase"] != "Failed"
    cancelled, _ = decided(body, job=job, spec_of_run=run_spec(body))
    assert stored(cancelled)["phase"] == "Failed" and condition(stored(cancelled), "Failed") == ("True", "Cancelled")


@pytest.mark.parametrize("case", ["running", "queued-for-capacity", "invalid", "failed"])
def test_deciding_again_on_what_was_recorded_changes_nothing(case):
    """Idempotence: a second reconcile of an unchanged world writes nothing and posts no event."""
    body = ftj_body({"phase": "Running", "startTime": CREATED})
    world = {
        "running": dict(job=the_job(body), pods=(pod("p1", "Running"),), spec_of_run=run_spec(body)),
        "queued-for-capacity": dict(settings=OperatorSettings(max_running_per_namespace=1), ahead=1),
        "invalid": {},
        "failed": dict(job=the_job(body, conditions=[{"type": "Failed", "status": "True"}]),
                       pods=(pod("p1", "Failed", exit_code=1),), spec_of_run=run_spec(body)),
    }[case]
    first_body = ftj_body() if case == "queued-for-capacity" else body
    if case == "invalid":
        first_body = patched(body, {"spec": {"lora": {"r": 0}}})
    first, _ = decided(first_body, **world)
    recorded = {**first_body, "status": stored(first)}
    second, _ = decided(recorded, **world)
    assert merge_patch(stored(first), stored(second)) == {}
    assert second.events == ()
