"""The torchrun launch: its arguments for one node and for a node of several, and the pod's exit
code from its workers' (the operator's contract)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.finetunejob import Resources
from kubetune.contract import EXIT_CONFIG, EXIT_DATA, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_UNAVAILABLE
from kubetune_trainer.launch import group_exit_code, needs_launcher, torchrun_args


def test_only_several_processes_need_the_launcher_and_workers_never_relaunch():
    assert not needs_launcher(Resources(gpus=1), {})
    assert needs_launcher(Resources(gpus=2), {})
    assert needs_launcher(Resources(gpus=1, nodes=2), {})
    assert not needs_launcher(Resources(gpus=8), {"LOCAL_RANK": "3"})


def test_torchrun_arguments():
    one_node = torchrun_args(Resources(gpus=4), Path("/etc/kubetune/runspec.json"), {})
    assert one_node == ["--nproc-per-node=4", "--nnodes=1", "--standalone", "-m", "kubetune_trainer.main",
                        "--spec", "/etc/kubetune/runspec.json"]
    env = {"JOB_COMPLETION_INDEX": "1", "KUBETUNE_RENDEZVOUS_HOST": "big-train-0.big-train"}
    node = torchrun_args(Resources(gpus=8, nodes=2), Path("/s.json"), env)
    assert node[:5] == ["--nproc-per-node=8", "--nnodes=2", "--node-rank=1", "--master-addr=big-train-0.big-train",
                        "--master-port=29500"]


@pytest.mark.parametrize("codes,expected", [
    ({EXIT_OK}, EXIT_OK),
    ({EXIT_PREEMPTED, EXIT_OK}, EXIT_PREEMPTED),
    ({EXIT_PREEMPTED, EXIT_DATA}, EXIT_DATA),  # a bad dataset fails the Job at once, whoever saw it
    ({EXIT_CONFIG, EXIT_FAILED}, EXIT_CONFIG),
    ({EXIT_PREEMPTED, EXIT_FAILED}, EXIT_FAILED),  # one worker did not checkpoint: a failure, retried
    ({EXIT_UNAVAILABLE, EXIT_OK}, EXIT_UNAVAILABLE),
    ({-9, EXIT_OK}, EXIT_FAILED),  # killed by a signal
])
def test_the_pods_exit_code_from_its_workers(codes, expected):
    assert group_exit_code(codes) == expected
