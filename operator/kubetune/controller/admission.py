"""The per-namespace limit on running jobs, decided from Kopf's in-memory indexes.

A waiting FineTuneJob is looked at every few seconds; answering "is it my turn?" with two LISTs of
every Job and FineTuneJob of the namespace made waiting the operator's main API load (900 waiting
jobs: 5.2 requests/s while nothing changed). The indexes are fed by the watches Kopf keeps anyway, so
the answer costs no request, and a waiting job whose turn has not come is not reconciled at all.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.controller.status import job_finished

WAITING_REASON = "WaitingForCapacity"  # the Admitted condition's reason while the limit holds a job back


@dataclass(frozen=True)
class SeenJob:
    """A batch/v1 Job kubetune manages, as the Jobs index keeps it."""
    owner: str  # the FineTuneJob it runs ("" for a LoraAdapter's merge or verification Job)
    finished: bool


def seen_job(labels: Mapping[str, str], status: Mapping[str, Any] | None, owner_label: str) -> SeenJob:
    return SeenJob(labels.get(owner_label, ""), job_finished(status))


def places_ahead(name: str, created: str, jobs: Iterable[SeenJob], waiting: Iterable[tuple[str, str]],
                 admitted: Iterable[str]) -> int:
    """Jobs that hold or come before this one's turn: unfinished Jobs of other FineTuneJobs (and
    those admitted whose Job the index has not shown yet), and FineTuneJobs created earlier that
    still wait (`waiting`: (creationTimestamp, name) pairs). A LoraAdapter's merge and verification
    Jobs (no owner) are not training runs: the limit is on those."""
    jobs = list(jobs)
    indexed = {j.owner for j in jobs}
    running = sum(1 for j in jobs if j.owner and j.owner != name and not j.finished)
    running += sum(1 for a in admitted if a != name and a not in indexed)
    return running + sum(1 for w in waiting if w < (created, name))


def waiting_for_capacity(status: Mapping[str, Any] | None) -> bool:
    return any(c.get("type") == "Admitted" and c.get("reason") == WAITING_REASON
               for c in (status or {}).get("conditions") or [])


@dataclass
class NamespaceAdmission:
    """One namespace's admission state: the lock that keeps "count, then create the Job" atomic, and
    the jobs admitted under it whose Job the (eventually consistent) index may not show yet."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    admitted: set[str] = field(default_factory=set)

    def ahead(self, name: str, created: str, jobs: Iterable[SeenJob], waiting: Iterable[tuple[str, str]]) -> int:
        jobs = list(jobs)
        self.admitted -= {j.owner for j in jobs}  # the index caught up: it counts them from now on
        return places_ahead(name, created, jobs, waiting, self.admitted)


@dataclass(frozen=True)
class Turn:
    """What one reconcile needs to take its turn: the namespace's state and the live index stores."""
    state: NamespaceAdmission
    jobs: Iterable[SeenJob]
    waiting: Iterable[tuple[str, str]]

    def ahead(self, name: str, created: str) -> int:
        return self.state.ahead(name, created, self.jobs, self.waiting)


class Locks:
    """Locks by key that exist only while someone holds or awaits them, so the operator's memory
    does not grow with every job it has ever seen. Kept alive by the references of their users; a
    WeakValueDictionary drops each one when the last user releases it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[Any, asyncio.Lock] = weakref.WeakValueDictionary()

    def __getitem__(self, key: Any) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def __len__(self) -> int:
        return len(self._locks)
