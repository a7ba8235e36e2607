"""Whether vLLM can serve a PEFT LoRA adapter, decided from its adapter_config.json and the base
model's architecture, before anyone starts an engine to find out.

Every rule is read from vLLM v0.11.0's source (github.com/vllm-project/vllm, tag v0.11.0); the
file each comes from is named beside it. vLLM refuses some of these at load time and silently
ignores others (PEFTHelper.from_dict drops fields it does not know), which serves an adapter that
answers differently from PEFT: both are refused here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

VLLM_VERSION = "v0.11.0"

# vllm/config/lora.py: MaxLoRARanks, the only values --max-lora-rank accepts.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# vllm/config/lora.py: LoRADType; the LoRA weights take the model's dtype ("auto"), and the punica
# kernels run in half precision. A float32 checkpoint is served in vLLM's half dtype ("auto").
SERVABLE_DTYPES = ("float16", "bfloat16", "float32")

# vllm/model_executor/models/{llama,mistral,qwen2}.py: packed_modules_mapping (q/k/v into qkv_proj,
# gate/up into gate_up_proj) and embedding_modules; with o_proj and down_proj (the remaining
# LinearBase layers, found by vllm/lora/utils.py get_supported_lora_modules), the PEFT module names
# vllm/lora/models.py LoRAModel.from_local_checkpoint accepts (expected_lora_modules).
_DECODER_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                              "embed_tokens", "lm_head"})
LORA_MODULES = {
    "LlamaForCausalLM": _DECODER_MODULES,
    "MistralForCausalLM": _DECODER_MODULES,  # MistralForCausalLM subclasses LlamaForCausalLM
    "Qwen2ForCausalLM": _DECODER_MODULES,
}

# vllm/lora/peft_helper.py: the fields PEFTHelper keeps; PEFT's other fields are dropped unread.
# Those below change what the adapter computes, so dropping them serves another model.
_IGNORED_BY_VLLM = {
    "rank_pattern": "per-module ranks (rank_pattern) are ignored by vLLM's PEFTHelper: it applies r everywhere",
    "alpha_pattern": "per-module alphas (alpha_pattern) are ignored by vLLM's PEFTHelper: it scales by "
                     "lora_alpha everywhere",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices) are ignored by vLLM's "
                               "PEFTHelper",
    "layers_to_transform": "layers_to_transform is ignored by vLLM's PEFTHelper",
}


@dataclass
class Compatibility:
    """The verdict: compatible True or False, or None when it could not be checked (no config, an
    architecture the rules do not cover); problems says why."""

    compatible: bool | None
    problems: list[str] = field(default_factory=list)
    rank: int | None = None
    max_lora_rank: int | None = None  # the --max-lora-rank to start vLLM with

    @property
    def reason(self) -> str:
        return {True: "VllmCompatible", False: "VllmIncompatible", None: "VllmNotChecked"}[self.compatible]


def max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank that admits rank; ValueError above vLLM's largest."""
    fitting = [r for r in MAX_LORA_RANKS if r >= rank]
    if rank < 1 or not fitting:
        raise ValueError(f"LoRA rank {rank} is outside vLLM's supported ranks 1..{MAX_LORA_RANKS[-1]}")
    return fitting[0]


def _rank_problems(config: dict[str, Any]) -> tuple[int | None, list[str]]:
    # vllm/lora/peft_helper.py: r and lora_alpha are required; __post_init__ refuses r <= 0;
    # validate_legal refuses r > max_lora_rank, whose largest value is MaxLoRARanks' last.
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        return None, [f"adapter_config.json lacks {', '.join(missing)}, which vLLM requires"]
    rank = config["r"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return None, [f"r must be a positive integer, not {rank!r}"]
    if rank > MAX_LORA_RANKS[-1]:
        return rank, [f"r {rank} exceeds vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}"]
    alpha = config["lora_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        return rank, [f"lora_alpha must be a number, not {alpha!r}"]
    return rank, []


def _feature_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    # vllm/lora/peft_helper.py _validate_features: modules_to_save must be None, DoRA is refused.
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (full copies of those modules) cannot be "
                        "loaded by vLLM")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported by vLLM")
    # vllm/lora/peft_helper.py validate_legal: "Adapter bias is not supported."
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: vLLM loads only adapters with bias 'none'")
    problems += [why for key, why in _IGNORED_BY_VLLM.items() if config.get(key)]
    return problems


def _module_problems(config: dict[str, Any], architecture: str) -> list[str]:
    targets = config["target_modules"]
    if isinstance(targets, str):
        # A regex: PEFT matched it against the model's module names; what it matched is in the
        # weights' names, which this check does not read.
        return [f"target_modules is the pattern {targets!r}, not a list: vLLM checks the weights' module names "
                "at load time, not checked here"]
    supported = LORA_MODULES[architecture]
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - supported)
    if unsupported:
        return [f"target modules {', '.join(unsupported)} cannot be served as LoRA by vLLM for {architecture} "
                f"(it serves {', '.join(sorted(supported))})"]
    return []


def check(config: dict[str, Any] | None, architectures: list[str], torch_dtype: str | None) -> Compatibility:
    """The verdict for an adapter_config.json on a base model of these architectures and dtype."""
    if config is None:
        return Compatibility(None, ["the adapter has no adapter_config.json"])
    if config.get("peft_type", "LORA") != "LORA":
        return Compatibility(False, [f"peft_type {config['peft_type']}: vLLM serves LoRA adapters only"])
    rank, problems = _rank_problems(config)
    if "target_modules" not in config:
        return Compatibility(False, problems, rank)
    problems += _feature_problems(config)
    if torch_dtype is not None and torch_dtype not in SERVABLE_DTYPES:
        problems.append(f"the base model's dtype {torch_dtype} is not one vLLM serves LoRA in "
                        f"({', '.join(SERVABLE_DTYPES)})")
    architecture = next((a for a in architectures if a in LORA_MODULES), None)
    unchecked = []
    if architecture is None:
        unchecked.append(f"architecture {', '.join(architectures) or 'unknown'} is not among those checked "
                         f"({', '.join(LORA_MODULES)})")
    else:
        modules = _module_problems(config, architecture)
        (unchecked if isinstance(config["target_modules"], str) else problems).extend(modules)
    fitted = max_lora_rank(rank) if rank is not None and rank <= MAX_LORA_RANKS[-1] else None
    if problems:
        return Compatibility(False, problems + unchecked, rank, fitted)
    return Compatibility(None if unchecked else True, unchecked, rank, fitted)
