"""The training loop: TRL's SFTTrainer over kubetune's prepared rows, with our checkpoint store,
progress reporting and preemption handling plugged in as callbacks.

What TRL does, it does here: the trainer loop, the chunked LM head that never builds the full
logits (and its per-token loss), DDP and FSDP through transformers. What stays ours: the rows
(prepared, packed and cached by kubetune_trainer.data, so TRL's own preparation is skipped), the
collator that hands the varlen attention its example boundaries, the batch plan, checkpoints in
object storage, progress and SIGTERM.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerState
from trl import SFTConfig, SFTTrainer

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.planning import DoesNotFit, ModelShape, RunPlan, plan_run
from kubetune.planning.memory import GiB
from kubetune_trainer import distributed
from kubetune_trainer.checkpoints import CheckpointStore
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.kernels import fused_kernels_available
from kubetune_trainer.packing import RowCollator
from kubetune_trainer.progress import ProgressReport, ProgressReporter
from kubetune_trainer.sharding import FSDP_CONFIG, FSDP_MODEL_STATE, ShardedLoraTrainer

log = logging.getLogger(__name__)


class CountingCollator:
    """Counts the loss-bearing tokens handed to the model (for tokens/s) and the rows, by their
    index, that this process trained on (for the epoch's coverage)."""

    def __init__(self, inner: Callable[[list], dict]):
        self.inner, self.loss_tokens, self.rows_seen = inner, 0, 0
        self.distinct_rows: set[int] = set()

    def __call__(self, rows):
        batch = self.inner(rows)
        self.loss_tokens += self.count_loss_tokens(batch)
        self.rows_seen += len(rows)
        self.distinct_rows.update(int(r["row"]) for r in rows if "row" in r)
        return batch

    @staticmethod
    def count_loss_tokens(batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())


class PreemptionFlag:
    """Set by SIGTERM (the kubelet's eviction or a suspension); the loop checkpoints and stops."""

    def __init__(self):
        self.raised = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # signal handler's signature
        log.warning("SIGTERM: checkpointing at the end of this step, then exiting")
        self.raised = True


def plan_batches(spec: FineTuneJobSpec, model_dir: Path, on_gpu: bool, world_size: int = 1) -> RunPlan:
    """The operator's planner, now with the real GPU's memory (or less, where resources.gpuMemoryGiB
    caps what this job may use), the model's real shape and the kernels this process has."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        shape = ModelShape.from_config(config)
    except (OSError, ValueError) as exc:
        log.warning("no memory plan (%s): default micro-batch", exc)
        config, shape = {}, None
    memory = None
    if on_gpu:
        memory = torch.cuda.get_device_properties(0).total_memory / GiB
        memory = min(memory, spec.resources.gpu_memory_gib or memory)
    try:
        plan = plan_run(spec, shape, memory, fused_kernels=fused_kernels_available(config.get("model_type")),
                        world_size=world_size)
    except DoesNotFit as exc:
        raise ConfigError(str(exc)) from exc
    log.info("plan: %s", plan.summary())
    return plan


class AlreadyTrained(Exception):
    """A resumed checkpoint is the run's last step: an earlier attempt trained it all and failed
    after (its publication, say), so this one only evaluates and publishes."""


class LoopCallback(TrainerCallback):
    def __init__(self, *, reporter: ProgressReporter, store: CheckpointStore, counter: CountingCollator,
                 preemption: PreemptionFlag, evaluate, ranks: distributed.Ranks | None = None,
                 sharded: bool = False):
        self.reporter, self.store, self.counter, self.preemption = reporter, store, counter, preemption
        self.evaluate, self.ranks, self.sharded = evaluate, ranks or distributed.Ranks(), sharded
        self.stopped_for_preemption = False
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.last_checkpoint: str | None = None
        self._t0: float | None = None
        self._tokens0 = 0
        self._step0 = 0
        self.tokens_per_second: float | None = None

    def on_train_begin(self, args, state, control, **kw):
        # The Trainer has restored the checkpoint's weights and state by now. Its loop checks for the
        # end only after a step, so resumed at the last step it would train one more.
        if 0 < state.max_steps <= state.global_step:
            raise AlreadyTrained(f"resumed at step {state.global_step} of {state.max_steps}")
        self._t0, self._tokens0, self._step0 = time.monotonic(), self.counter.loss_tokens, state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.last_loss = float(logs["loss"])

    def _report(self, state, force: bool = False) -> None:
        if not self.ranks.is_main:
            return
        elapsed = time.monotonic() - (self._t0 or time.monotonic())
        done = state.global_step - self._step0
        eta = None
        if done and elapsed > 0:
            self.tokens_per_second = round((self.counter.loss_tokens - self._tokens0) / elapsed, 1)
            eta = int(elapsed / done * max(0, state.max_steps - state.global_step))
        self.reporter.report(ProgressReport(
            "training", state.global_step, state.max_steps, round(state.epoch or 0, 4), self.last_loss,
            self.eval_loss, self.tokens_per_second, eta, self.last_checkpoint), force=force)

    def on_step_end(self, args, state, control, **kw):
        # Every rank stops at the same step, or the others would wait in the next all-reduce forever.
        if distributed.any_rank(self.ranks, self.preemption.raised):
            self.stopped_for_preemption = True
            control.should_save = True
            control.should_training_stop = True
        self._report(state)

    def on_save(self, args, state, control, **kw):
        # After SIGTERM the grace period is for the upload. Every rank takes its share of the
        # hold-out (and sharded, every rank holds part of each layer).
        if not self.stopped_for_preemption:
            self.eval_loss = self.evaluate().get("evalLoss")
        if not self.ranks.is_main:
            return  # rank 0's checkpoint holds the adapter, optimizer and schedule of the whole group
        local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.sharded:
            (local / FSDP_MODEL_STATE).unlink()  # the adapter file holds the trained weights
        self.last_checkpoint = self.store.push(local, state.global_step)
        log.info("checkpoint %s (step %d, eval loss %s)", self.last_checkpoint, state.global_step, self.eval_loss)
        self._report(state, force=True)


def build_trainer(model, spec: FineTuneJobSpec, rows, *, tokenizer, plan: RunPlan, work_dir: Path,
                  callback_kwargs: dict) -> tuple[SFTTrainer, LoopCallback]:
    """rows: the prepared training rows (a `datasets.Dataset` of input_ids, labels, seq_lengths, row)."""
    args = SFTConfig(
        **trainer_arguments(spec, plan, work_dir, on_gpu=next(model.parameters()).is_cuda),
        # The rows are kubetune's: read and checked with errors naming file and line, tokenized,
        # truncated and packed once per node, and cached (kubetune_trainer.data).
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    counter = CountingCollator(RowCollator(tokenizer.pad_token_id))
    callback = LoopCallback(counter=counter, sharded=plan.sharded, **callback_kwargs)
    trainer_class = ShardedLoraTrainer if plan.sharded else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=rows, data_collator=counter,
                            processing_class=tokenizer, callbacks=[callback])
    return trainer, callback


def trainer_arguments(spec: FineTuneJobSpec, plan: RunPlan, work_dir: Path, *, on_gpu: bool) -> dict:
    """The Trainer arguments every objective shares: the batch plan, the schedule, checkpoints
    (the store keeps them remotely), and what makes a step's log readable by our callbacks."""
    t = spec.training
    return dict(
        output_dir=str(work_dir / "checkpoints"),
        per_device_train_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        # Without maxSteps the Trainer counts an epoch's steps from its sharded dataloader, which
        # knows each optimizer step takes a batch from every process.
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # below 1: a fraction of the run's steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        bf16=on_gpu,
        # The Trainer's switch enables every layer's checkpointing at train(): a plan that checkpoints
        # some of them has them set at load (modeling.load_base) and leaves it off.
        gradient_checkpointing=plan.gradient_checkpointing and plan.checkpointed_layers is None,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=t.max_seq_length,
        logging_steps=1,
        # The NaN/inf filter reads every micro-batch's loss on the CPU (a GPU sync each time); a
        # diverging run should show its NaN in the logged loss anyway, not be averaged around it.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=spec.checkpoint_every_steps,
        save_total_limit=1,  # local copies only; the store keeps spec.output.keepCheckpoints remotely
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not on_gpu,
        **({"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)} if plan.sharded else {}),
    )


def coverage(ranks: distributed.Ranks, counter: CountingCollator) -> dict[str, int]:
    """Rows handed to the model by all processes in this attempt, and how many distinct ones."""
    return {"rowsSeen": distributed.total(ranks, counter.rows_seen),
            "distinctRowsSeen": distributed.union_size(ranks, counter.distinct_rows)}


def mean_train_loss(state: TrainerState) -> float:
    """The training loss over every step of the run. The Trainer's own figure after a resume sums
    only this attempt's steps yet divides by all of them; the step log, restored from the
    checkpoint, covers each step once (logging_steps=1)."""
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return sum(losses) / len(losses)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
