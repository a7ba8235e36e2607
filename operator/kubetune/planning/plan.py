"""The batch plan: micro-batch, accumulation and activation checkpointing that fit the GPU and keep
the effective batch the spec asks for; with several GPUs, whether they must shard the base model
(FSDP) rather than each hold a copy (DDP). A run that cannot fit at all is refused with what to change."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.planning.memory import GiB, MemoryEstimate, ModelShape, estimate_memory

HEADROOM = 0.92  # of the GPU's memory: other processes, and the estimate's own error
MAX_TOKENS_PER_MICRO_BATCH = 32768  # beyond this a bigger micro-batch buys no throughput, only memory
# A micro-batch of this many tokens without checkpointing beats any checkpointed one (H100, 7B:
# 13.2k tokens/s at 4 x 2,048 without, 10.9k at 16 x 2,048 with; bench/results/).
EFFICIENT_TOKENS = 8192
CPU_MICRO_BATCH = 4
UNPLANNED_GPU_MICRO_BATCH = 8
MAX_SHARDING_GPUS = 64  # the largest group a refusal suggests


class DoesNotFit(ValueError):
    """The run needs more memory per GPU than it has, even at micro-batch 1 with checkpointing."""


@dataclass(frozen=True)
class RunPlan:
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate | None = None
    gpu_memory_gib: float | None = None
    # FSDP: each GPU holds 1/world_size of the base and of the LoRA state. Only where a copy per GPU
    # does not fit: sharding gathers every layer's weights twice a step, which DDP never does.
    sharded: bool = False

    @property
    def effective_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.gradient_accumulation_steps

    def summary(self) -> str:
        text = (f"micro-batch {self.micro_batch_size} x accumulation {self.gradient_accumulation_steps} "
                f"x {self.world_size} process(es) = {self.effective_batch} rows per step, "
                f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}")
        if self.sharded:
            text += f", base model sharded over {self.world_size} GPUs (FSDP)"
        if self.estimate is not None and self.gpu_memory_gib:
            text += (f", about {self.estimate.total_gib:.1f} of {self.gpu_memory_gib:g} GiB per GPU "
                     f"(peaks in GiB: {self.estimate.phases()})")
        return text


def _divisors_desc(n: int) -> list[int]:
    return sorted({d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k)}, reverse=True)


def _estimate(spec: FineTuneJobSpec, shape: ModelShape, micro: int, checkpointing: bool, fused: bool, *,
              seq_len: int | None = None, quantized: bool | None = None, shards: int = 1) -> MemoryEstimate:
    return estimate_memory(shape, quantized=spec.method == "qlora" if quantized is None else quantized,
                           lora_r=spec.lora.r, lora_targets=list(spec.lora.target_modules), micro_batch=micro,
                           seq_len=seq_len or spec.training.max_seq_length, checkpointing=checkpointing,
                           fused_kernels=fused, shards=shards, preference=spec.objective.type == "dpo",
                           generation_tokens=spec.evaluation.max_new_tokens if spec.evaluation.exact_match else 0)


def plan_run(spec: FineTuneJobSpec, shape: ModelShape | None, gpu_memory_gib: float | None, *,
             fused_kernels: bool = True, world_size: int | None = None) -> RunPlan:
    """fused_kernels: whether the trainer fuses the LM head with the loss; the trainer image does
    (the operator plans for it), a trainer without liger-kernel says so itself.
    world_size: the processes that share the batch; the spec's GPUs x nodes unless the trainer
    knows better (its torchrun group)."""
    t, r = spec.training, spec.resources
    world = world_size or max(1, r.gpus) * r.nodes
    per_process = math.ceil(t.batch_size / world)
    fixed_checkpointing = {"on": True, "off": False}.get(t.gradient_checkpointing)

    def plan(micro: int, checkpointing: bool, estimate: MemoryEstimate | None = None,
             sharded: bool = False) -> RunPlan:
        return RunPlan(world, micro, math.ceil(per_process / micro), checkpointing, estimate, gpu_memory_gib, sharded)

    if r.gpus == 0 or shape is None or not gpu_memory_gib:
        # No memory to plan against (CPU runs; or the model's shape is unknown until the trainer loads it).
        default = CPU_MICRO_BATCH if r.gpus == 0 else UNPLANNED_GPU_MICRO_BATCH
        checkpointing = fixed_checkpointing if fixed_checkpointing is not None else (
            r.gpus > 0 and spec.method == "qlora")
        return plan(t.micro_batch_size or min(per_process, default), checkpointing)

    budget = gpu_memory_gib * GiB * HEADROOM
    sequences = 2 if spec.objective.type == "dpo" else 1  # a DPO row is a pair: prompt + chosen, prompt + rejected
    cap = max(1, MAX_TOKENS_PER_MICRO_BATCH // (t.max_seq_length * sequences))
    micros = [t.micro_batch_size] if t.micro_batch_size else [d for d in _divisors_desc(per_process) if d <= cap] or [1]
    options = [fixed_checkpointing] if fixed_checkpointing is not None else [False, True]

    def fitting(shards: int) -> RunPlan | None:
        best: dict[bool, RunPlan] = {}
        for checkpointing in options:
            for micro in micros:
                estimate = _estimate(spec, shape, micro, checkpointing, fused_kernels, shards=shards)
                if estimate.total <= budget:
                    best[checkpointing] = plan(micro, checkpointing, estimate, sharded=shards > 1)
                    break
        if False in best and (True not in best or 2 * best[False].micro_batch_size >= best[True].micro_batch_size
                              or best[False].micro_batch_size * t.max_seq_length >= EFFICIENT_TOKENS):
            return best[False]  # recomputing activations costs half again the compute of a LoRA step
        return best.get(True)

    chosen = fitting(1) or (fitting(world) if world > 1 else None)
    if chosen is None:
        raise DoesNotFit(_refusal(spec, shape, gpu_memory_gib, min(micros), options[-1], fused_kernels, world))
    return chosen


def _refusal(spec: FineTuneJobSpec, shape: ModelShape, gpu_memory_gib: float, micro: int, checkpointing: bool,
             fused: bool, world: int) -> str:
    budget = gpu_memory_gib * GiB * HEADROOM
    need = _estimate(spec, shape, micro, checkpointing, fused, shards=world).total_gib
    setting = (f"micro-batch {micro}, gradient checkpointing {'on' if checkpointing else 'off'}"
               + (f", sharded over {world} GPUs" if world > 1 else ""))
    advice = []
    fits = [s for s in (2**k for k in range(8, 18)) if s < spec.training.max_seq_length
            and _estimate(spec, shape, micro, checkpointing, fused, seq_len=s, shards=world).total <= budget]
    if fits:
        advice.append(f"lower training.maxSeqLength to {max(fits)}")
    if spec.training.micro_batch_size and spec.training.micro_batch_size > 1:
        advice.append("leave training.microBatchSize unset so the planner can choose")
    if spec.training.gradient_checkpointing == "off":
        advice.append("set training.gradientCheckpointing to auto")
    if spec.method == "lora":
        qlora = _estimate(spec, shape, micro, checkpointing, fused, quantized=True, shards=world).total_gib
        advice.append(f"use method qlora (about {qlora:.1f} GiB)")
    gpus = next((n for n in range(world + 1, MAX_SHARDING_GPUS + 1)
                 if _estimate(spec, shape, micro, checkpointing, fused, shards=n).total <= budget), None)
    if gpus is not None:
        advice.append(f"use {gpus} GPUs (resources.gpus x resources.nodes), which share the base model (FSDP)")
    advice.append(f"use GPUs with at least {math.ceil(need / HEADROOM)} GiB (resources.gpuMemoryGiB)")
    return (f"needs about {need:.1f} GiB per GPU ({setting}, {shape.parameters / 1e9:.2f}B parameters) but a GPU "
            f"has {gpu_memory_gib:g} GiB, of which {HEADROOM:.0%} is planned: short by "
            f"{need - gpu_memory_gib * HEADROOM:.1f} GiB. To fit: " + "; or ".join(advice))
