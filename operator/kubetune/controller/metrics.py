"""Prometheus metrics of the operator, served at /metrics when KUBETUNE_METRICS_PORT is set.

The per-job gauges mirror the progress the status already carries (the trainer's latest values), so
Prometheus scraping the operator draws each run's curves while it runs; a deleted job's series go
with it. The chart's Grafana dashboard (charts/kubetune/dashboards/) queries these names."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kubetune.api.meta import parse_rfc3339

JOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase, as last recorded by this operator", ["phase"])
RECONCILE_SECONDS = Histogram("kubetune_reconcile_duration_seconds", "Time to reconcile one object", ["kind"])
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised (Kopf retries them)", ["kind"])
RETRIES = Counter("kubetune_attempts_retried_total", "Trainer attempts after the first, by cause", ["cause"])
FAILED = Counter("kubetune_finetunejobs_failed_total", "FineTuneJobs that ended Failed, by reason", ["reason"])
QUEUE_WAIT = Histogram("kubetune_queue_wait_seconds", "From a FineTuneJob's creation to its first pod running",
                       ["namespace"], buckets=(10, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600))
# Gauges of each job's latest progress, by the status field they mirror.
JOB_PROGRESS = {
    field: Gauge(f"kubetune_finetunejob_{metric}", help_, ["namespace", "name"])
    for field, metric, help_ in (
        ("loss", "loss", "Latest training loss the trainer reported"),
        ("evalLoss", "eval_loss", "Latest hold-out loss the trainer reported"),
        ("tokensPerSecond", "tokens_per_second", "Latest training throughput, tokens per second"),
        ("ratio", "progress_ratio", "Optimizer steps done over the run's total steps (0 to 1)"),
    )
}
GPU_HOURS = Counter("kubetune_gpu_hours_requested_total",
                    "GPU-hours held by finished FineTuneJobs (GPUs x nodes x running time)", ["namespace"])

_phases: dict[tuple[str, str], str] = {}


def serve(port: int) -> None:
    start_http_server(port)


@contextmanager
def reconciling(kind: str):
    start = time.monotonic()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(kind).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - start)


def phase_recorded(namespace: str, name: str, phase: str | None) -> None:
    """Keep the per-phase gauge equal to the phases last recorded; None forgets a deleted job and
    its per-job series."""
    old = _phases.pop((namespace, name), None)
    if old is not None:
        JOBS.labels(old).dec()
    if phase is not None:
        _phases[(namespace, name)] = phase
        JOBS.labels(phase).inc()
    else:
        for gauge in JOB_PROGRESS.values():
            try:
                gauge.remove(namespace, name)
            except KeyError:  # never reported progress
                pass


def status_recorded(body: dict, patch: dict) -> None:
    """What a status write changes, as metrics: the job's phase, its progress gauges, its queue wait
    (when its first pod ran), a failure by reason (when it turns Failed), retried attempts by cause,
    and its GPU-hours (when it completes)."""
    meta, before = body["metadata"], body.get("status") or {}
    namespace, name = meta["namespace"], meta["name"]
    if "phase" in patch:
        phase_recorded(namespace, name, patch["phase"])
        if patch["phase"] == "Failed" and before.get("phase") != "Failed":
            failed: dict = next((c for c in patch.get("conditions") or [] if c["type"] == "Failed"), {})
            FAILED.labels(failed.get("reason") or "Unknown").inc()
    if patch.get("progress"):
        _progress_recorded(namespace, name, patch["progress"])
    start = before.get("startTime") or patch.get("startTime")
    if patch.get("startTime") and not before.get("startTime") and meta.get("creationTimestamp"):
        wait = (parse_rfc3339(patch["startTime"]) - parse_rfc3339(meta["creationTimestamp"])).total_seconds()
        QUEUE_WAIT.labels(namespace).observe(max(0.0, wait))
    for field, cause in (("failures", "failure"), ("preemptions", "preemption")):
        grown = (patch.get(field) or 0) - (before.get(field) or 0)
        if grown > 0:
            RETRIES.labels(cause).inc(grown)
    resources = (body.get("spec") or {}).get("resources") or {}
    gpus, nodes = resources.get("gpus", 1), resources.get("nodes", 1)
    if patch.get("completionTime") and not before.get("completionTime") and start and gpus:
        hours = max(0.0, (parse_rfc3339(patch["completionTime"]) - parse_rfc3339(start)).total_seconds()) / 3600
        GPU_HOURS.labels(namespace).inc(gpus * nodes * hours)


def _progress_recorded(namespace: str, name: str, progress: dict) -> None:
    """A value the trainer has not reported yet is left out rather than exported as 0."""
    step, total = progress.get("step"), progress.get("totalSteps")
    values = {**progress, "ratio": step / total if step is not None and total else None}
    for field, gauge in JOB_PROGRESS.items():
        if isinstance(values.get(field), (int, float)):
            gauge.labels(namespace, name).set(values[field])
