"""The run's training history: one row per logged step, published as ARTIFACT/history.jsonl
(kubetune.contract.HISTORY_FILE).

The record is the Trainer's own step log (`state.log_history`, one entry per optimizer step with
logging_steps=1). transformers saves it in every checkpoint's trainer_state.json and restores it
on resume, so a killed and resumed run has each step once: what the killed attempt logged after its
last complete checkpoint is gone with it, and those steps are logged again as they are retrained.
Keeping the history inside the checkpoint (rather than appending to a file beside it and cutting it
back on resume) means the history can never be ahead of or behind the weights it describes.

`TrainingHistory` adds to those same entries what the Trainer does not log (tokens/s, GPU memory),
and the hold-out loss measured at each checkpoint. That evaluation runs after the Trainer
wrote the checkpoint's state, so `recording` rewrites the checkpoint's trainer_state.json before
the checkpoint is uploaded. The progress annotation is unchanged: it carries the latest values only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

from kubetune_trainer import distributed
from kubetune_trainer.training import peak_memory_gib

log = logging.getLogger(__name__)
# Trainer log keys -> history fields; the kubetune_* keys are ours, added to the same log entries.
_TRAINER_FIELDS = {"epoch": "epoch", "loss": "loss", "learning_rate": "learningRate", "grad_norm": "gradNorm",
                   "kubetune_tokens_per_second": "tokensPerSecond",
                   "kubetune_gpu_peak_memory_gib": "gpuPeakMemoryGiB"}
_EVAL_LOSS = "eval_loss"  # the key the Trainer's own evaluations log under
TENSORBOARD_DIR = "tensorboard"
# History fields -> TensorBoard tags, named as transformers' TensorBoard integration names them.
_TENSORBOARD_TAGS = {"loss": "train/loss", "learningRate": "train/learning_rate", "gradNorm": "train/grad_norm",
                     "epoch": "train/epoch", "tokensPerSecond": "train/tokens_per_second",
                     "gpuPeakMemoryGiB": "train/gpu_peak_memory_gib", "evalLoss": "eval/loss"}


class TrainingHistory(TrainerCallback):
    """loss_tokens: this process's count of loss-bearing tokens handed to the model in this attempt.
    The data loader fetches one batch ahead, so the count runs a batch ahead of the trained steps:
    harmless to a rate over a window, which is why the history keeps rates and no running total."""

    def __init__(self, loss_tokens: Callable[[], int], ranks: distributed.Ranks):
        self.loss_tokens, self.ranks = loss_tokens, ranks
        self._state: Any = None
        self._output_dir: Path | None = None
        self._mark = (0.0, 0)  # (monotonic time, all processes' tokens of this attempt) at the last log

    def on_train_begin(self, args, state, control, **kw):
        # On resume `state` already holds the checkpoint's log.
        self._state, self._output_dir = state, Path(args.output_dir)
        self._mark = (time.monotonic(), distributed.total(self.ranks, self.loss_tokens()))

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        # Every process logs each step, so the sum over processes is a collective every rank joins.
        now, tokens = time.monotonic(), distributed.total(self.ranks, self.loss_tokens())
        elapsed = now - self._mark[0]
        entry = state.log_history[-1]  # the Trainer appends this step's entry just before calling on_log
        if elapsed > 0:
            entry["kubetune_tokens_per_second"] = round((tokens - self._mark[1]) / elapsed, 1)
        memory = peak_memory_gib()
        if memory is not None:
            entry["kubetune_gpu_peak_memory_gib"] = memory
        self._mark = (now, tokens)

    def recording(self, evaluate: Callable[[], dict]) -> Callable[[], dict]:
        """Wraps the evaluation a checkpoint runs: its loss joins the step log, and the checkpoint's
        saved state (written before the evaluation, uploaded after it) is rewritten to hold it."""
        def evaluate_and_record() -> dict:
            metrics = evaluate()
            state, loss = self._state, metrics.get("evalLoss")
            if state is None or loss is None or self._output_dir is None:
                return metrics
            state.log_history.append({_EVAL_LOSS: loss, "step": state.global_step})
            saved = self._output_dir / f"checkpoint-{state.global_step}" / TRAINER_STATE_NAME
            if self.ranks.is_main and saved.exists():
                state.save_to_json(str(saved))
            return metrics
        return evaluate_and_record


def history_rows(log_history: list[dict], final_eval_loss: float | None = None) -> list[dict]:
    """One row per trained step, in order, with the hold-out loss on the steps it was measured at;
    final_eval_loss: the evaluation after training, which measured the last step's weights."""
    rows: list[dict] = []
    for entry in log_history:
        if "loss" in entry:
            row = {"step": int(entry["step"])}
            row |= {name: entry[key] for key, name in _TRAINER_FIELDS.items() if entry.get(key) is not None}
            rows.append(row)
        elif _EVAL_LOSS in entry and rows and rows[-1]["step"] == entry["step"]:
            rows[-1]["evalLoss"] = entry[_EVAL_LOSS]
    if rows and final_eval_loss is not None:
        rows[-1]["evalLoss"] = final_eval_loss
    return rows


def summary(rows: list[dict], tokens_per_epoch: int | None = None) -> dict[str, float | int]:
    """The curve in a few numbers, published with the run's training metrics (train.NAME to a
    LoraAdapter's evaluationGate): best hold-out loss and its step, final loss, and the tokens seen:
    the training split's tokens times the epochs trained (exact for whole epochs)."""
    out: dict[str, float | int] = {}
    if not rows:
        return out
    out["finalLoss"] = rows[-1]["loss"]
    evaluated = [r for r in rows if "evalLoss" in r]
    if evaluated:
        best = min(evaluated, key=lambda r: r["evalLoss"])
        out |= {"bestEvalLoss": best["evalLoss"], "bestEvalStep": best["step"]}
    if tokens_per_epoch and "epoch" in rows[-1]:
        out["tokensSeen"] = round(tokens_per_epoch * rows[-1]["epoch"])
    return out


def write_history(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))


def write_tensorboard(rows: list[dict], artifact_dir: Path) -> bool:
    """TensorBoard event files of the history, under artifact_dir/tensorboard. Written from the
    history when the run publishes, not live through `report_to`: a live writer's events stay in a
    killed attempt's pod, and a resumed run would show only its last attempt; these match
    history.jsonl step for step.
    False when the `tensorboard` package (trainer extra) is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("no TensorBoard event files (%s); history.jsonl has the same values", exc)
        return False
    writer = SummaryWriter(log_dir=str(artifact_dir / TENSORBOARD_DIR))
    try:
        for row in rows:
            for name, tag in _TENSORBOARD_TAGS.items():
                if name in row:
                    writer.add_scalar(tag, row[name], row["step"])
    finally:
        writer.close()
    return True
