"""Throughput of the kubetune trainer's training path (QLoRA) on one GPU.

Same data shape as the baseline (bench/baseline/qlora_anchor.py): Alpaca-like lengths (median
~250 tokens, long tail to 2,048), seq 2,048, r=16. It drives the trainer's own components
(data preparation, packing, model loading, Trainer set-up) and times steps after a warm-up.

Usage: python bench/trainer_bench.py --arch qwen2.5-1.5b --targets attn --steps 24 --tokenizer DIR
Under torchrun (--nproc-per-node N) each GPU takes --batch rows per step (DDP, as the trainer
runs for resources.gpus: N) and tokens/s counts all of them. Prints one JSON line (rank 0).
"""

from __future__ import annotations

import time

# Before the heavy imports: the start-to-first-step time counts them, as a pod's start does.
STARTED = time.time()

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from archs import ARCHS, build_model_dir, flops_per_token  # noqa: E402

from kubetune.api.finetunejob import FineTuneJobSpec  # noqa: E402
from kubetune.planning import ModelShape, estimate_memory  # noqa: E402
from kubetune_trainer import distributed, fused_lora  # noqa: E402
from kubetune_trainer.data import training_rows  # noqa: E402
from kubetune_trainer.kernels import fused_kernels_available  # noqa: E402
from kubetune_trainer.modeling import Placement, attach_lora, load_base, load_tokenizer  # noqa: E402
from kubetune_trainer.training import PreemptionFlag, build_trainer, plan_batches  # noqa: E402

TARGETS = {"attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": ["all-linear"]}


class _Quiet:
    """Neither reports progress nor uploads checkpoints: a benchmark measures the training loop."""

    def report(self, report, force=False):
        pass

    def push(self, local_dir, step):
        return None


def loop_without_side_effects(ranks: distributed.Ranks) -> dict:
    """build_trainer's callback_kwargs for a run that only trains."""
    return {"reporter": _Quiet(), "store": _Quiet(), "preemption": PreemptionFlag(), "evaluate": dict, "ranks": ranks}


def shared_model_dir(arch: str, ranks: distributed.Ranks) -> str:
    """The random-init model directory, built by rank 0 while the others wait."""
    if ranks.is_main:
        build_model_dir(arch)
    distributed.barrier(ranks)
    return build_model_dir(arch)


class StepProfiler(TrainerCallback):
    """torch.profiler over two optimizer steps after the warm-up: where the GPU's time goes."""

    def __init__(self, warmup: int, path: str):
        self.warmup, self.path, self.prof = warmup, path, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup and self.prof is None:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        if self.prof is not None and state.global_step == self.warmup + 2:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
            Path(self.path).write_text(table)
            self.prof = None


class StepTimer(TrainerCallback):
    def __init__(self, counter, warmup: int):
        self.counter, self.warmup, self.t0 = counter, warmup, None

    # From the end of the last warm-up step: the Trainer collates a whole step's micro-batches
    # before on_step_begin, so a count taken there would already hold the first timed step's tokens.
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            torch.cuda.synchronize()
            self.first_step_s = time.time() - STARTED
        if state.global_step == self.warmup and self.t0 is None:
            torch.cuda.synchronize()
            self.t0, self.tok0 = time.perf_counter(), self.counter.loss_tokens

    def on_train_end(self, args, state, control, **kw):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.tokens = self.counter.loss_tokens - self.tok0
        self.steps = state.global_step - self.warmup


