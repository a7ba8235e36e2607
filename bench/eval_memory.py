"""Evaluation memory against the plan (issue #25 item 2): the memory-lean profile (QLoRA on the
Qwen2.5-7B shape, resources.gpuMemoryGiB: 10) with long hold-out examples (2,048 tokens) and
exact match, each phase's measured peak (torch.cuda.max_memory_allocated) beside the planner's.

Phases, in the order a run has them: the hold-out loss before training, training, the hold-out
loss after it, generation (exact match). Then, for the record, the hold-out loss as the trainer
computed it before (full-vocabulary logits in fp32, 8 rows per forward) on the same weights, and
both losses, which must agree.

Usage (GPU): python bench/eval_memory.py --tokenizer DIR --out $OUT/eval-memory.json
Dry run (CPU): python bench/eval_memory.py --tokenizer DIR --model-dir SMOLLM2 --method lora --seq 128 ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from archs import ARCHS, build_model_dir  # noqa: E402
from trainer_bench import examples, loop_without_side_effects  # noqa: E402

from kubetune.api.finetunejob import FineTuneJobSpec  # noqa: E402
from kubetune_trainer import distributed  # noqa: E402
from kubetune_trainer.data import training_rows  # noqa: E402
from kubetune_trainer.evaluation import generation_metrics, holdout_loss  # noqa: E402
from kubetune_trainer.modeling import Placement, attach_lora, load_base, load_tokenizer  # noqa: E402
from kubetune_trainer.packing import RowCollator, example_rows  # noqa: E402
from kubetune_trainer.recipe import library_versions  # noqa: E402
from kubetune_trainer.training import build_trainer, plan_batches  # noqa: E402

GiB = 2**30


def holdout(n: int, seq: int, vocab: int, tokenizer, seed: int = 1):
    """n hold-out examples of seq tokens (the loss on all but the first), with a prompt (its first
    seq - 64 tokens, as text) and a reference for exact match."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    ids = [rng.integers(10, vocab - 10, size=seq).tolist() for _ in range(n)]
    prompts = [tokenizer.decode(i[:seq - 64]) for i in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "prompt_text": prompts,
                              "reference": [tokenizer.decode(i[seq - 64:]) for i in ids]})


@torch.no_grad()
def full_logits_loss(model, data, pad_id: int, batch_size: int = 8) -> float:
    """The hold-out loss as the trainer computed it before issue #25: the model's logits, upcast to
    fp32, then cross-entropy, 8 rows per forward."""
    collate, device = RowCollator(pad_id), next(model.parameters()).device
    total, count = 0.0, 0
    for part in data.select_columns(["input_ids", "labels"]).iter(batch_size):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(example_rows(part)).items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits.float()
        target = labels[:, 1:].reshape(-1)
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target,
                                                   ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / count


class Peaks:
    """torch.cuda.max_memory_allocated of each phase, in GiB, and its seconds."""

    def __init__(self):
        self.gib: dict[str, float | None] = {}
        self.seconds: dict[str, float] = {}

    def measure(self, name: str, work):
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = work()
        if on_gpu:
            torch.cuda.synchronize()
        self.seconds[name] = round(time.perf_counter() - t, 2)
        self.gib[name] = round(torch.cuda.max_memory_allocated() / GiB, 3) if on_gpu else None
        return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2.5-7b", choices=sorted(ARCHS))
    ap.add_argument("--model-dir", help="a model directory instead of the random-init --arch (CPU dry run)")
    ap.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    ap.add_argument("--gpu-memory-gib", type=float, default=10)
    ap.add_argument("--seq", type=int, default=2048, help="maxSeqLength, and every hold-out example's length")
    ap.add_argument("--holdout", type=int, default=32, help="hold-out examples")
    ap.add_argument("--samples", type=int, default=4, help="hold-out prompts generated for exact match")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    on_gpu = torch.cuda.is_available()
    path = Path(a.model_dir) if a.model_dir else Path(build_model_dir(a.arch))
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    tokenizer = load_tokenizer(Path(a.tokenizer))
    vocab = min(vocab, len(tokenizer))
    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "pvc://models/bench"}, "dataset": {"uri": "pvc://data/bench.jsonl"},
        "method": a.method,
        "training": {"maxSteps": a.steps, "maxSeqLength": a.seq, "packing": True},
        "evaluation": {"exactMatch": True, "maxSamples": a.samples, "maxNewTokens": a.new_tokens},
        "resources": {"gpus": 1 if on_gpu else 0, "gpuMemoryGiB": a.gpu_memory_gib if on_gpu else None},
        "output": {"uri": "pvc://runs/bench"}, "checkpointEverySteps": 1_000_000,
    })
    ranks = distributed.Ranks()
    rows = training_rows(examples(400, vocab), a.seq, packing=True)
    data = holdout(a.holdout, a.seq, vocab, tokenizer)
    plan = plan_batches(spec, path, on_gpu=on_gpu)
    peaks = Peaks()
    model = peaks.measure("load", lambda: attach_lora(load_base(
        path, spec, Placement.detect(), gradient_checkpointing=plan.gradient_checkpointing,
        checkpointed_layers=plan.checkpointed_layers), spec))
    trainer, _ = build_trainer(model, spec, rows, tokenizer=tokenizer, plan=plan, work_dir=Path("/tmp/eval-memory"),
                               callback_kwargs=loop_without_side_effects(ranks))
    pad, micro = tokenizer.pad_token_id, plan.micro_batch_size
    before = peaks.measure("holdout_before_training", lambda: holdout_loss(trainer.model, data, pad, micro, ranks))
    peaks.measure("training", trainer.train)
    after = peaks.measure("holdout_after_training", lambda: holdout_loss(trainer.model, data, pad, micro, ranks))
    generated = peaks.measure("generation", lambda: generation_metrics(
        trainer.model, tokenizer, data, max_samples=a.samples, max_new_tokens=a.new_tokens, batch_size=micro))
    old_loss = peaks.measure("holdout_full_logits_batch_8", lambda: full_logits_loss(trainer.model, data, pad))
    estimate = plan.estimate
    result = {
        "what": "issue #25 item 2: evaluation memory against the plan, memory-lean profile, long hold-out examples",
        "command": " ".join(sys.argv),
        "model": a.model_dir or f"{a.arch} (random init, bench/archs.py)", "method": a.method,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None, "versions": library_versions(
            ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "liger-kernel")),
        "plan": plan.summary(), "gpu_memory_gib": a.gpu_memory_gib if on_gpu else None,
        "micro_batch": micro, "gradient_checkpointing": plan.gradient_checkpointing,
        "holdout": {"examples": a.holdout, "tokens_each": a.seq, "generation_samples": a.samples,
                    "new_tokens": a.new_tokens},
        "planned_gib": {"training": estimate.training / GiB, "evaluation": estimate.evaluation / GiB,
                        "generation": estimate.generation / GiB, "total": estimate.total_gib} if estimate else None,
        "measured_peak_gib": peaks.gib, "seconds": peaks.seconds,
        "eval_loss": {"before_training": before["evalLoss"], "after_training": after["evalLoss"],
                      "after_training_full_logits_fp32": round(old_loss, 6), "tokens": after["evalTokens"]},
        "generation": generated,
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
