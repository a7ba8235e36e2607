"""Training with the base model sharded over the GPUs (FSDP), for plans where a copy per GPU does
not fit: transformers' FSDP integration, with the LoRA adapter saved and restored by us.

transformers and accelerate save a PEFT model under FSDP1 through peft's get_peft_model_state_dict,
which picks the adapter's entries by the names of its modules; FSDP wraps those modules in place,
so no name matches and the adapter is written empty (peft 0.21; bench/results/h200-2026-11-24-fsdp.json).
Here each LoRA unit is gathered on its own (a few MB, never the frozen base) and written in peft's
format, and a checkpoint's adapter is loaded into the model before FSDP wraps it. The optimizer
state stays accelerate's, keyed by parameter name rather than by rank.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from trl import SFTTrainer

from kubetune_trainer.errors import ConfigError

# FSDP1, the QLoRA recipe bitsandbytes, peft and accelerate document: transformers wraps each
# decoder layer and, separately, each LoRA layer (peft's wrap policy: one flat parameter cannot mix
# trainable and frozen tensors), and computes in the 4-bit storage dtype. FSDP2 unshards
# bitsandbytes' 4-bit parameters into plain tensors, losing their quantization state.
FSDP_CONFIG = {"version": 1, "use_orig_params": False, "state_dict_type": "FULL_STATE_DICT",
               "limit_all_gathers": True, "backward_prefetch": "BACKWARD_PRE"}
# What accelerate's FULL_STATE_DICT checkpoint writes beside the optimizer: the model (the frozen
# base included), which the adapter file already covers for LoRA.
FSDP_MODEL_STATE = "pytorch_model_fsdp.bin"
# accelerate's name for FSDP's optimizer state; an unsharded run writes transformers' optimizer.pt.
FSDP_OPTIMIZER_STATE = "optimizer.bin"
# FSDP1 inserts this module level between a unit and what it wraps.
_WRAPPED = "_fsdp_wrapped_module."
_FLAT_PARAM = "_flat_param"


def adapter_state(model: FSDP, *, is_main: bool) -> dict[str, torch.Tensor]:
    """The trainable tensors of a sharded model, whole and on the CPU, under the names the unwrapped
    PeftModel gives them; on the main rank only ({} elsewhere). Every rank must call it: the
    gathers are collectives. One LoRA unit is gathered at a time, never the frozen base."""
    prefixes = {id(module): name.replace(_WRAPPED, "") for name, module in model.named_modules()}
    state: dict[str, torch.Tensor] = {}
    for unit in FSDP.fsdp_modules(model):
        if not any(p.requires_grad for p in unit.module.parameters(recurse=False)):
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
            if not is_main:
                continue
            for name, param in unit.module.named_parameters():
                if param.requires_grad and not name.endswith(_FLAT_PARAM):
                    full = f"{prefixes[id(unit)]}.{name}" if prefixes[id(unit)] else name
                    state[full] = param.detach().to("cpu", copy=True)
    if is_main and not state:
        raise RuntimeError("the sharded model has no trainable parameters to save")  # never an empty adapter
    return state


def save_adapter(model: FSDP, directory: Path, *, is_main: bool) -> None:
    """Write a sharded model's adapter as peft's save_pretrained writes an unsharded one (the main
    rank writes; every rank must call it)."""
    state = adapter_state(model, is_main=is_main)
    if not is_main:
        return
    peft_model = cast(PeftModel, model.module)  # what the Trainer wrapped; torch types it as any Module
    name = peft_model.active_adapter
    directory.mkdir(parents=True, exist_ok=True)
    save_file({_without_adapter_name(key, name): tensor.contiguous() for key, tensor in state.items()},
              directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
    config = copy.copy(peft_model.peft_config[name])
    config.inference_mode = True  # as peft saves it: loaded for inference unless asked otherwise
    config.save_pretrained(str(directory))


def _without_adapter_name(key: str, adapter: str) -> str:
    """peft's checkpoint keys leave out the adapter's name: q_proj.lora_A.default.weight -> q_proj.lora_A.weight"""
    module, _, leaf = key.rpartition(f".{adapter}.")
    return f"{module}.{leaf}"


class ShardedLoraTrainer(SFTTrainer):
    """TRL's SFTTrainer for a plan that shards the base: writes the gathered adapter wherever
    the Trainer saves the model (checkpoints, the final save_model), and resumes from it."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Once it wraps the model, the Trainer points self.model at the FSDP wrapper (its FSDP convention).
        assert isinstance(self.model, FSDP), type(self.model)
        directory = output_dir or self.args.output_dir
        assert directory is not None  # TrainingArguments fills in a default
        save_adapter(self.model, Path(directory), is_main=self.args.should_save)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            # The Trainer would find the latest checkpoint itself, then call our _load_from_checkpoint,
            # which loads nothing: the adapter would silently start from scratch.
            raise ValueError("ShardedLoraTrainer resumes from a checkpoint directory, not True")
        if resume_from_checkpoint:
            # Before the Trainer wraps the model: each rank then keeps its shard of these weights.
            adapter = load_file(Path(resume_from_checkpoint) / SAFETENSORS_WEIGHTS_NAME)
            # Any: peft annotates the result `namedtuple` (the factory), which is no type.
            loaded: Any = set_peft_model_state_dict(self.model, adapter)
            if loaded.unexpected_keys:
                raise ConfigError(f"{resume_from_checkpoint}: adapter weights this model does not have: "
                                  f"{loaded.unexpected_keys[:3]}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The model's part of a checkpoint is the adapter, loaded by train() already. (The Trainer's
        own load would look for the FSDP model file, which the checkpoints leave out.)"""
