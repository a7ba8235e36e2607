"""The run's history (history.jsonl): a row per step, published and listed in the run manifest, one
continuous curve across a kill and a resume, and summed up in the run's training metrics."""

from __future__ import annotations

import json
import os

import pytest

from kubetune.api.loraadapter import Threshold
from kubetune.contract import EXIT_OK, HISTORY_FILE
from kubetune.controller.adapters import gate_violations, run_metrics
from kubetune.storage.location import LocalLocation, sha256_file
from kubetune.storage.manifest import Manifest, read_manifest
from kubetune_trainer.checkpoints import CheckpointStore
from kubetune_trainer.history import history_rows, summary, write_tensorboard
from tests.trainer.recipe_support import make_volume, run_spec, run_trainer, write_spec
from tests.trainer.test_resume import _start, _wait_for

STEPS, EVERY = 5, 2


@pytest.mark.slow
def test_history_is_one_continuous_curve_across_a_kill_and_resume(tmp_path, smollm2_dir):
    volumes = make_volume(tmp_path, smollm2_dir, records=60)
    out = LocalLocation(volumes / "runs" / "hist")
    store = CheckpointStore(out, keep=2)
    spec = write_spec(tmp_path / "run.json", run_spec(
        tmp_path / "run", volumes, output_uri="pvc://runs/hist", training={"maxSteps": STEPS},
        checkpointEverySteps=EVERY, output={"keepCheckpoints": 2}))
    log = tmp_path / "run.log"

    # Attempt 1 is killed (no chance to checkpoint) once its first checkpoint is complete; steps it
    # logged after that checkpoint are retrained by attempt 2 and must not appear twice.
    first = _start(spec, {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    _wait_for(lambda: bool(store.complete_steps()), 300, first, "a checkpoint")
    first.kill()
    first.wait(30)
    resumed_from = max(store.complete_steps())
    assert resumed_from < STEPS
    resume_log = tmp_path / "resume.log"  # run_trainer truncates its log: attempt 1's stays in run.log
    assert run_trainer(spec, resume_log) == EXIT_OK
    assert f"resuming from pvc://runs/hist/checkpoints/checkpoint-{resumed_from}" in resume_log.read_text()

    manifest = read_manifest(out)
    listed = {f.path: f for f in manifest.files}
    assert HISTORY_FILE in listed and listed[HISTORY_FILE].sha256 == sha256_file(out.root / HISTORY_FILE)
    assert any(path.startswith("tensorboard/events.out.tfevents.") for path in listed)
    rows = [json.loads(line) for line in (out.root / HISTORY_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert {"step", "epoch", "loss", "learningRate", "gradNorm", "tokensPerSecond"} <= row.keys(), row
    # Hold-out loss at every checkpoint, the one resumed from included, and at the end.
    assert [r["step"] for r in rows if "evalLoss" in r] == [*range(EVERY, STEPS, EVERY), STEPS]

    train = manifest.metadata["metrics"]["train"]
    assert train["steps"] == STEPS and train["finalLoss"] == rows[-1]["loss"]
    assert train["tokensSeen"] == round(manifest.metadata["data"]["tokens"] * rows[-1]["epoch"])
    best = min((r for r in rows if "evalLoss" in r), key=lambda r: r["evalLoss"])
    assert (train["bestEvalLoss"], train["bestEvalStep"]) == (best["evalLoss"], best["step"])


def test_rows_merge_evaluations_into_their_step_and_summary_reads_them():
    log = [{"loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.5, "epoch": 0.1, "step": 1},
           {"loss": 1.5, "learning_rate": 1e-3, "grad_norm": 1.2, "epoch": 0.2, "step": 2,
            "kubetune_tokens_per_second": 90.5},
           {"eval_loss": 1.7, "step": 2},
           {"loss": 1.2, "learning_rate": 5e-4, "grad_norm": 0.9, "epoch": 0.3, "step": 3},
           {"train_runtime": 4.0, "train_loss": 1.56, "step": 3}]
    rows = history_rows(log, final_eval_loss=1.8)
    assert rows == [
        {"step": 1, "epoch": 0.1, "loss": 2.0, "learningRate": 1e-3, "gradNorm": 1.5},
        {"step": 2, "epoch": 0.2, "loss": 1.5, "learningRate": 1e-3, "gradNorm": 1.2, "tokensPerSecond": 90.5,
         "evalLoss": 1.7},
        {"step": 3, "epoch": 0.3, "loss": 1.2, "learningRate": 5e-4, "gradNorm": 0.9, "evalLoss": 1.8}]
    assert summary(rows, tokens_per_epoch=1000) == {"finalLoss": 1.2, "bestEvalLoss": 1.7, "bestEvalStep": 2,
                                                    "tokensSeen": 300}
    assert summary([]) == {}


def test_the_curve_summary_reaches_the_adapter_metrics_and_its_promotion_gate():
    # The operator reads metrics.train from the run manifest it already verifies: no history read.
    rows = [{"step": 1, "epoch": 0.1, "loss": 2.0, "evalLoss": 1.9}, {"step": 2, "epoch": 0.2, "loss": 1.4},
            {"step": 3, "epoch": 0.3, "loss": 1.1, "evalLoss": 1.3}]
    manifest = Manifest("RunManifest", [], {"metrics": {"final": {"evalLoss": 1.3},
                                                        "train": {"steps": 3, **summary(rows, 100)}}})
    metrics = run_metrics(manifest)
    assert {k: metrics[k] for k in ("train.bestEvalLoss", "train.bestEvalStep", "train.finalLoss",
                                    "train.tokensSeen", "train.steps")} == {
        "train.bestEvalLoss": 1.3, "train.bestEvalStep": 3.0, "train.finalLoss": 1.1, "train.tokensSeen": 30.0,
        "train.steps": 3.0}
    assert gate_violations([Threshold(metric="train.bestEvalLoss", max=1.5)], metrics) == []
    assert gate_violations([Threshold(metric="train.bestEvalLoss", max=1.0)], metrics) == [
        "train.bestEvalLoss 1.3 > max 1"]


def test_tensorboard_events_hold_the_history_step_for_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = [{"step": 1, "loss": 2.0, "learningRate": 1e-3}, {"step": 2, "loss": 1.5, "learningRate": 1e-3,
                                                              "evalLoss": 1.7}]
    assert write_tensorboard(rows, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5)]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("eval/loss")] == [(2, 1.7)]
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/learning_rate", "eval/loss"}
