"""The planner: estimates that err high of measured peaks, plans that keep the effective batch, and
refusals that say by how much and what to change."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.planning import DoesNotFit, ModelShape, estimate_memory, plan_run

QWEN_7B = ModelShape(layers=28, hidden=3584, intermediate=18944, vocab=152064, heads=28, kv_heads=4)
# As bench/archs.py builds them (untied embeddings), for the peaks measured there.
BENCH_1_5B = ModelShape(layers=28, hidden=1536, intermediate=8960, vocab=151936, heads=12, kv_heads=2)
BENCH_0_5B = ModelShape(layers=24, hidden=896, intermediate=4864, vocab=151936, heads=14, kv_heads=2)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def spec(**overrides) -> FineTuneJobSpec:
    base = {"baseModel": {"uri": "s3://models/qwen"}, "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://runs/out"}, "storage": {"secretRef": {"name": "s3"}}}
    return FineTuneJobSpec.model_validate({**base, **overrides})


def test_shape_from_a_transformers_config():
    config = {"num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944, "vocab_size": 152064,
              "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
    shape = ModelShape.from_config(config)
    assert shape == QWEN_7B
    assert 7.5e9 < shape.parameters < 7.7e9  # Qwen2.5-7B has 7.61B parameters
    with pytest.raises(ValueError, match="decoder-only"):
        ModelShape.from_config({"model_type": "bert"})


# Peaks measured on an H100 by bench/ (bench/results/h100-2026-11-2*.json): the estimate must
# not be below them (a plan that fits must not OOM) and not far above (or it refuses jobs that fit).
# Peaks measured while the trainer kept the 4-bit scales double-quantized ("nested") held 3 bytes
# per 64-weight block less than today's trainer, which expands them at load; that exact amount is added.
MEASURED = [  # shape, targets, micro-batch, seq, checkpointing, fused kernels, scales, peak GiB
    (BENCH_1_5B, ATTN, 8, 2048, True, False, "nested", 33.51),
    (BENCH_1_5B, ATTN, 16, 2048, True, False, "nested", 64.10),
    (QWEN_7B, ATTN, 8, 2048, True, False, "nested", 42.68),
    (QWEN_7B, ["all-linear"], 8, 2048, True, False, "nested", 43.13),
    (BENCH_0_5B, ["all-linear"], 8, 512, True, False, "nested", 8.906),
    # Liger kernels
    (BENCH_1_5B, ATTN, 8, 2048, False, True, "nested", 33.15),
    (QWEN_7B, ATTN, 2, 2048, False, True, "nested", 23.02),
    (QWEN_7B, ["all-linear"], 2, 2048, False, True, "nested", 31.84),
    (QWEN_7B, ATTN, 16, 2048, True, True, "nested", 19.04),
    # bench/results/h100-2026-11-23-side-by-side.json: the current trainer
    (BENCH_1_5B, ATTN, 16, 2048, False, True, "expanded", 64.67),
    (BENCH_1_5B, ["all-linear"], 8, 2048, False, True, "expanded", 48.97),
    (QWEN_7B, ATTN, 4, 2048, False, True, "expanded", 40.76),
    (QWEN_7B, ["all-linear"], 4, 2048, False, True, "expanded", 58.05),
    (QWEN_7B, ATTN, 2, 2048, True, True, "expanded", 7.38),
]


@pytest.mark.parametrize("shape,targets,micro,seq,checkpointing,fused,scales,peak_gib", MEASURED)
def test_estimate_errs_high_of_measured_peaks_by_little(shape, targets, micro, seq, checkpointing, fused, scales,
                                                        peak_gib):
    if scales == "nested":
        peak_gib += shape.linear_params * 3 / 64 / 2**30
    estimate = estimate_memory(shape, quantized=True, lora_r=16, lora_targets=targets, micro_batch=micro,
                               seq_len=seq, checkpointing=checkpointing, fused_kernels=fused)
    # The fixed terms (CUDA context, allocator slack) weigh most on the smallest peaks.
    assert peak_gib <= estimate.total_gib <= peak_gib * (1.2 if peak_gib < 10 else 1.16)


# Some layers checkpointed, the rest whole (bench/results/h200-2026-12-02-selective-checkpointing.json,
# fused kernels, scales expanded): shape, targets, micro-batch, seq, checkpointed layers, peak GiB.
MEASURED_SELECTIVE = [
    (QWEN_7B, ATTN, 2, 2048, 27, 7.34),
    (QWEN_7B, ATTN, 2, 2048, 24, 9.12),
    (QWEN_7B, ATTN, 4, 2048, 27, 8.96),
    (QWEN_7B, ATTN, 4, 2048, 7, 32.48),
]


@pytest.mark.parametrize("shape,targets,micro,seq,checkpointed,peak_gib", MEASURED_SELECTIVE)
def test_estimate_of_selective_checkpointing_errs_high_by_little(shape, targets, micro, seq, checkpointed, peak_gib):
    estimate = estimate_memory(shape, quantized=True, lora_r=16, lora_targets=targets, micro_batch=micro,
                               seq_len=seq, checkpointing=True, checkpointed_layers=checkpointed, fused_kernels=True)
    assert peak_gib <= estimate.total_gib <= peak_gib * (1.2 if peak_gib < 10 else 1.16)


def test_each_layer_left_whole_adds_its_activations_and_the_last_one_is_free():
    def gib(checkpointing=True, **kw):
        return estimate_memory(QWEN_7B, quantized=True, lora_r=16, lora_targets=ATTN, micro_batch=2, seq_len=2048,
                               checkpointing=checkpointing, fused_kernels=True, **kw).total_gib
    assert gib(checkpointed_layers=QWEN_7B.layers) == gib()
    assert gib(checkpointed_layers=0) == gib(checkpointing=False)
    assert all(gib(checkpointed_layers=n) > gib(checkpointed_layers=n + 1) for n in range(QWEN_7B.layers - 1))
    # Backward recomputes the last checkpointed layer only after it freed the whole one after it.
    assert gib(checkpointed_layers=QWEN_7B.layers - 1) <= gib()


def test_auto_checkpoints_the_fewest_layers_that_fit():
    """7B q/k/v/o, 16 rows per step in 40 GiB on an H200 (bench/results/h200-2026-12-02-selective-
    checkpointing.json): micro-batch 4 with the first 7 of 28 layers checkpointed ran 15,112 tokens/s,
    where checkpointing every layer (micro-batch 16) ran 12,983."""
    s = spec(lora={"targetModules": ATTN}, training={"batchSize": 16})
    plan = plan_run(s, QWEN_7B, 40)
    assert (plan.micro_batch_size, plan.gradient_checkpointing, plan.checkpointed_layers) == (4, True, 7)
    assert "gradient checkpointing on for the first 7 layers" in plan.summary()
    one_fewer = estimate_memory(QWEN_7B, quantized=True, lora_r=16, lora_targets=ATTN, micro_batch=4, seq_len=2048,
                                checkpointing=True, checkpointed_layers=6, fused_kernels=True)
    assert plan.estimate.total_gib <= 40 * 0.92 < one_fewer.total_gib
    every = plan_run(spec(lora={"targetModules": ATTN}, training={"batchSize": 16, "gradientCheckpointing": "on"}),
                     QWEN_7B, 40)
    assert (every.micro_batch_size, every.gradient_checkpointing, every.checkpointed_layers) == (16, True, None)
    assert "gradient checkpointing on," in every.summary()
    none = plan_run(spec(lora={"targetModules": ATTN}, training={"batchSize": 16, "gradientCheckpointing": "off"}),
                    QWEN_7B, 40)
    assert (none.gradient_checkpointing, none.checkpointed_layers) == (False, None)


def test_the_lean_profile_leaves_the_last_layer_whole():
    """In 10 GiB the 7B keeps one layer's activations: the one backward starts with, which costs no
    more than recomputing it (measured: 7.34 GiB, against 7.30 with every layer checkpointed)."""
    plan = plan_run(spec(lora={"targetModules": ATTN}, training={"batchSize": 16}), QWEN_7B, 10)
    assert (plan.micro_batch_size, plan.checkpointed_layers) == (2, QWEN_7B.layers - 1)


def test_quantization_and_checkpointing_shrink_the_estimate():
    def gib(**kw):
        args = dict(quantized=True, lora_r=16, lora_targets=ATTN, micro_batch=4, seq_len=2048, checkpointing=True,
                    fused_kernels=True)
        return estimate_memory(QWEN_7B, **{**args, **kw}).total_gib
    assert gib() < gib(quantized=False)
    assert gib() < gib(checkpointing=False)
    assert gib(micro_batch=1) < gib()
    assert gib() < gib(fused_kernels=False) - 5  # the 152k-entry logits of 8,192 tokens, fp32 with gradient


def test_prefers_no_checkpointing_when_it_fits_and_keeps_the_batch():
    plan = plan_run(spec(training={"batchSize": 16, "maxSeqLength": 1024}), BENCH_0_5B, 80)
    assert not plan.gradient_checkpointing
    assert plan.effective_batch == 16
    assert plan.estimate.total_gib <= 80 * 0.92


def test_small_gpu_gets_checkpointing_and_accumulation():
    plan = plan_run(spec(), QWEN_7B, 10)  # the memory-lean profile: 7B at 2,048 tokens in 10 GiB
    assert plan.gradient_checkpointing and plan.micro_batch_size == 1
    assert plan.gradient_accumulation_steps == 16 and plan.effective_batch == 16
    assert plan.estimate.total_gib <= 10 * 0.92
    assert f"about {plan.estimate.total_gib:.1f} of 10 GiB" in plan.summary()
    with pytest.raises(DoesNotFit, match="short by") as refused:  # the full logits do not fit beside it
        plan_run(spec(), QWEN_7B, 10, fused_kernels=False)
    assert float(re.search(r"needs about ([\d.]+) GiB", str(refused.value)).group(1)) > 10 * 0.92


def test_enough_tokens_per_micro_batch_beat_checkpointing():
    plan = plan_run(spec(training={"batchSize": 16}), QWEN_7B, 80)
    assert (plan.micro_batch_size, plan.gradient_checkpointing) == (4, False)  # 13.7k tokens/s, vs 10.9k at 16 with


def _gib(shape, s, *, seq=None, quantized=None, micro=1, checkpointing=True) -> float:
    return estimate_memory(shape, quantized=s.method == "qlora" if quantized is None else quantized,
                           lora_r=s.lora.r, lora_targets=s.lora.target_modules, micro_batch=micro,
                           seq_len=seq or s.training.max_seq_length, checkpointing=checkpointing,
                           fused_kernels=True).total_gib


def test_refusal_says_by_how_much_and_what_to_change():
    s = spec(method="lora", resources={"gpus": 1})
    with pytest.raises(DoesNotFit) as refused:
        plan_run(s, QWEN_7B, 16)
    message, need = str(refused.value), _gib(QWEN_7B, s)
    assert need > 16
    assert f"needs about {need:.1f} GiB per GPU" in message and f"short by {need - 16 * 0.92:.1f} GiB" in message
    assert f"use method qlora (about {_gib(QWEN_7B, s, quantized=True):.1f} GiB)" in message
    assert f"at least {math.ceil(need / 0.92)} GiB (resources.gpuMemoryGiB)" in message
    assert "maxSeqLength" not in message  # the bf16 weights alone do not fit: a shorter row would not help


def test_refusal_names_the_longest_sequence_that_fits():
    s = spec(training={"maxSeqLength": 32768})
    with pytest.raises(DoesNotFit, match="lower training.maxSeqLength to 16384;") as refused:
        plan_run(s, QWEN_7B, 24)
    assert _gib(QWEN_7B, s, seq=16384) <= 24 * 0.92 < _gib(QWEN_7B, s, seq=32768)
    assert "method qlora" not in str(refused.value)


def test_a_fixed_micro_batch_is_kept_or_refused():
    assert plan_run(spec(training={"microBatchSize": 2}), QWEN_7B, 80).micro_batch_size == 2
    with pytest.raises(DoesNotFit, match="leave training.microBatchSize unset"):
        plan_run(spec(training={"microBatchSize": 16, "gradientCheckpointing": "off"}), QWEN_7B, 80)


def test_sharding_only_where_a_copy_per_gpu_does_not_fit():
    s = spec(method="lora", resources={"gpus": 2})  # bf16 7B: 14 GiB of weights
    roomy = plan_run(s, QWEN_7B, 80)
    assert not roomy.sharded and "FSDP" not in roomy.summary()
    tight = plan_run(s, QWEN_7B, 16)
    assert _gib(QWEN_7B, s) > 16 * 0.92  # one GPU could not hold it (test_refusal_says_by_how_much_...)
    assert tight.sharded and tight.estimate.total_gib <= 16 * 0.92
    assert "sharded over 2 GPUs (FSDP)" in tight.summary()
    assert tight.effective_batch == s.training.batch_size


def test_sharding_divides_the_base_but_not_its_scales_or_embeddings():
    def weights(shards, quantized=True):
        return estimate_memory(QWEN_7B, quantized=quantized, lora_r=16, lora_targets=ATTN, micro_batch=1,
                               seq_len=2048, checkpointing=True, fused_kernels=True, shards=shards).weights
    embeddings = QWEN_7B.embedding_params * 2
    scales = QWEN_7B.linear_params * 4 / 64
    assert weights(1) == pytest.approx(QWEN_7B.linear_params * 0.5 + scales + embeddings)
    per_layer = QWEN_7B.linear_params / QWEN_7B.layers * 0.5
    assert weights(4) == pytest.approx(QWEN_7B.linear_params * 0.5 / 4 + 2 * per_layer + scales + embeddings)
    assert weights(8, quantized=False) < weights(2, quantized=False) < weights(1, quantized=False)


def test_a_refusal_on_one_gpu_names_how_many_would_share_the_model():
    s = spec(method="lora", resources={"gpus": 1})
    with pytest.raises(DoesNotFit, match=r"use (\d+) GPUs \(resources.gpus x resources.nodes\)") as refused:
        plan_run(s, QWEN_7B, 12)
    gpus = int(re.search(r"use (\d+) GPUs", str(refused.value)).group(1))
    plan_run(spec(method="lora", resources={"gpus": gpus}), QWEN_7B, 12)  # fits, sharded
    with pytest.raises(DoesNotFit):
        plan_run(spec(method="lora", resources={"gpus": gpus - 1}), QWEN_7B, 12)


def test_without_a_shape_or_a_gpu_the_defaults_apply():
    assert plan_run(spec(), None, 80).micro_batch_size == 8
    cpu = plan_run(spec(method="lora", resources={"gpus": 0}, storage=None,
                        baseModel={"uri": "pvc://m/x"}, dataset={"uri": "pvc://d/x.jsonl"},
                        output={"uri": "pvc://o/x"}), BENCH_0_5B, 80)
    assert (cpu.micro_batch_size, cpu.gradient_checkpointing, cpu.estimate) == (4, False, None)


@given(batch=st.integers(1, 512), gpus=st.sampled_from([1, 2, 4, 8]), nodes=st.integers(1, 4),
       seq=st.sampled_from([256, 1024, 2048, 8192]), memory=st.sampled_from([24, 40, 80, 141]))
def test_plans_fit_and_keep_the_effective_batch(batch, gpus, nodes, seq, memory):
    s = spec(training={"batchSize": batch, "maxSeqLength": seq}, resources={"gpus": gpus, "nodes": nodes})
    try:
        plan = plan_run(s, QWEN_7B, memory)
    except DoesNotFit as exc:
        assert "short by" in str(exc)
        return
    world = gpus * nodes
    assert plan.world_size == world
    assert plan.estimate.total_gib <= memory * 0.92
    assert plan.sharded == (_gib(QWEN_7B, s) > memory * 0.92)  # not even micro-batch 1, checkpointed, fits a copy
    assert batch <= plan.effective_batch < batch + world * plan.micro_batch_size
    if batch % world == 0:
        assert plan.effective_batch == batch
