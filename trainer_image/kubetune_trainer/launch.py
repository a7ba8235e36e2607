"""Several GPUs or nodes: the trainer starts itself under torchrun (torch.distributed.run), one
process per GPU, and gives the pod one exit code for the group, in the operator's contract.

On one node torchrun runs standalone; on several, every pod of the Indexed Job runs torchrun with
its completion index as node rank and pod 0 of the headless Service as the rendezvous host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kubetune.api.finetunejob import Resources
from kubetune.contract import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PREEMPTED,
    RENDEZVOUS_HOST_ENV,
    RENDEZVOUS_PORT,
)


def needs_launcher(resources: Resources, env: Mapping[str, str] = os.environ) -> bool:
    """More than one process, and not yet one of torchrun's workers."""
    return (resources.gpus > 1 or resources.nodes > 1) and "LOCAL_RANK" not in env


def torchrun_args(resources: Resources, spec_path: Path, env: Mapping[str, str] = os.environ) -> list[str]:
    args = [f"--nproc-per-node={max(1, resources.gpus)}", f"--nnodes={resources.nodes}"]
    if resources.nodes > 1:
        args += [f"--node-rank={env['JOB_COMPLETION_INDEX']}", f"--master-addr={env[RENDEZVOUS_HOST_ENV]}",
                 f"--master-port={RENDEZVOUS_PORT}"]
    else:
        args += ["--standalone"]
    return args + ["-m", "kubetune_trainer.main", "--spec", str(spec_path)]


def group_exit_code(codes: set[int]) -> int:
    """One code for the pod from its workers' codes: a bad spec or dataset wins (the Job fails at once),
    then a clean preemption (every failed worker checkpointed and stopped), else a failure."""
    failed = codes - {EXIT_OK}
    if not failed:
        return EXIT_OK
    for decisive in (EXIT_DATA, EXIT_CONFIG):
        if decisive in failed:
            return decisive
    if failed == {EXIT_PREEMPTED}:
        return EXIT_PREEMPTED
    exited = [c for c in failed if c > 0]  # the others were killed by signals
    return min(exited) if exited else EXIT_FAILED


def launch(resources: Resources, spec_path: Path) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(torchrun_args(resources, spec_path)))
    except ChildFailedError as exc:
        # Negative codes are signals; the worker's own termination message already says what happened.
        return group_exit_code({failure.exitcode for failure in exc.failures.values()})
    return EXIT_OK

