"""The planner counts the hold-out loss and generation, not training alone: the per-GPU peak is the
largest of the three phases, and the plan's explanation names each."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.planning import ModelShape, estimate_memory, plan_run
from tests.planning.test_plan import QWEN_7B, spec

RESULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "h200-2026-12-01-eval-memory.json"
# Full attention heads (no grouped KV): the KV cache is as wide as the hidden state.
MHA_7B = ModelShape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32)


def _estimate(shape, **kw):
    args = dict(quantized=True, lora_r=16, lora_targets=["all-linear"], micro_batch=1, seq_len=2048,
                checkpointing=True, fused_kernels=True)
    return estimate_memory(shape, **{**args, **kw})


def test_the_peak_is_the_largest_phase_and_the_plan_names_each():
    estimate = _estimate(QWEN_7B, generation_tokens=128)
    assert estimate.total == max(estimate.training, estimate.evaluation, estimate.generation)
    assert estimate.evaluation > estimate.weights + estimate.trainable  # the hold-out forward is counted
    assert _estimate(QWEN_7B).generation == 0  # no exact match, no generation
    assert _estimate(QWEN_7B, preference=True).evaluation == 0  # DPO's hold-out is its own (preference_metrics)
    plan = plan_run(spec(evaluation={"exactMatch": True}), QWEN_7B, 10)
    gib = {name: value / 2**30 for name, value in (("training", plan.estimate.training),
                                                   ("hold-out evaluation", plan.estimate.evaluation),
                                                   ("generation", plan.estimate.generation))}
    assert all(f"{name} {value:.1f}" in plan.summary() for name, value in gib.items())
    assert "generation" not in plan_run(spec(), QWEN_7B, 10).summary()


def test_the_holdout_loss_grows_with_the_micro_batch_but_never_holds_the_logits():
    one, eight = _estimate(QWEN_7B).evaluation, _estimate(QWEN_7B, micro_batch=8).evaluation
    assert eight > one
    full_logits = 8 * 2048 * QWEN_7B.vocab * (2 + 4)  # bf16 logits and their fp32 copy: what it used to hold
    assert eight - one < full_logits / 2


def test_long_generation_can_decide_the_micro_batch():
    """Generating 8,192 tokens after each prompt of a model without grouped KV: at the micro-batch
    training alone would take, its cache does not fit, and the plan takes a smaller one."""
    short = spec(training={"maxSeqLength": 1024})
    long = spec(training={"maxSeqLength": 1024}, evaluation={"exactMatch": True, "maxNewTokens": 8192})
    without = plan_run(short, MHA_7B, 24)
    generation = _estimate(MHA_7B, micro_batch=without.micro_batch_size, seq_len=1024,
                           checkpointing=without.gradient_checkpointing, generation_tokens=8192).generation
    assert generation > 24 * 0.92 * 2**30 >= without.estimate.training
    with_generation = plan_run(long, MHA_7B, 24)
    assert with_generation.micro_batch_size < without.micro_batch_size
    assert with_generation.estimate.total_gib <= 24 * 0.92
    assert with_generation.effective_batch == without.effective_batch == 16


def test_measured_phases_stay_under_the_plan():
    """bench/eval_memory.py on an H200: the memory-lean profile (7B QLoRA, gpuMemoryGiB 10) with
    32 hold-out examples of 2,048 tokens and exact match. Every phase peaked under its plan; the
    hold-out loss as computed before (full fp32 logits, 8 rows) peaked far over the whole GPU."""
    result = json.loads(RESULT.read_text())
    measured, planned = result["measured_peak_gib"], result["planned_gib"]
    assert measured["training"] <= planned["training"]
    assert max(measured["holdout_before_training"], measured["holdout_after_training"]) <= planned["evaluation"]
    assert measured["generation"] <= planned["generation"]
    assert planned["total"] <= result["gpu_memory_gib"] * 0.92 < measured["holdout_full_logits_batch_8"]
    # It was measured with every layer checkpointed, before the planner could leave some whole.
    plan = plan_run(spec(evaluation={"exactMatch": True, "maxNewTokens": result["holdout"]["new_tokens"],
                                     "maxSamples": result["holdout"]["generation_samples"]},
                         training={"gradientCheckpointing": "on"}), QWEN_7B, 10)
    assert plan.estimate.total_gib == planned["total"]  # the plan this file was measured against is today's
    eval_loss = result["eval_loss"]
    assert abs(eval_loss["after_training"] - eval_loss["after_training_full_logits_fp32"]) < 1e-3