def examples(n: int, vocab: int, seed: int = 0):
    """Tokenized examples as the trainer's data preparation leaves them (a datasets.Dataset)."""
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(250), 0.8, n), 32, 2048).astype(int)
    ids = [rng.integers(10, vocab - 10, size=k).tolist() for k in lengths]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2.5-1.5b", choices=sorted(ARCHS))
    ap.add_argument("--targets", default="attn", choices=sorted(TARGETS))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="rows of 2,048 tokens per optimizer step and GPU")
    ap.add_argument("--micro", type=int, default=0, help="rows per forward pass (0: the trainer's plan)")
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--checkpointed-layers", type=int, default=None,
                    help="checkpoint the first N decoder layers, whatever the plan says (at its micro-batch)")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="memory the planner may use (lean profile)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--fused-lora", default="on", choices=["on", "off"],
                    help="the fused LoRA path (kubetune_trainer.fused_lora), or peft's own forward")
    ap.add_argument("--profile", help="write a torch.profiler table of two steps after the warm-up here")
    a = ap.parse_args()

    os.environ[fused_lora.ENV_SWITCH] = "1" if a.fused_lora == "on" else "0"
    ranks = distributed.init_from_env()
    path = shared_model_dir(a.arch, ranks)
    tokenizer = load_tokenizer(Path(a.tokenizer))
    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "pvc://models/bench"}, "dataset": {"uri": "pvc://data/bench.jsonl"},
        "method": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": TARGETS[a.targets]},
        "training": {"maxSteps": a.steps, "maxSeqLength": 2048, "packing": True,
                     "batchSize": a.batch * ranks.world_size,
                     "microBatchSize": a.micro or None, "gradientCheckpointing": a.checkpointing},
        "resources": {"gpus": ranks.world_size, "gpuMemoryGiB": a.gpu_memory_gib},
        "output": {"uri": "pvc://runs/bench"}, "checkpointEverySteps": 1_000_000,
    })
    rows = training_rows(examples(4000, min(len(tokenizer), ARCHS[a.arch][6])), 2048, packing=True)
    placement = Placement.detect()
    plan = plan_batches(spec, Path(path), on_gpu=True, world_size=ranks.world_size)
    if a.checkpointed_layers is not None:
        config = json.loads((Path(path) / "config.json").read_text())
        estimate = estimate_memory(ModelShape.from_config(config), quantized=True, lora_r=spec.lora.r,
                                   lora_targets=spec.lora.target_modules, micro_batch=plan.micro_batch_size,
                                   seq_len=spec.training.max_seq_length, checkpointing=True,
                                   checkpointed_layers=a.checkpointed_layers,
                                   fused_kernels=fused_kernels_available(config["model_type"]))
        plan = replace(plan, gradient_checkpointing=True, checkpointed_layers=a.checkpointed_layers, estimate=estimate)
    torch.cuda.reset_peak_memory_stats()
    model = attach_lora(load_base(Path(path), spec, placement, gradient_checkpointing=plan.gradient_checkpointing,
                                  checkpointed_layers=plan.checkpointed_layers, sharded=plan.sharded),
                        spec, sharded=plan.sharded)
    # Every process loads the whole 4-bit model before FSDP shards it: the load has its own peak.
    load_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    trainer, loop = build_trainer(model, spec, rows, tokenizer=tokenizer, plan=plan, work_dir=Path("/tmp/bench-work"),
                                  callback_kwargs=loop_without_side_effects(ranks))
    timer = StepTimer(loop.counter, a.warmup)
    trainer.add_callback(timer)
    if a.profile:
        trainer.add_callback(StepProfiler(a.warmup, a.profile))
    t = time.perf_counter()
    trainer.train()
    tokens = timer.tokens
    if ranks.distributed:
        total = torch.tensor([tokens], device="cuda")
        torch.distributed.all_reduce(total)
        tokens = int(total.item())
    tps = tokens / timer.seconds
    if not ranks.is_main:
        return
    print(json.dumps({
        "case": "kubetune", "arch": a.arch, "targets": a.targets, "gpus": ranks.world_size,
        "micro": plan.micro_batch_size, "sharded": plan.sharded,
        "accum": plan.gradient_accumulation_steps, "checkpointing": plan.gradient_checkpointing,
        "checkpointed_layers": plan.checkpointed_layers, "plan": plan.summary(),
        "gpu_memory_gib": a.gpu_memory_gib, "attention": model.config._attn_implementation,
        "fused_kernels": fused_kernels_available(model.config.model_type),
        "fused_lora_layers": fused_lora.fused_layer_count(model),
        "steps_timed": timer.steps, "tokens": tokens, "seconds": round(timer.seconds, 2),
        "tokens_per_s": round(tps, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "load_peak_gib": round(load_peak, 2),
        # What the GPU holds for this process (CUDA context and the allocator's cache included), against
        # the memory-lean profile's gpuMemoryGiB: the one process on the GPU, the cache never emptied.
        "reserved_peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "device_used_gib": round((lambda free, total: (total - free) / 2**30)(*torch.cuda.mem_get_info()), 2),
        # Process start to the end of the first optimizer step: imports, the tokenizer, the rows (made
        # here, not read), the plan, the 4-bit load from the local model directory, the Trainer.
        "start_to_first_step_s": round(timer.first_step_s, 1),
        "planned_gib": round(plan.estimate.total_gib, 2) if plan.estimate else None,
        "mfu_vs_989": round(tps * flops_per_token(a.arch) / 989e12 / ranks.world_size, 4),
        "wall_s": round(time.perf_counter() - t, 1),
        "gpu": torch.cuda.get_device_name(0),
        "versions": {n: importlib.metadata.version(n) for n in ("torch", "transformers", "accelerate", "peft", "trl",
                                                                "datasets", "bitsandbytes", "liger-kernel")},
    }), flush=True)


if __name__ == "__main__":
    main()
