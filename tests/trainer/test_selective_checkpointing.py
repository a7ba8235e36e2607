"""Selective activation checkpointing: the plan's first N decoder layers recompute their activations
in backward and the rest keep them, with the loss and every adapter gradient of a model that
checkpoints nothing; the Trainer keeps the plan's choice. On the CPU, in fp32, with LoRA dropout (the
recomputation replays the same masks)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.planning import RunPlan
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.modeling import Placement, attach_lora, load_base
from kubetune_trainer.training import PreemptionFlag, build_trainer
from tests.trainer.recipe_support import run_spec

LAYERS = 4
CPU = Placement("cpu", torch.float32)


def _spec() -> FineTuneJobSpec:
    body = run_spec(Path("/unused"), Path("/unused"), lora={"r": 8, "alpha": 16, "dropout": 0.1,
                                                             "targetModules": ["all-linear"]})
    return FineTuneJobSpec.model_validate(body["spec"])


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _adapted(path: Path, **checkpointing):
    torch.manual_seed(1)  # the same lora_A, and lora_B (zero at first) made non-zero so that every gradient is
    model = attach_lora(load_base(path, _spec(), CPU, **checkpointing), _spec())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _decoder_layers(model) -> list:
    return list(model.base_model.model.model.layers)


def _step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    """Loss, adapter gradients, and how often each layer's MLP ran: twice where the layer recomputed.
    (Counted in the MLP's forward: torch's recomputation runs no module hooks.)"""
    calls: Counter[int] = Counter()

    def counted(forward, i):
        def run(*args, **kwargs):
            calls.update([i])
            return forward(*args, **kwargs)
        return run

    for i, layer in enumerate(_decoder_layers(model)):
        layer.mlp.forward = counted(layer.mlp.forward, i)
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)  # the same dropout masks in every model
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    for layer in _decoder_layers(model):
        del layer.mlp.forward
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, [calls[i] for i in range(LAYERS)]


@pytest.mark.parametrize("checkpointed", [1, 3, None])
def test_the_first_layers_recompute_and_the_step_is_the_unchecked_models(tiny_qwen2, checkpointed):
    whole_loss, whole_grads, whole_calls = _step(_adapted(tiny_qwen2, gradient_checkpointing=False))
    model = _adapted(tiny_qwen2, gradient_checkpointing=True, checkpointed_layers=checkpointed)
    loss, grads, calls = _step(model)

    count = LAYERS if checkpointed is None else checkpointed
    assert whole_calls == [1] * LAYERS
    assert calls == [2] * count + [1] * (LAYERS - count)
    assert [layer.gradient_checkpointing for layer in _decoder_layers(model)] == [True] * count + [False] * (
        LAYERS - count)
    torch.testing.assert_close(loss, whole_loss, rtol=0, atol=0)
    assert grads.keys() == whole_grads.keys() and len(grads) == 7 * 2 * LAYERS
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, whole_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_count_the_model_does_not_have_is_refused(tiny_qwen2):
    with pytest.raises(ConfigError, match=f"5 checkpointed layers planned; the model has {LAYERS}"):
        load_base(tiny_qwen2, _spec(), CPU, gradient_checkpointing=True, checkpointed_layers=LAYERS + 1)


class _Quiet:
    def report(self, report, force=False):
        pass

    def push(self, local_dir, step):
        return None


@pytest.mark.parametrize("checkpointed", [2, None])
def test_the_trainer_keeps_the_plans_layers(tiny_qwen2, tokenizer, tmp_path, checkpointed):
    """The Trainer's own switch checkpoints every layer when it starts training."""
    plan = RunPlan(world_size=1, micro_batch_size=2, gradient_accumulation_steps=1, gradient_checkpointing=True,
                   checkpointed_layers=checkpointed)
    spec = _spec().model_copy(update={"training": _spec().training.model_copy(update={"max_steps": 1})})
    model = _adapted(tiny_qwen2, gradient_checkpointing=True, checkpointed_layers=checkpointed)
    ids = [list(range(10, 42)), list(range(50, 90))]
    rows = Dataset.from_dict({"input_ids": ids, "labels": ids, "seq_lengths": [[32], [40]], "row": [0, 1]})
    trainer, _ = build_trainer(model, spec, rows, tokenizer=tokenizer, plan=plan, work_dir=tmp_path,
                               callback_kwargs={"reporter": _Quiet(), "store": _Quiet(),
                                                "preemption": PreemptionFlag(), "evaluate": dict})
    trainer.train()

    count = LAYERS if checkpointed is None else checkpointed
    assert [layer.gradient_checkpointing for layer in _decoder_layers(model)] == [True] * count + [False] * (
        LAYERS - count)
