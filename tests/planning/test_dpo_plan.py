"""The planner counts DPO's memory: two sequences per pair and the reference forward."""

from __future__ import annotations

from kubetune.planning import plan_run
from tests.planning.test_plan import ATTN, BENCH_1_5B, QWEN_7B, spec


def test_a_dpo_pair_costs_more_than_two_sft_rows_would_in_activations():
    sft = plan_run(spec(training={"microBatchSize": 2, "gradientCheckpointing": "off"}), BENCH_1_5B, 140)
    dpo = plan_run(spec(objective={"type": "dpo"}, training={"microBatchSize": 1, "gradientCheckpointing": "off"}),
                   BENCH_1_5B, 140)
    # Same sequences (1 pair = 2 sequences), plus the reference forward's layer and logits.
    assert dpo.estimate.weights == sft.estimate.weights
    assert dpo.estimate.activations > sft.estimate.activations
    assert dpo.estimate.logits > sft.estimate.logits


def test_dpo_plans_fewer_pairs_per_micro_batch_and_keeps_the_batch():
    for lora in ({}, {"targetModules": ATTN}):
        sft = plan_run(spec(lora=lora), QWEN_7B, 24)
        dpo = plan_run(spec(lora=lora, objective={"type": "dpo"}), QWEN_7B, 24)
        assert dpo.effective_batch == sft.effective_batch == 16
        assert dpo.micro_batch_size < sft.micro_batch_size or (dpo.gradient_checkpointing
                                                               and not sft.gradient_checkpointing)
        assert dpo.estimate.total_gib <= 24 * 0.92


def test_dpo_checkpoints_every_layer_or_none():
    """TRL's DPO re-enables checkpointing on every layer around its reference forward."""
    for memory in (16, 24, 40, 80):
        plan = plan_run(spec(lora={"targetModules": ATTN}, objective={"type": "dpo"}), QWEN_7B, memory)
        assert plan.checkpointed_layers is None
    assert plan_run(spec(lora={"targetModules": ATTN}, objective={"type": "dpo"}), QWEN_7B, 24).gradient_checkpointing
