"""Throughput and peak memory of kubetune's DPO path (objective dpo) on one GPU.

QLoRA (NF4, double quantization), r=16 on q/k/v/o, a random-initialised Qwen2.5-1.5B-shaped model
(bench/archs.py: no hub), preference pairs of random text (prompt ~200 tokens, completions ~150,
long tails, 1,024 tokens at most per sequence). It drives the trainer's own DPO components
(kubetune_trainer.dpo: TRL's DPOTrainer with the reference as the base with the adapter disabled,
the planner's batch plan) and times optimizer steps after a warm-up.

Usage (GPU):  python bench/dpo_throughput.py --tokenizer DIR
Smoke (CPU):  python bench/dpo_throughput.py --tiny --tokenizer DIR   (a 2-layer model, LoRA, 2 steps)
Prints one JSON line: completion tokens/s (chosen + rejected, what DPO trains on), sequence tokens/s
(every token of both sequences through the policy), and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from archs import ARCHS, build_model_dir  # noqa: E402
from trainer_bench import loop_without_side_effects  # noqa: E402

from kubetune.api.finetunejob import FineTuneJobSpec  # noqa: E402
from kubetune_trainer import distributed  # noqa: E402
from kubetune_trainer.data import DataReport  # noqa: E402
from kubetune_trainer.dpo import build_dpo_trainer  # noqa: E402
from kubetune_trainer.modeling import Placement, load_base, load_tokenizer  # noqa: E402
from kubetune_trainer.preference import PreparedPreferences  # noqa: E402
from kubetune_trainer.recipe import library_versions  # noqa: E402
from kubetune_trainer.training import plan_batches  # noqa: E402

MAX_SEQ = 1024


class BatchTokens:
    """Wraps the trainer's preference collator and records each micro-batch's completion tokens
    (what DPO trains on) and sequence tokens (every token of both sequences through the policy).
    Counted per micro-batch because accelerate's dataloader collates one batch ahead: a count read
    at a step's end already holds part of the next step."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, rows):
        batch = self.inner(rows)
        self.batches.append((int(batch["completion_mask"].sum()), int(batch["attention_mask"].sum())))
        return batch


class StepTimer(TrainerCallback):
    """From the end of the last warm-up step to the end of training."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda, self.t0 = warmup, cuda, None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warmup and self.t0 is None:
            self._sync()
            self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self._sync()
        self.seconds = time.perf_counter() - self.t0
        self.steps = state.global_step - self.warmup


def random_pairs(tokenizer, n: int, vocab: int, seed: int = 0) -> "datasets.Dataset":  # noqa: F821
    """Preference pairs of random text with long-tailed lengths (TRL tokenizes them again)."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)

    def text(median: float, cap: int) -> str:
        k = int(np.clip(rng.lognormal(math.log(median), 0.6), 8, cap))
        return tokenizer.decode(rng.integers(10, vocab - 10, size=k).tolist())

    rows = [{"prompt": text(200, 512), "chosen": text(150, MAX_SEQ // 2), "rejected": text(150, MAX_SEQ // 2),
             "where": f"line {i + 1}", "row": i} for i in range(n)]
    return Dataset.from_list(rows)


def tiny_model_dir(root: str) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=49152,
                               max_position_embeddings=2048, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2.5-1.5b", choices=sorted(ARCHS))
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps, the warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a 2-layer model, LoRA, 2 steps")
    a = ap.parse_args()
    if a.tiny:
        a.steps, a.warmup, a.batch = 2, 1, 2

    started = time.perf_counter()
    tokenizer = load_tokenizer(Path(a.tokenizer))
    scratch = tempfile.mkdtemp(prefix="dpo-bench-")
    path = tiny_model_dir(scratch + "/model") if a.tiny else build_model_dir(a.arch)
    vocab = min(len(tokenizer), 49152 if a.tiny else ARCHS[a.arch][6])
    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "pvc://models/bench"}, "dataset": {"uri": "pvc://data/pairs.jsonl"},
        "method": "lora" if a.tiny else "qlora", "objective": {"type": "dpo", "dpo": {"beta": a.beta}},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"maxSteps": a.steps, "maxSeqLength": MAX_SEQ, "batchSize": a.batch, "warmupRatio": 0.0},
        "resources": {"gpus": 0 if a.tiny else 1},
        "output": {"uri": "pvc://runs/bench"}, "checkpointEverySteps": 1_000_000,
    })
    pairs = random_pairs(tokenizer, a.batch * a.steps, vocab)
    data = PreparedPreferences(pairs, pairs.select([]), DataReport("bench", "", "preference", len(pairs),
                                                                   len(pairs), 0, rows=len(pairs)), [])
    placement = Placement.detect()
    cuda = placement.device == "cuda"
    plan = plan_batches(spec, Path(path), on_gpu=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = load_base(Path(path), spec, placement, gradient_checkpointing=plan.gradient_checkpointing)
    trainer, loop = build_dpo_trainer(model, spec, data, tokenizer=tokenizer, plan=plan,
                                      work_dir=Path(scratch) / "work",
                                      callback_kwargs=loop_without_side_effects(distributed.Ranks()))
    counted = loop.counter.inner = BatchTokens(loop.counter.inner)
    timer = StepTimer(a.warmup, cuda)
    trainer.add_callback(timer)
    trainer.train()
    timed = counted.batches[a.warmup * plan.gradient_accumulation_steps:]
    completion_tokens, sequence_tokens = (sum(b[i] for b in timed) for i in (0, 1))
    print(json.dumps({
        "case": "kubetune-dpo", "arch": "tiny" if a.tiny else a.arch, "method": spec.method, "targets": "attn",
        "beta": a.beta, "pairs_per_step": a.batch, "micro_pairs": plan.micro_batch_size,
        "accum": plan.gradient_accumulation_steps, "checkpointing": plan.gradient_checkpointing,
        "attention": model.config._attn_implementation, "steps_timed": timer.steps,
        "seconds": round(timer.seconds, 2),
        "completion_tokens_per_s": round(completion_tokens / timer.seconds, 1),
        "sequence_tokens_per_s": round(sequence_tokens / timer.seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "planned_gib": round(plan.estimate.total_gib, 2) if plan.estimate else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": library_versions(("torch", "transformers", "peft", "trl", "datasets")),
    }), flush=True)


if __name__ == "__main__":
    main()
