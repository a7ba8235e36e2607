"""Prometheus metrics of the operator, served at /metrics when KUBETUNE_METRICS_PORT is set."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime

from prometheus_client import Counter, Gauge, Histogram, start_http_server

JOBS = Gauge("kubetune_finetunejobs", "FineTuneJobs by phase, as last recorded by this operator", ["phase"])
RECONCILE_SECONDS = Histogram("kubetune_reconcile_duration_seconds", "Time to reconcile one object", ["kind"])
RECONCILE_ERRORS = Counter("kubetune_reconcile_errors_total", "Reconciles that raised (Kopf retries them)", ["kind"])
RETRIES = Counter("kubetune_attempts_retried_total", "Trainer attempts after the first, by cause", ["cause"])
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
    """Keep the per-phase gauge equal to the phases last recorded; None forgets a deleted job."""
    old = _phases.pop((namespace, name), None)
    if old is not None:
        JOBS.labels(old).dec()
    if phase is not None:
        _phases[(namespace, name)] = phase
        JOBS.labels(phase).inc()


def attempts_recorded(before: dict, after: dict) -> None:
    for field, cause in (("failures", "failure"), ("preemptions", "preemption")):
        grown = (after.get(field) or 0) - (before.get(field) or 0)
        if grown > 0:
            RETRIES.labels(cause).inc(grown)


def finished(namespace: str, gpus: int, nodes: int, start: str | None, end: str) -> None:
    if not start or not gpus:
        return
    def parse(ts: str) -> datetime:
        return datetime.fromisoformat(ts.replace("Z", "+00:00"))
    hours = max(0.0, (parse(end) - parse(start)).total_seconds()) / 3600
    GPU_HOURS.labels(namespace).inc(gpus * nodes * hours)
