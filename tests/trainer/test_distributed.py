"""A run with resources.gpus: 2 starts itself under torchrun: two workers (gloo on the CPU here,
NCCL on GPUs) share the batch, rank 0 alone checkpoints and publishes, and the run resumes with a
different number of workers."""

from __future__ import annotations

import json

import pytest

from kubetune.contract import EXIT_OK
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest
from kubetune_trainer.checkpoints import CheckpointStore
from tests.trainer.recipe_support import make_volume, run_spec, run_trainer, write_spec

pytestmark = pytest.mark.slow


def test_two_workers_write_once_and_resume_with_one(tmp_path, smollm2_dir):
    volumes = make_volume(tmp_path, smollm2_dir, records=40)
    output = LocalLocation(volumes / "runs" / "job", "pvc://runs/job")
    common = {"checkpointEverySteps": 2, "output": {"keepCheckpoints": 5}}

    two = write_spec(tmp_path / "two.json", run_spec(tmp_path / "two", volumes, training={"maxSteps": 4},
                                                     resources={"gpus": 2}, **common))
    assert run_trainer(two, tmp_path / "two.log", OMP_NUM_THREADS="1") == EXIT_OK, \
        (tmp_path / "two.log").read_text()[-3000:]
    log = (tmp_path / "two.log").read_text()
    assert "micro-batch 1 x accumulation 1 x 2 process(es) = 2 rows per step" in log  # the spec's batch of 2, split
    assert log.count("published pvc://runs/job") == 1  # rank 0 alone publishes
    assert CheckpointStore(output, keep=5).complete_steps() == [2, 4]
    assert read_manifest(output).metadata["metrics"]["train"]["steps"] == 4
    progress = json.loads((tmp_path / "two" / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["step"] == 4

    # The same run, longer, on one worker: it resumes at step 4 with the whole batch per step.
    one = write_spec(tmp_path / "one.json", run_spec(tmp_path / "one", volumes, training={"maxSteps": 6},
                                                     resources={"gpus": 1}, **common))
    assert run_trainer(one, tmp_path / "one.log", OMP_NUM_THREADS="1") == EXIT_OK, \
        (tmp_path / "one.log").read_text()[-3000:]
    log = (tmp_path / "one.log").read_text()
    assert "resuming from pvc://runs/job/checkpoints/checkpoint-4" in log
    assert "micro-batch 2 x accumulation 1 x 1 process(es) = 2 rows per step" in log
    assert read_manifest(output).metadata["metrics"]["train"]["steps"] == 6
    assert CheckpointStore(output, keep=5).complete_steps() == [2, 4, 6]


def test_one_epoch_on_two_workers_is_one_pass_over_the_rows(tmp_path, smollm2_dir):
    """Each optimizer step takes a micro-batch from every worker: one epoch on two workers is half
    the steps of one worker, and every row is trained on once (not once per worker)."""
    volumes = make_volume(tmp_path, smollm2_dir, records=40)
    spec = write_spec(tmp_path / "epoch.json", run_spec(tmp_path / "epoch", volumes, resources={"gpus": 2},
                                                        training={"maxSteps": None, "epochs": 1}))
    assert run_trainer(spec, tmp_path / "epoch.log", OMP_NUM_THREADS="1") == EXIT_OK, \
        (tmp_path / "epoch.log").read_text()[-3000:]
    train = read_manifest(LocalLocation(volumes / "runs" / "job", "pvc://runs/job")).metadata["metrics"]["train"]
    rows_per_step = 2  # micro-batch 1 on each of the 2 workers
    assert train["rows"] > 2 * rows_per_step
    assert train["steps"] == -(-train["rows"] // rows_per_step)
    assert train["distinctRowsSeen"] == train["rows"]
    assert train["rows"] <= train["rowsSeen"] < train["rows"] + rows_per_step
