"""Kopf handlers: thin adapters from events to the reconcile functions."""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
from typing import Any

import kopf

from kubetune.api import GROUP, VERSION
from kubetune.controller import metrics
from kubetune.controller.adapters import adapter_path, delete_artifacts, recheck_adapter, reconcile_adapter
from kubetune.controller.admission import Locks, NamespaceAdmission, SeenJob, Turn, seen_job, waiting_for_capacity
from kubetune.controller.jobs import LABEL_JOB, LABEL_MANAGED, MANAGER
from kubetune.controller.kube import TRANSIENT_STATUS, ApiError, KubeClient, KubeConfig
from kubetune.controller.merging import LABEL_ADAPTER_OWNER
from kubetune.controller.reconcile import Children, clean_up, ftj_path, reconcile
from kubetune.controller.settings import OperatorSettings

OURS = {LABEL_MANAGED: MANAGER}
RECURSION_LIMIT = 25_000  # enough for 10,000 levels through deepcopy and JSON patches


@kopf.on.login()
def login(**_) -> kopf.ConnectionInfo:
    # Kopf calls this again whenever the API server answers 401: a rotated token is picked up then.
    return KubeConfig.load().kopf_connection()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # The API server accepts JSON nested up to 10,000 levels (apimachinery's limit), for instance in a
    # preserve-unknown-fields subtree; Kopf copies and diffs every object recursively before any
    # handler runs, so with Python's default limit (1,000) such an object would crash its processing
    # and never get the status that refuses it. Python frames do not use the C stack (3.11+).
    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    # Kopf's bookkeeping goes to annotations: status belongs to the operator's own writes only.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.dev")
    settings.persistence.finalizer = "kubetune.dev/cleanup"
    settings.posting.level = logging.INFO
    memo.client = KubeClient(KubeConfig.load())
    memo.settings = OperatorSettings.from_env()
    if memo.settings.metrics_port:
        metrics.serve(memo.settings.metrics_port)
    memo.locks = Locks()
    memo.admission = collections.defaultdict(NamespaceAdmission)


@kopf.index("batch", "v1", "jobs", labels=OURS)
def kubetune_jobs(namespace: str | None, labels, status, **_) -> dict[str | None, SeenJob]:
    return {namespace: seen_job(labels or {}, status, LABEL_JOB)}


@kopf.index(GROUP, VERSION, "finetunejobs", when=lambda status, **_: (status or {}).get("phase") == "Queued")
def queued_finetunejobs(namespace: str | None, name: str, meta, **_) -> dict[str | None, tuple[str, str]]:
    return {namespace: (meta.get("creationTimestamp") or "", name)}


# A FineTuneJob's own Job and pods, so that a reconcile (one per progress report a trainer writes)
# reads them from memory instead of the API server.
RUNS_FOR_A_JOB: dict[str, Any] = {**OURS, LABEL_JOB: kopf.PRESENT}


@kopf.index("batch", "v1", "jobs", labels=RUNS_FOR_A_JOB)
def jobs_by_owner(namespace: str | None, labels, body, **_) -> dict[tuple[str | None, str], dict]:
    return {(namespace, labels[LABEL_JOB]): dict(body)}


@kopf.index("", "v1", "pods", labels=RUNS_FOR_A_JOB)
def pods_by_owner(namespace: str | None, labels, body, **_) -> dict[tuple[str | None, str], dict]:
    return {(namespace, labels[LABEL_JOB]): dict(body)}


def _turn(namespace: str, memo: kopf.Memo, indexes: dict) -> Turn:
    """Kopf passes every index to every handler as a keyword named after its function; Kopf's handler
    protocols do not declare them, so they are taken from the handlers' **kwargs."""
    jobs: kopf.Index = indexes["kubetune_jobs"]
    waiting: kopf.Index = indexes["queued_finetunejobs"]
    return Turn(memo.admission[namespace], jobs.get(namespace, ()), waiting.get(namespace, ()))


def _children(namespace: str, name: str, indexes: dict) -> Children:
    jobs: kopf.Index = indexes["jobs_by_owner"]
    pods: kopf.Index = indexes["pods_by_owner"]
    return Children(next(iter(jobs.get((namespace, name), ())), None), list(pods.get((namespace, name), ())))


@contextlib.contextmanager
def _transient_api_errors():
    """An API server still failing after the client's own retries, or a write that lost a race
    (409 Conflict: every reconcile starts from a fresh read): try again in seconds, not the minute
    Kopf waits after an unexpected error."""
    try:
        yield
    except ApiError as exc:
        if exc.status in TRANSIENT_STATUS or exc.status == 409:
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        raise


