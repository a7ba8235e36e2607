"""The GPU-only fast paths give the same numbers as the reference paths the CPU tests check.

Run on a CUDA machine (bench/README.md: the device tool); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from kubetune_trainer import attention
from kubetune_trainer.data import IGNORE, training_rows
from kubetune_trainer.packing import RowCollator

pytestmark = pytest.mark.skipif(not attention.available(), reason="needs a CUDA GPU and torch varlen attention")


def _block_causal_reference(q, k, v, lengths):
    """sdpa per example (batch 1 rows laid end to end), GQA by repetition."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out, start = [], 0
    for n in lengths:
        part = [t[:, :, start:start + n] for t in (q, k, v)]
        out.append(torch.nn.functional.scaled_dot_product_attention(*part, is_causal=True))
        start += n
    return torch.cat(out, dim=2).transpose(1, 2)


def test_varlen_attention_matches_per_example_causal_attention():
    torch.manual_seed(0)
    lengths = [5, 300, 1, 200, 6]  # one row of 512 tokens
    q = torch.randn(1, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    batch = RowCollator(0, multiple_of=1)([{"input_ids": [1] * 512, "labels": [1] * 512, "seq_lengths": lengths}])
    out, _ = attention.varlen_attention(None, q, k, v, None, scaling=64 ** -0.5,
                                        cu_seq_lens_q=batch["cu_seq_lens_q"].cuda(),
                                        max_length_q=batch["max_length_q"])
    torch.testing.assert_close(out, _block_causal_reference(q, k, v, lengths), atol=2e-2, rtol=2e-2)


def _tiny_qwen2(attn_implementation):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                               num_key_value_heads=2, intermediate_size=512, vocab_size=1000)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                            attn_implementation=attn_implementation).cuda().eval()


@torch.no_grad()
def test_packed_training_batch_through_the_model_equals_separate_examples():
    model = _tiny_qwen2(attention.register())
    from datasets import Dataset

    ids = [list(range(10, 10 + n)) for n in (40, 17, 90, 3)]
    rows = list(training_rows(Dataset.from_dict({"input_ids": ids, "labels": ids}), 128, packing=True))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in RowCollator(0)(rows).items()}
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   cu_seq_lens_q=batch["cu_seq_lens_q"], max_length_q=batch["max_length_q"]).logits.float()
    reference = _tiny_qwen2("sdpa")
    for row, labels in zip(range(logits.shape[0]), batch["labels"]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [logits.shape[1]]
        for a, b in zip(starts, starts[1:]):
            if labels[a + 1:b].eq(IGNORE).all():
                continue  # padding segment
            alone = reference(input_ids=batch["input_ids"][row:row + 1, a:b]).logits.float()
            torch.testing.assert_close(logits[row:row + 1, a:b], alone, atol=3e-2, rtol=3e-2)


def test_fused_kernels_patch_a_supported_model_and_keep_its_loss():
    from kubetune_trainer.kernels import apply_fused_kernels

    model = _tiny_qwen2("sdpa").train()
    ids = torch.randint(10, 990, (2, 64), device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids, labels=ids).loss.float()
    assert apply_fused_kernels(model)
    with torch.no_grad():
        fused = model(input_ids=ids, labels=ids).loss.float()
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=1e-2)



def test_expanded_scales_give_the_double_quantized_outputs_and_gradients():
    import bitsandbytes as bnb

    from kubetune_trainer.modeling import expand_nested_absmax

    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 512, bias=False, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = torch.nn.Sequential(layer.cuda())
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)

    def output_and_input_grad():
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        out.float().square().sum().backward()
        return out.detach(), leaf.grad

    nested = output_and_input_grad()
    assert expand_nested_absmax(layer) == 1 and not layer[0].weight.quant_state.nested
    expanded = output_and_input_grad()
    torch.testing.assert_close(expanded, nested, atol=0, rtol=0)


def test_fused_lora_on_4bit_layers_gives_peft_loss_and_adapter_gradients(tmp_path, monkeypatch):
    """The fused LoRA path (kubetune_trainer.fused_lora) on NF4 layers, as the trainer loads them
    (double-quantized scales expanded, Liger's kernels), under bf16 autocast as the Trainer runs it."""
    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune_trainer import fused_lora
    from kubetune_trainer.modeling import Placement, attach_lora, load_base
    from tests.trainer.recipe_support import run_spec

    _tiny_qwen2("sdpa").save_pretrained(tmp_path / "model")
    body = run_spec(tmp_path, tmp_path, method="qlora", resources={"gpus": 1},
                    lora={"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]})["spec"]
    spec = FineTuneJobSpec.model_validate(body)
    ids = torch.randint(10, 990, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(3))

    def loss_and_grads(switch: str):
        monkeypatch.setenv(fused_lora.ENV_SWITCH, switch)
        torch.manual_seed(0)
        model = attach_lora(load_base(tmp_path / "model", spec, Placement.detect(), gradient_checkpointing=False),
                            spec).train()
        assert fused_lora.fused_layer_count(model) == (14 if switch == "1" else 0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(len(name)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads("0")
    fused_loss, fused_grads = loss_and_grads("1")
    torch.testing.assert_close(fused_loss, loss, atol=1e-2, rtol=1e-2)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        error = (fused_grads[name] - grad).norm() / grad.norm()
        assert error < 2e-2, (name, error.item())
