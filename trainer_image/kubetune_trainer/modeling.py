"""Loading the base model (4-bit NF4 for qlora, bf16/fp32 for lora) and attaching LoRA."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune_trainer import attention, fused_lora
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.kernels import apply_fused_kernels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype  # dtype of the trainable path and of an unquantized base

    @classmethod
    def detect(cls) -> Placement:
        if torch.cuda.is_available():
            return cls("cuda", torch.bfloat16)
        # CPU: fp32, since bf16 matmuls are slow there and would blur the merge-parity checks.
        return cls("cpu", torch.float32)


def load_tokenizer(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: Path, spec: FineTuneJobSpec, placement: Placement, *, gradient_checkpointing: bool,
              checkpointed_layers: int | None = None, sharded: bool = False):
    """checkpointed_layers: with gradient_checkpointing, only the first N decoder layers recompute
    their activations (the plan's RunPlan.checkpointed_layers); None: all of them.
    sharded: FSDP will shard the model. Every process still loads the whole (4-bit) model onto
    its GPU first, as transformers does for quantized models; FSDP then keeps 1/world of it."""
    quant = spec.effective_quantization()
    on_gpu = placement.device == "cuda"
    kwargs = {"dtype": placement.dtype,
              "attn_implementation": attention.register() if on_gpu and attention.available() else "sdpa"}
    if quant is not None:
        if not on_gpu:
            raise ConfigError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use method lora on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quant.bits == 4, load_in_8bit=quant.bits == 8, bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
            # FSDP shards floating-point tensors only, and flattens each layer into one tensor of a
            # single dtype: the packed 4-bit codes are stored as the rest of the layer is.
            bnb_4bit_quant_storage=placement.dtype if sharded else torch.uint8)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is None:
        # functools.wraps types transformers' to() as unbound (typeshed's _Wrapped binds no self).
        model.to(placement.device)  # type: ignore[arg-type]
    else:
        expand_nested_absmax(model)
    # No prepare_model_for_kbit_training: its fp32 copies of the embeddings and LM head cost 4 GiB
    # on a 7B model and a cast per step, and the fused kernels keep norms and loss in fp32 anyway.
    if on_gpu:
        apply_fused_kernels(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if checkpointed_layers is not None:
            keep_activations(model, checkpointed_layers)
    model.config.use_cache = False
    return model


def keep_activations(model, checkpointed_layers: int) -> None:
    """Leaves checkpointing on for the first checkpointed_layers decoder layers only.

    transformers checkpoints each decoder layer (a GradientCheckpointingLayer) by its own
    `gradient_checkpointing` flag, which gradient_checkpointing_enable sets on all of them; its
    `every_n_layers` spreads the choice (only counts of layers / n, and not in every release), so the
    flags past the first N are cleared here. The layers left whole are the last: backward frees
    their activations before it recomputes any checkpointed layer (the planner counts it so)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not 0 < checkpointed_layers <= len(layers):
        raise ConfigError(f"{checkpointed_layers} checkpointed layers planned; the model has {len(layers)}")
    for layer in layers[checkpointed_layers:]:
        layer.gradient_checkpointing = False


def expand_nested_absmax(model) -> int:
    """Dequantize double-quantized 4-bit scales once, at load, instead of in every matmul.

    Double quantization stores each 64-weight block's fp32 absmax as 8 bits; bitsandbytes expands
    them again in every forward and backward matmul (about 4% of a 7B step's GPU time on an H100).
    The expanded values are the ones every matmul would compute, so the numerics are the spec's;
    the price is 3 bytes per block (0.3 GB on a 7B), which the planner counts.
    """
    import bitsandbytes.functional as bnbf

    expanded = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not getattr(state, "nested", False):
            continue
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
        state.absmax = (absmax + state.offset).float()
        state.state2 = state.offset = None
        state.nested = False
        expanded += 1
    if expanded:
        log.info("double-quantized scales expanded to fp32 in %d layers", expanded)
    return expanded


def lora_config(spec: FineTuneJobSpec) -> LoraConfig:
    targets = spec.lora.target_modules
    # The ignore: peft annotates lora_alpha int, yet only divides by it (scaling = alpha / r); a
    # fractional alpha is the spec's to give.
    return LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,  # type: ignore[arg-type]
                      lora_dropout=spec.lora.dropout, bias="none",
                      task_type="CAUSAL_LM",
                      target_modules="all-linear" if targets == ["all-linear"] else list(targets))


def attach_lora(model, spec: FineTuneJobSpec, *, sharded: bool = False):
    """sharded: FSDP will flatten the layers' weights, which the fused LoRA path does not read."""
    try:
        peft_model = get_peft_model(model, lora_config(spec))
    except ValueError as exc:  # peft names the modules it could not find
        raise ConfigError(f"lora.targetModules: {exc}") from exc
    if not sharded and fused_lora.enabled():
        fused_lora.fuse_lora_layers(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d trainable of %d parameters", spec.lora.r, spec.lora.target_modules, trainable, total)
    return peft_model


def merge_adapter(base_path: Path, adapter_path: Path, out_dir: Path, dtype: torch.dtype, tokenizer=None) -> None:
    """Merge into a full-precision copy of the base (never into 4-bit weights) and save it."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    (tokenizer or load_tokenizer(base_path)).save_pretrained(out_dir)
