"""Killed and preempted runs resume from the newest complete checkpoint and end where an
uninterrupted run ends: same step count, same weights (same data order, optimizer and scheduler)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kubetune.storage.config import SECRET_KEYS
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest
from kubetune_trainer.checkpoints import CheckpointStore
from kubetune.contract import EXIT_OK, EXIT_PREEMPTED
from tests.trainer.recipe_support import make_volume, run_spec, write_spec

pytestmark = pytest.mark.slow
STEPS, EVERY = 12, 4


def _env(config) -> dict[str, str]:
    values = {"endpoint": f"http://{config.endpoint}", "accessKey": config.access_key,
              "secretKey": config.secret_key, "region": config.region}
    return {**os.environ, **{SECRET_KEYS[k]: v for k, v in values.items()}, "PYTHONUNBUFFERED": "1"}


def _start(spec_path, env, log):
    return subprocess.Popen([sys.executable, "-m", "kubetune_trainer.main", "--spec", str(spec_path)], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout: float, process=None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"trainer exited with {process.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise TimeoutError(what)


def _adapter_weights(location, tmp_path, name):
    manifest = read_manifest(location)
    location.get_file("adapter/adapter_model.safetensors", tmp_path / name)
    return manifest, load_file(tmp_path / name)


def test_kill_and_preemption_resume_to_the_same_result(tmp_path, smollm2_dir, s3_server, s3_bucket):
    volumes = make_volume(tmp_path, smollm2_dir, records=60)
    s3_bucket.put_file("data/invoices.jsonl", volumes / "data" / "invoices.jsonl")
    env = _env(s3_server.config)
    common = {"training": {"maxSteps": STEPS}, "checkpointEverySteps": EVERY, "output": {"keepCheckpoints": 3},
              "dataset_uri": f"s3://{s3_bucket.bucket}/data/invoices.jsonl", "storage": True}

    # Reference: one uninterrupted run.
    ref_uri = f"s3://{s3_bucket.bucket}/runs/reference"
    ref_spec = write_spec(tmp_path / "ref.json", run_spec(tmp_path / "ref", volumes, output_uri=ref_uri, **common))
    assert subprocess.run([sys.executable, "-m", "kubetune_trainer.main", "--spec", str(ref_spec)], env=env,
                          stdout=open(tmp_path / "ref.log", "wb"), stderr=subprocess.STDOUT).returncode == EXIT_OK

    uri = f"s3://{s3_bucket.bucket}/runs/interrupted"
    out = s3_bucket.child("runs/interrupted")
    store = CheckpointStore(out, keep=3)
    spec = write_spec(tmp_path / "run.json", run_spec(tmp_path / "run", volumes, output_uri=uri, **common))
    log = tmp_path / "run.log"

    # Attempt 1: SIGKILL (no chance to checkpoint) once the first checkpoint is complete.
    first = _start(spec, env, log)
    _wait_for(lambda: store.complete_steps() == [EVERY], 300, first, "checkpoint 4")
    first.kill()
    first.wait(30)

    # Attempt 2: resumes from 4; SIGTERM once checkpoint 8 is complete -> checkpoint, exit "preempted".
    second = _start(spec, env, log)
    _wait_for(lambda: 2 * EVERY in store.complete_steps(), 300, second, "checkpoint 8")
    second.send_signal(signal.SIGTERM)
    assert second.wait(120) == EXIT_PREEMPTED
    preempted_at = max(store.complete_steps())
    assert 2 * EVERY <= preempted_at < STEPS  # checkpointed where it stopped, not at the next multiple
    assert "resuming from s3://" in log.read_text()

    # Attempt 3: resumes from the SIGTERM checkpoint and finishes.
    third = _start(spec, env, log)
    assert third.wait(300) == EXIT_OK
    assert f"resuming from {uri}/checkpoints/checkpoint-{preempted_at}" in log.read_text()

    manifest, weights = _adapter_weights(out, tmp_path, "a.safetensors")
    ref_manifest, ref_weights = _adapter_weights(s3_bucket.child("runs/reference"), tmp_path, "r.safetensors")
    assert manifest.metadata["metrics"]["train"]["steps"] == STEPS
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    assert manifest.metadata["metrics"]["final"]["evalLoss"] == pytest.approx(
        ref_manifest.metadata["metrics"]["final"]["evalLoss"], abs=1e-4)
    # Over all 12 steps, not only the last attempt's.
    assert manifest.metadata["metrics"]["train"]["trainLoss"] == pytest.approx(
        ref_manifest.metadata["metrics"]["train"]["trainLoss"], rel=1e-3)


def test_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    location = LocalLocation(tmp_path / "out")
    store = CheckpointStore(location, keep=2)
    good = tmp_path / "ck"
    good.mkdir()
    (good / "adapter_model.safetensors").write_bytes(b"x" * 10)
    store.push(good, 4)
    location.put_bytes("checkpoints/checkpoint-8/adapter_model.safetensors", b"half")  # died before its manifest
    assert store.complete_steps() == [4]
    path, uri = store.pull_latest(tmp_path / "work")
    assert uri.endswith("checkpoint-4") and (path / "adapter_model.safetensors").read_bytes() == b"x" * 10


def test_a_retry_after_the_last_step_trains_no_further(tmp_path, smollm2_dir):
    """A run whose training ended but whose publication failed is retried by its Job: it resumes from
    the checkpoint saved at its last step and must only evaluate and publish again. (Before the
    fix the retry trained step 4 of 3.)"""
    from kubetune_trainer.recipe import FineTuneRecipe
    from kubetune_trainer.runspec import RunSpec

    volumes = make_volume(tmp_path, smollm2_dir, records=40)
    body = run_spec(tmp_path, volumes, training={"maxSteps": 3}, checkpointEverySteps=2)
    assert FineTuneRecipe(RunSpec.model_validate(body)).run().metrics["train"]["steps"] == 3
    assert FineTuneRecipe(RunSpec.model_validate(body)).run().metrics["train"]["steps"] == 3
