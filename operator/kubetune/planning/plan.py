"""The batch plan: micro-batch, accumulation and activation checkpointing (how many decoder layers)
that fit the GPU and keep the effective batch the spec asks for; with several GPUs, whether they
must shard the base model (FSDP) rather than each hold a copy (DDP). A run that cannot fit at all is
refused with what to change."""

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
# Below that, the plan with the least modelled time per token wins: checkpointing every layer adds
# RECOMPUTE_COST of a step (the recomputed forward; LoRA's backward computes input gradients only,
# so the forward is about a third of the step), and each micro-batch costs about
# MICRO_BATCH_OVERHEAD_TOKENS tokens' worth of fixed work. Fitted to the 7B's figures above and on an
# H200 (17.1k tokens/s at 8 x 2,048 without, 10.1k at 2 x 2,048 with checkpointing). Checked there
# at 40 GiB: 4 x 2,048 with 7 of 28 layers checkpointed ran 15.1k, 16 x 2,048 with all of them 13.0k
# (bench/results/h200-2026-12-02-selective-checkpointing.json).
RECOMPUTE_COST = 0.4
MICRO_BATCH_OVERHEAD_TOKENS = 1536
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
    # With gradient_checkpointing: the first N decoder layers recompute their activations and the
    # rest keep them, where memory allows some but not all to keep them; None: every layer.
    checkpointed_layers: int | None = None

    @property
    def effective_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.gradient_accumulation_steps

    def _checkpointing(self) -> str:
        if not self.gradient_checkpointing:
            return "off"
        return "on" if self.checkpointed_layers is None else f"on for the first {self.checkpointed_layers} layers"

    def summary(self) -> str:
        text = (f"micro-batch {self.micro_batch_size} x accumulation {self.gradient_accumulation_steps} "
                f"x {self.world_size} process(es) = {self.effective_batch} rows per step, "
                f"gradient checkpointing {self._checkpointing()}")
        if self.sharded:
            text += f", base model sharded over {self.world_size} GPUs (FSDP)"
        if self.estimate is not None and self.gpu_memory_gib:
            text += (f", about {self.estimate.total_gib:.1f} of {self.gpu_memory_gib:g} GiB per GPU "
                     f"(peaks in GiB: {self.estimate.phases()})")
        return text


def _divisors_desc(n: int) -> list[int]:
    return sorted({d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k)}, reverse=True)


def _estimate(spec: FineTuneJobSpec, shape: ModelShape, micro: int, checkpointing: bool, fused: bool, *,
              seq_len: int | None = None, quantized: bool | None = None, shards: int = 1,
              checkpointed_layers: int | None = None) -> MemoryEstimate:
    return estimate_memory(shape, quantized=spec.method == "qlora" if quantized is None else quantized,
                           lora_r=spec.lora.r, lora_targets=list(spec.lora.target_modules), micro_batch=micro,
                           seq_len=seq_len or spec.training.max_seq_length, checkpointing=checkpointing,
                           checkpointed_layers=checkpointed_layers, fused_kernels=fused, shards=shards,
                           preference=spec.objective.type == "dpo",
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

    def plan(micro: int, checkpointing: bool, estimate: MemoryEstimate | None = None, sharded: bool = False,
             checkpointed_layers: int | None = None) -> RunPlan:
        return RunPlan(world, micro, math.ceil(per_process / micro), checkpointing, estimate, gpu_memory_gib, sharded,
                       checkpointed_layers)

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
    # How many layers may be checkpointed: "on" all, "off" none, auto the fewest that fit. TRL's DPO
    # turns checkpointing off and on again around its reference forward, which enables it on every
    # layer: DPO plans all or none.
    counts = {"on": [shape.layers], "off": [0]}.get(
        t.gradient_checkpointing, [0, shape.layers] if spec.objective.type == "dpo" else list(range(shape.layers + 1)))

    def fitting(shards: int) -> RunPlan | None:
        candidates = []
        for micro in micros:
            for count in counts:  # the estimate grows as fewer layers are checkpointed: the first fit is the fewest
                estimate = _estimate(spec, shape, micro, count > 0, fused_kernels, shards=shards,
                                     checkpointed_layers=count)
                if estimate.total <= budget:
                    candidates.append(plan(micro, count > 0, estimate, shards > 1,
                                           None if count in (0, shape.layers) else count))
                    break
        whole = [c for c in candidates if not c.gradient_checkpointing
                 and c.micro_batch_size * t.max_seq_length >= EFFICIENT_TOKENS]
        if whole:
            return whole[0]
        return min(candidates, key=lambda c: _time_per_token(c, shape, t.max_seq_length * sequences), default=None)

    chosen = fitting(1) or (fitting(world) if world > 1 else None)
    if chosen is None:
        raise DoesNotFit(_refusal(spec, shape, gpu_memory_gib, min(micros), counts[-1] > 0, fused_kernels, world))
    return chosen


def _time_per_token(plan: RunPlan, shape: ModelShape, tokens_per_row: int) -> float:
    """Relative: the recomputation and the micro-batch's fixed work (see RECOMPUTE_COST)."""
    checkpointed = 0 if not plan.gradient_checkpointing else plan.checkpointed_layers or shape.layers
    return ((1 + RECOMPUTE_COST * checkpointed / shape.layers)
            * (1 + MICRO_BATCH_OVERHEAD_TOKENS / (plan.micro_batch_size * tokens_per_row)))


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
