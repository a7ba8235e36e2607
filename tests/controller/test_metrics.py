"""What a status write turns into on /metrics (prometheus_client's own registry and exposition):
each job's curves while it runs, gone when the job is deleted; its queue wait once; a failure once,
by its reason."""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.controller import metrics

META = {"namespace": "team-a", "name": "curves", "creationTimestamp": "2026-12-01T10:00:00Z"}


def job(meta: dict, status: dict, gpus: int = 1) -> dict:
    return {"metadata": meta, "spec": {"resources": {"gpus": gpus}}, "status": status}


def series() -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()) for s in family.samples}


def job_series(name: str) -> dict[str, float]:
    return {metric: value for (metric, labels), value in series().items()
            if ("name", name) in labels and metric.startswith("kubetune_finetunejob_")}


def value(metric: str, **labels: str) -> float:
    return series().get((metric, tuple(sorted(labels.items()))), 0.0)


def test_progress_becomes_per_job_series_that_go_with_the_job():
    metrics.status_recorded(job(META, {}), {"phase": "Running", "startTime": "2026-12-01T10:05:00Z", "progress": {
        "step": 5, "totalSteps": 20, "loss": 1.25, "evalLoss": None, "tokensPerSecond": 900.0}})
    assert job_series("curves") == {"kubetune_finetunejob_loss": 1.25, "kubetune_finetunejob_progress_ratio": 0.25,
                                    "kubetune_finetunejob_tokens_per_second": 900.0}  # no eval yet: no series
    metrics.status_recorded(job(META, {"phase": "Running"}), {"progress": {"step": 10, "totalSteps": 20, "loss": 0.5,
                                                                      "evalLoss": 0.75}})
    assert job_series("curves")["kubetune_finetunejob_eval_loss"] == 0.75
    assert job_series("curves")["kubetune_finetunejob_progress_ratio"] == 0.5
    metrics.phase_recorded("team-a", "curves", None)  # the operator's clean-up of a deleted job
    assert job_series("curves") == {}


def test_queue_wait_failures_retries_and_gpu_hours_are_counted_once():
    waits = value("kubetune_queue_wait_seconds_count", namespace="team-b")
    sums = value("kubetune_queue_wait_seconds_sum", namespace="team-b")
    failures = value("kubetune_finetunejobs_failed_total", reason="BackoffLimitExceeded")
    retried = value("kubetune_attempts_retried_total", cause="failure")
    hours = value("kubetune_gpu_hours_requested_total", namespace="team-b")
    meta = {**META, "namespace": "team-b", "name": "failing"}
    running = {"phase": "Running", "startTime": "2026-12-01T10:02:00Z", "failures": 1}
    failed = {"phase": "Failed", "failures": 2, "completionTime": "2026-12-01T12:02:00Z",
              "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    metrics.status_recorded(job(meta, {}, gpus=4), {"phase": "Running", "startTime": "2026-12-01T10:02:00Z",
                                                    "failures": 1})
    metrics.status_recorded(job(meta, running, gpus=4), failed)
    metrics.status_recorded(job(meta, {**running, **failed}, gpus=4), failed)  # a re-write
    assert value("kubetune_queue_wait_seconds_count", namespace="team-b") - waits == 1
    assert value("kubetune_queue_wait_seconds_sum", namespace="team-b") - sums == 120
    assert value("kubetune_finetunejobs_failed_total", reason="BackoffLimitExceeded") - failures == 1
    assert value("kubetune_attempts_retried_total", cause="failure") - retried == 2
    assert value("kubetune_gpu_hours_requested_total", namespace="team-b") - hours == 8  # 4 GPUs x 2 h
    metrics.phase_recorded("team-b", "failing", None)
