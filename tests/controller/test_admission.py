"""The per-namespace admission decision (pure, from index contents) and the operator's lock table."""

from __future__ import annotations

import asyncio
import gc

from kubetune.controller.admission import Locks, NamespaceAdmission, SeenJob, places_ahead, seen_job

OWNER = "kubetune.dev/finetunejob"


def test_unfinished_jobs_of_others_and_earlier_waiters_come_first():
    jobs = [SeenJob("a", finished=False), SeenJob("b", finished=True), SeenJob("me", finished=False),
            SeenJob("", finished=False)]  # a LoraAdapter's merge Job: no training run, no place
    waiting = [("2026-01-01T00:00:00Z", "early"), ("2026-01-01T00:00:05Z", "late"),
               ("2026-01-01T00:00:02Z", "me")]
    assert places_ahead("me", "2026-01-01T00:00:02Z", jobs, waiting, admitted=()) == 2  # a, early


def test_same_creation_time_is_ordered_by_name():
    waiting = [("2026-01-01T00:00:00Z", "a"), ("2026-01-01T00:00:00Z", "c")]
    assert places_ahead("b", "2026-01-01T00:00:00Z", [], waiting, admitted=()) == 1


def test_admitted_jobs_count_until_the_index_shows_them():
    state = NamespaceAdmission()
    state.admitted |= {"a", "b"}
    # The index has not seen either Job yet: both hold capacity.
    assert state.ahead("c", "t", jobs=[], waiting=[]) == 2
    # It shows a's Job, finished already: a no longer counts, and is not remembered any more.
    assert state.ahead("c", "t", jobs=[SeenJob("a", finished=True)], waiting=[]) == 1
    assert state.admitted == {"b"}


def test_seen_job_reads_the_owner_label_and_the_finished_conditions():
    done = {"conditions": [{"type": "Complete", "status": "True"}]}
    suspended = {"conditions": [{"type": "Suspended", "status": "True"}]}
    assert seen_job({OWNER: "x"}, done, OWNER) == SeenJob("x", finished=True)
    assert seen_job({}, suspended, OWNER) == SeenJob("", finished=False)
    assert seen_job({OWNER: "y"}, None, OWNER) == SeenJob("y", finished=False)


async def test_locks_exclude_while_held_and_are_forgotten_when_released():
    locks = Locks()
    order: list[str] = []
    entered, asking, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first():
        async with locks["ns", "job"]:
            order.append("first in")
            entered.set()
            await release.wait()
            order.append("first out")

    async def second():
        await entered.wait()
        asking.set()  # nothing awaits between this and the acquire below
        async with locks["ns", "job"]:
            order.append("second in")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await asking.wait()
    assert len(locks) == 1 and order == ["first in"]
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["first in", "first out", "second in"]
    del tasks
    gc.collect()
    assert len(locks) == 0
