"""Kueue preempts a running fine-tuning run for a more important one, on a real control plane with
a node: Kueue's manager (tests/realplane/kueue_manager.py), the operator and the executor as the
node's kubelet (advertising `nvidia.com/gpu: 1`; the LoRA runs on the CPU, there is no CUDA).

A ClusterQueue with one GPU of quota and two WorkloadPriorityClasses: `low` (10) and `high` (1000),
given through the FineTuneJobs' `workloadPriorityClassName`. The low run is admitted, runs and
checkpoints; the high one preempts it: Kueue suspends its Job, the pod gets SIGTERM, checkpoints
and exits 75, the FineTuneJob goes Queued with reason Preempted. When the high run has finished the
low one is admitted again and resumes from its checkpoint, then succeeds.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from kubetune.controller.jobs import job_name
from kubetune.local.controlplane import ControlPlane
from tests.local.runs import finished, short_job, status_of
from tests.realplane.kueue_manager import queued_plane
from tests.realplane.test_job_semantics import RESUMED, checkpoints, log_of, past, pod_ending, real_stack, running_pod
from tests.support import eventually

NAMESPACE, QUEUE = "research", "gpus"
EVERY = 2  # checkpointEverySteps of the low run: at most this many steps may be lost


@pytest.fixture(scope="module")
def plane(tmp_path_factory) -> ControlPlane:
    priorities = [{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": name},
                   "value": value, "description": f"{name}-priority fine-tuning runs"}
                  for name, value in (("low", 10), ("high", 1000))]
    with queued_plane(tmp_path_factory.mktemp("kueue-preemption"), NAMESPACE, QUEUE, priorities) as plane:
        yield plane


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


@pytest.mark.slow
async def test_kueue_preempts_a_running_job_which_resumes_from_its_checkpoint(plane, tmp_path, smollm2_dir):
    async with real_stack(plane, NAMESPACE, tmp_path, smollm2_dir, gpus=1) as stack:
        began = time.monotonic()
        timings: dict[str, float] = {}

        def mark(what: str) -> None:
            timings[what] = time.monotonic() - began

        low = await stack.apply(short_job("low", NAMESPACE, steps=16, every=EVERY, queueName=QUEUE,
                                          workloadPriorityClassName="low", resources={"gpus": 1}))
        store = checkpoints(stack, low, tmp_path)
        first = await eventually(lambda: running_pod(stack, NAMESPACE, job_name("low")), 600, "the low run's pod")
        mark("low running")
        assert _condition(await status_of(stack, NAMESPACE, "low"), "Admitted").get("status") == "True"
        await eventually(lambda: past(store, EVERY), 600, "the low run's first checkpoint")
        mark("low checkpointed")

        ending = asyncio.create_task(pod_ending(plane, NAMESPACE, first["metadata"]["name"]))
        seen_step = 0

        async def preempted():
            nonlocal seen_step  # the furthest step the low run reported: what a preemption may cost
            status = await status_of(stack, NAMESPACE, "low")
            seen_step = max(seen_step, (status.get("progress") or {}).get("step", 0))
            return status if (status.get("phase") == "Queued"
                              and _condition(status, "Admitted").get("reason") == "Preempted") else None

        await stack.apply(short_job("high", NAMESPACE, steps=2, every=1, queueName=QUEUE,
                                    workloadPriorityClassName="high", resources={"gpus": 1}))
        queued = await eventually(preempted, 300, "the low run to be Queued, preempted by Kueue")
        mark("low Queued (Preempted)")
        assert queued["message"].startswith("evicted by Kueue: "), queued["message"]
        stopped = await asyncio.wait_for(ending, 600)
        mark("low pod exited")
        terminated = stopped["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 75, stopped["status"]
        at = max(await asyncio.to_thread(store.complete_steps))

        high = await finished(stack, NAMESPACE, "high", 900)
        assert high["phase"] == "Succeeded", high.get("message")
        mark("high Succeeded")

        second = await eventually(lambda: _other_running(stack, first["metadata"]["name"]), 600,
                                  "the low run to be re-admitted and run again")
        mark("low re-admitted, running")
        resumed = await eventually(lambda: _resumed_at(stack, second), 600, "the low run to resume")
        mark("low resumed")
        assert resumed == at and resumed >= EVERY, (resumed, at)
        assert seen_step - resumed <= EVERY, f"lost {seen_step - resumed} steps (seen {seen_step}, resumed {resumed})"

        done = await finished(stack, NAMESPACE, "low", 900)
        mark("low Succeeded")
        assert done["phase"] == "Succeeded", done.get("message")
        assert done["preemptions"] >= 1 and done["failures"] == 0, done
        assert max(await asyncio.to_thread(store.complete_steps)) == 16
        print(f"Kueue preemption (resumed at step {resumed}, last step seen {seen_step}); s from the first "
              "submission:", ", ".join(f"{k}: {v:.1f}" for k, v in timings.items()))


async def _other_running(stack, not_this: str) -> dict | None:
    pod = await running_pod(stack, NAMESPACE, job_name("low"))
    return pod if pod and pod["metadata"]["name"] != not_this else None


async def _resumed_at(stack, pod: dict) -> int | None:
    found = RESUMED.search(log_of(stack, pod))
    return int(found.group(1)) if found else None