async def _reconcile_latest(namespace: str, name: str, memo: kopf.Memo, indexes: dict,
                            turn: Turn | None = None) -> None:
    """One reconcile at a time per FineTuneJob, always on a fresh read of the FineTuneJob: events
    about the job, its Job and its pods arrive concurrently, and a reconcile working from an older
    copy must not overwrite what a newer one recorded. Its Job and pods come from the indexes, read
    under the lock."""
    async with memo.locks[namespace, name]:
        body = await memo.client.get(ftj_path(namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        with metrics.reconciling("FineTuneJob"), _transient_api_errors():
            await reconcile(memo.client, memo.settings, body, turn or _turn(namespace, memo, indexes),
                            _children(namespace, name, indexes))


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_) -> None:
    await memo.client.close()


@kopf.on.resume(GROUP, VERSION, "finetunejobs")
@kopf.on.create(GROUP, VERSION, "finetunejobs")
@kopf.on.update(GROUP, VERSION, "finetunejobs", field="spec")
async def finetunejob_changed(namespace: str | None, name: str, memo: kopf.Memo, **kwargs) -> None:
    assert namespace is not None  # kopf's type covers cluster-scoped kinds; ours are namespaced
    await _reconcile_latest(namespace, name, memo, kwargs)


@kopf.timer(GROUP, VERSION, "finetunejobs", interval=5, idle=2,
            when=lambda status, **_: (status or {}).get("phase") == "Queued")
async def finetunejob_waiting(namespace: str | None, name: str, meta, status, memo: kopf.Memo, **kwargs) -> None:
    assert namespace is not None
    # Re-checked until capacity frees up; reconcile admits waiting jobs in creation order. While the
    # indexes say its turn has not come, nothing is read or written.
    turn = _turn(namespace, memo, kwargs)
    limit = memo.settings.max_running_per_namespace
    if limit and waiting_for_capacity(status) and turn.ahead(name, meta.get("creationTimestamp") or "") >= limit:
        return
    await _reconcile_latest(namespace, name, memo, kwargs, turn)


@kopf.on.delete(GROUP, VERSION, "finetunejobs")
async def finetunejob_deleted(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    await clean_up(memo.client, dict(body))


async def _owner_changed(labels, namespace: str, memo: kopf.Memo, indexes: dict) -> None:
    """A Job or pod of ours changed: reconcile the FineTuneJob or LoraAdapter it works for."""
    labels = labels or {}
    if labels.get(LABEL_JOB):
        await _reconcile_latest(namespace, labels[LABEL_JOB], memo, indexes)
    elif labels.get(LABEL_ADAPTER_OWNER):
        await _adapter_latest(namespace, labels[LABEL_ADAPTER_OWNER], memo)


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
async def job_event(labels, namespace, memo: kopf.Memo, **kwargs) -> None:
    await _owner_changed(labels, namespace, memo, kwargs)


@kopf.on.event("", "v1", "pods", labels=OURS)
async def pod_event(labels, namespace, memo: kopf.Memo, **kwargs) -> None:
    await _owner_changed(labels, namespace, memo, kwargs)



@kopf.on.resume(GROUP, VERSION, "loraadapters")
@kopf.on.create(GROUP, VERSION, "loraadapters")
@kopf.on.update(GROUP, VERSION, "loraadapters", field="spec")
async def adapter_changed(namespace: str | None, name: str, memo: kopf.Memo, **_) -> None:
    assert namespace is not None
    await _adapter_latest(namespace, name, memo)


async def _adapter_latest(namespace: str, name: str, memo: kopf.Memo) -> None:
    async with memo.locks["loraadapters", namespace, name]:
        body = await memo.client.get(adapter_path(namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        with metrics.reconciling("LoraAdapter"), _transient_api_errors():
            await reconcile_adapter(memo.client, memo.settings, body)


@kopf.daemon(GROUP, VERSION, "loraadapters", cancellation_timeout=5)
async def adapter_rechecked(namespace: str | None, name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                            **_) -> None:
    """Every KUBETUNE_REVERIFY_SECONDS: a Ready adapter's artifact is listed and compared with what
    was verified (cheap: no download); a change triggers a full verification."""
    assert namespace is not None
    interval = memo.settings.reverify_seconds
    while interval and not stopped:
        await stopped.wait(interval)
        if stopped:
            return
        async with memo.locks["loraadapters", namespace, name]:
            body = await memo.client.get(adapter_path(namespace, name))
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            with metrics.reconciling("LoraAdapter"), _transient_api_errors():
                await recheck_adapter(memo.client, memo.settings, body)


@kopf.on.delete(GROUP, VERSION, "loraadapters")
async def adapter_deleted(body: kopf.Body, memo: kopf.Memo, **_) -> None:
    await delete_artifacts(memo.client, dict(body))
