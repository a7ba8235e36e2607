"""vLLM's rules for a PEFT adapter, one test per rule: each is read from vLLM v0.11.0's source
(operator/kubetune/serving/vllm.py names the file)."""

from __future__ import annotations

import pytest

from kubetune.serving.vllm import MAX_LORA_RANKS, check, max_lora_rank

LLAMA = ["LlamaForCausalLM"]


def peft(**fields) -> dict:
    """An adapter_config.json as PEFT writes one for a Llama fine-tune."""
    return {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "bias": "none", "modules_to_save": None,
            "use_dora": False, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"], **fields}


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_a_plain_lora_on_every_linear_layer_is_compatible(architecture):
    verdict = check(peft(), [architecture], "bfloat16")
    assert (verdict.compatible, verdict.problems, verdict.rank, verdict.max_lora_rank) == (True, [], 16, 16)


@pytest.mark.parametrize("rank,expected", [(1, 1), (2, 8), (8, 8), (12, 16), (64, 64), (100, 128), (300, 320),
                                           (321, 512), (512, 512)])
def test_the_rank_rounds_up_to_a_max_lora_rank_vllm_accepts(rank, expected):
    assert max_lora_rank(rank) == expected
    verdict = check(peft(r=rank), LLAMA, None)
    assert verdict.compatible and verdict.max_lora_rank == expected


@pytest.mark.parametrize("rank", [0, 513, 1024])
def test_a_rank_outside_vllms_range_is_refused(rank):
    with pytest.raises(ValueError, match=f"rank {rank}"):
        max_lora_rank(rank)
    verdict = check(peft(r=rank), LLAMA, None)
    assert verdict.compatible is False and verdict.max_lora_rank is None
    assert str(rank) in verdict.problems[0]
    assert max(MAX_LORA_RANKS) == 512


def test_modules_to_save_is_refused_with_the_modules_named():
    verdict = check(peft(modules_to_save=["lm_head", "embed_tokens"]), LLAMA, None)
    assert verdict.compatible is False and "modules_to_save ['lm_head', 'embed_tokens']" in verdict.problems[0]


def test_dora_is_refused():
    verdict = check(peft(use_dora=True), LLAMA, None)
    assert verdict.compatible is False and "DoRA" in verdict.problems[0]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_a_bias_is_refused(bias):
    verdict = check(peft(bias=bias), LLAMA, None)
    assert verdict.compatible is False and f"bias {bias!r}" in verdict.problems[0]


def test_target_modules_vllm_cannot_serve_are_named():
    verdict = check(peft(target_modules=["q_proj", "v_proj", "input_layernorm"]), ["Qwen2ForCausalLM"], None)
    assert verdict.compatible is False
    assert "input_layernorm cannot be served as LoRA by vLLM for Qwen2ForCausalLM" in verdict.problems[0]


def test_full_module_paths_are_checked_by_their_last_name():
    verdict = check(peft(target_modules=["model.layers.0.self_attn.q_proj", "lm_head"]), LLAMA, None)
    assert verdict.compatible is True


@pytest.mark.parametrize("field,value", [("rank_pattern", {"q_proj": 64}), ("alpha_pattern", {"q_proj": 8}),
                                         ("trainable_token_indices", [5, 7]), ("layers_to_transform", [0, 1])])
def test_what_vllm_would_silently_ignore_is_refused(field, value):
    verdict = check(peft(**{field: value}), LLAMA, None)
    assert verdict.compatible is False and field in verdict.problems[0]


@pytest.mark.parametrize("field", ["r", "lora_alpha", "target_modules"])
def test_a_required_field_missing_is_named(field):
    config = peft()
    del config[field]
    verdict = check(config, LLAMA, None)
    assert verdict.compatible is False and field in verdict.problems[0]


def test_another_peft_type_is_refused():
    verdict = check(peft(peft_type="IA3"), LLAMA, None)
    assert verdict.compatible is False and "IA3" in verdict.problems[0]


@pytest.mark.parametrize("dtype,compatible", [("float16", True), ("bfloat16", True), ("float32", True),
                                              ("float8_e4m3fn", False)])
def test_the_base_dtype_must_be_one_vllm_serves_lora_in(dtype, compatible):
    verdict = check(peft(), LLAMA, dtype)
    assert verdict.compatible is compatible
    assert compatible or dtype in verdict.problems[0]


def test_an_architecture_the_rules_do_not_cover_is_not_checked_not_refused():
    verdict = check(peft(), ["GPTNeoXForCausalLM"], None)
    assert verdict.compatible is None and verdict.reason == "VllmNotChecked"
    assert "GPTNeoXForCausalLM" in verdict.problems[0]
    assert verdict.max_lora_rank == 16  # the rank is still known: the manifests can use it


def test_a_pattern_for_target_modules_is_not_checked_but_a_real_problem_still_refuses():
    assert check(peft(target_modules=".*proj"), LLAMA, None).compatible is None
    both = check(peft(target_modules=".*proj", use_dora=True), LLAMA, None)
    assert both.compatible is False and len(both.problems) == 2


def test_no_adapter_config_is_not_checked():
    verdict = check(None, LLAMA, None)
    assert verdict.compatible is None and "adapter_config.json" in verdict.problems[0]
