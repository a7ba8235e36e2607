"""The fused LoRA path (kubetune_trainer.fused_lora) computes what peft computes: the same logits,
loss and adapter gradients on a Llama-shaped model (biased q/k/v as Qwen2's, grouped KV heads),
all-linear LoRA, on the CPU in fp32. Its 4-bit side runs on the GPU (tests/trainer/test_gpu_paths.py),
which patches Qwen2's modeling module with Liger's Triton kernels for the rest of its process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune_trainer import fused_lora
from kubetune_trainer.modeling import attach_lora
from tests.trainer.recipe_support import run_spec


def _spec(**lora) -> FineTuneJobSpec:
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"], **lora}
    return FineTuneJobSpec.model_validate(run_spec(Path("/unused"), Path("/unused"), lora=lora)["spec"])


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attention_bias=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _pair(monkeypatch, **lora):
    """The same adapted model twice, peft's path and the fused one; lora_B made non-zero so that
    every gradient is."""
    base = _model()
    monkeypatch.setenv(fused_lora.ENV_SWITCH, "0")
    plain = attach_lora(copy.deepcopy(base), _spec(**lora))
    monkeypatch.setenv(fused_lora.ENV_SWITCH, "1")
    fused = attach_lora(base, _spec(**lora))
    with torch.no_grad():
        for (name, p), (other, q) in zip(plain.named_parameters(), fused.named_parameters(), strict=True):
            assert name == other
            if "lora_B" in name:
                p.normal_(0, 0.05)
            q.copy_(p)
    return plain, fused


def _step(model, tokens):
    model.zero_grad()
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_path_gives_peft_logits_loss_and_adapter_gradients(monkeypatch, dropout):
    """With dropout, each side seeded alike draws the same masks (the same kernel, in the same order)."""
    plain, fused = _pair(monkeypatch, dropout=dropout)
    assert fused_lora.fused_layer_count(fused) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    logits, loss, grads = _step(plain, tokens)
    torch.manual_seed(7)
    fused_logits, fused_loss, fused_grads = _step(fused, tokens)
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_loss, loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert plain.state_dict().keys() == fused.state_dict().keys()  # the saved adapter is peft's
    if dropout:  # and the masks mattered: another draw gives another loss
        assert not torch.equal(_step(fused, tokens)[1], fused_loss)


def test_dropout_is_off_in_eval_mode(monkeypatch):
    _, fused = _pair(monkeypatch, dropout=0.1)
    q_proj = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert fused_lora._plain_adapter(q_proj) == ("default", 0.1)
    fused.eval()
    assert fused_lora._plain_adapter(q_proj) == ("default", 0.0)


@pytest.mark.parametrize("state", ["disabled", "merged"])
def test_disabled_or_merged_adapters_take_peft_path(monkeypatch, state):
    _, fused = _pair(monkeypatch)
    q_proj = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert fused_lora._plain_adapter(q_proj) == ("default", 0.0)
    if state == "disabled":
        q_proj.enable_adapters(False)
    else:
        q_proj.merge()
    assert fused_lora._plain_adapter(q_proj) is None


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(fused_lora.ENV_SWITCH, "0")
    model = attach_lora(_model(), _spec())
    assert fused_lora.fused_layer_count(model) == 0
