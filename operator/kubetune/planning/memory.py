"""Peak GPU memory of one training process, from the model's shape and the run's settings.

The terms are the ones that dominate a LoRA step on decoder-only transformers: the frozen base
(NF4 or bf16), the trainable LoRA weights with their gradients and AdamW state (fp32), the
activations kept for backward (all of a layer's, or only its input where the layer is checkpointed,
plus one layer being recomputed), and the logits with their fp32 upcast and gradient, which on
150k-token vocabularies are the largest single term. With fused kernels (the trainer image's
Liger kernels) the LM head and cross-entropy run in chunks that never hold the full logits, and
SwiGLU and RMSNorm keep fewer and narrower tensors for backward. Calibrated against peaks measured
on an H100 (bench/results/): the estimate errs on the high side so that a plan that fits does not OOM.

DPO (objective dpo) trains on two sequences per example (prompt + chosen, prompt + rejected) and
runs a second forward per step for the reference (the base, the adapter disabled: no second copy
of the weights). That forward keeps nothing for backward, but it runs while the policy's
activations are held: one layer's working set and its logits come on top of them.

Training is not the only phase on the GPU: the hold-out loss (before training, at every checkpoint
and at the end) and, with exact match, generation run beside the frozen base and the LoRA state.
The hold-out loss runs at the plan's micro-batch through the fused (tiled) LM head, keeping one
layer's working set; generation holds the KV cache of its batch at prompt plus new tokens. The
phases follow one another, so the peak is the largest of the three.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GiB = 1024**3
# 4-bit codes plus an fp32 absmax per 64-value block: the trainer expands double-quantized
# scales at load (kubetune_trainer.modeling.expand_nested_absmax), so both settings cost the same.
NF4_CODE_BYTES = 0.5
NF4_SCALE_BYTES = 4 / 64
# FSDP gathers the layer it computes and prefetches the next one.
GATHERED_LAYERS = 2
BF16 = 2
TRAINABLE_BYTES_PER_PARAM = 16  # fp32 weight, fp32 gradient, AdamW's two fp32 moments
LOGIT_BYTES_PER_ENTRY = 2 + 4 + 4 + 2  # bf16 logits, fp32 upcast and its gradient, the bf16 gradient
# Fused LM head + cross-entropy: chunks of about hidden/vocab of the tokens at a time (fp32 logits
# and gradient), plus the hidden states' gradient: a few bytes per token per hidden unit.
FUSED_LOGIT_BYTES_PER_TOKEN_HIDDEN = 4 * 2 * 2 + 2
# TRL's fused LM head scores 4,096 tokens against 32,768 vocabulary entries at a time (bf16 tile),
# keeping a few fp32 running statistics per token.
LOGPROB_TILE = (4096, 32768)
LOGPROB_STAT_BYTES_PER_TOKEN = 8 * 4
RUNTIME_OVERHEAD_BYTES = 1.0 * GiB  # CUDA context, cuBLAS workspaces, kernels
FRAGMENTATION = 1.08  # caching allocator slack observed at peak


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a transformers config.json (Llama, Qwen2, Mistral, SmolLM and kin)."""
        try:
            heads = int(config["num_attention_heads"])
            return cls(layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                       intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                       heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
                       tied_embeddings=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json does not describe a decoder-only transformer: {exc}") from exc

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one layer, by the names peft targets."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        return self.linear_params + self.embedding_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes. The terms are training's; training, evaluation and generation are each phase's peak
    (overhead and fragmentation included, 0 for a phase the run does not have), total the largest."""
    weights: float
    trainable: float
    activations: float
    logits: float
    training: float
    evaluation: float
    generation: float

    @property
    def total(self) -> float:
        return max(self.training, self.evaluation, self.generation)

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def phases(self) -> str:
        """Each phase's peak, for the plan's explanation."""
        named = (("training", self.training), ("hold-out evaluation", self.evaluation), ("generation", self.generation))
        return ", ".join(f"{name} {value / GiB:.1f}" for name, value in named if value)


def lora_parameters(shape: ModelShape, r: int, targets: list[str]) -> int:
    shapes = shape.linear_shapes()
    # Names we do not know are counted as hidden x hidden: close for the attention projections
    # that custom architectures rename.
    chosen = list(shapes.values()) if targets == ["all-linear"] else [
        shapes.get(t, (shape.hidden, shape.hidden)) for t in targets]
    return shape.layers * sum(r * (a + b) for a, b in chosen)


def _activation_bytes_per_token_layer(shape: ModelShape, lora_targets: list[str], fused: bool) -> int:
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    # Residuals and norm outputs, q/k/v and attention output, MLP gate/up (and their product unless
    # fused SwiGLU recomputes it in backward).
    saved = 8 * h + 2 * kv + (2 if fused else 4) * i
    shapes = shape.linear_shapes()
    names = list(shapes) if lora_targets == ["all-linear"] else lora_targets
    saved += sum(shapes.get(t, (h, h))[0] for t in names)  # dropout output kept for each adapter's backward
    if "down_proj" in names:
        saved += i // 2  # an adapter on down_proj keeps the SwiGLU product alive longer (measured: half of it)
    return BF16 * saved + (0 if fused else 4 * 2 * h)  # unfused RMSNorm keeps fp32 inputs


def _weight_bytes(shape: ModelShape, quantized: bool, shards: int) -> float:
    """The frozen base on one GPU. Sharded (FSDP), each GPU keeps 1/shards of the decoder layers'
    weights plus the layers being gathered; the 4-bit scales live outside the parameters FSDP
    shards (bitsandbytes keeps them beside the weight), and the root unit (embeddings, LM head)
    stays gathered from forward to the end of backward."""
    code = NF4_CODE_BYTES if quantized else BF16
    scales = NF4_SCALE_BYTES if quantized else 0
    linear = shape.linear_params * (code / shards + scales)
    if shards > 1:
        linear += min(GATHERED_LAYERS, shape.layers) * shape.linear_params / shape.layers * code
    return linear + shape.embedding_params * BF16


def _phase(resident: float, working: float) -> float:
    return (resident + working) * FRAGMENTATION + RUNTIME_OVERHEAD_BYTES


def _evaluation_bytes(shape: ModelShape, per_token_layer: int, tokens: int) -> float:
    """The hold-out loss's forward (no gradients): one layer's working set, the last hidden states
    with the copy the fused head scores, and its tile."""
    tile = min(tokens, LOGPROB_TILE[0]) * min(shape.vocab, LOGPROB_TILE[1]) * BF16
    return tokens * (per_token_layer + 2 * BF16 * shape.hidden + LOGPROB_STAT_BYTES_PER_TOKEN) + tile


def _generation_bytes(shape: ModelShape, per_token_layer: int, batch: int, prompt: int, new_tokens: int) -> float:
    """Greedy generation: the KV cache of the batch at prompt plus new tokens, and the prompt's
    forward (one layer's working set; logits of the last position only, with their fp32 copies)."""
    kv_cache = 2 * shape.layers * shape.kv_dim * BF16 * batch * (prompt + new_tokens)
    return kv_cache + per_token_layer * batch * prompt + batch * shape.vocab * (BF16 + 2 * 4)


def estimate_memory(shape: ModelShape, *, quantized: bool, lora_r: int, lora_targets: list[str],
                    micro_batch: int, seq_len: int, checkpointing: bool, fused_kernels: bool,
                    checkpointed_layers: int | None = None, shards: int = 1, preference: bool = False,
                    generation_tokens: int = 0) -> MemoryEstimate:
    """checkpointed_layers: with checkpointing, how many decoder layers (the first ones) recompute
    their activations in backward; None: all of them.
    shards: the GPUs that share the base weights and the LoRA state (FSDP); 1 replicates them (DDP).
    preference: DPO, where micro_batch counts pairs (two sequences each) and a reference forward runs.
    The hold-out loss (SFT) runs at micro_batch rows of seq_len (hold-out examples are truncated to
    it); generation_tokens: new tokens per prompt for exact match, generated micro_batch prompts at
    a time (0: no generation)."""
    weights = _weight_bytes(shape, quantized, shards)
    trainable = lora_parameters(shape, lora_r, lora_targets) * TRAINABLE_BYTES_PER_PARAM / shards
    tokens = micro_batch * seq_len * (2 if preference else 1)
    layer_bytes = _activation_bytes_per_token_layer(shape, lora_targets, fused_kernels)
    per_layer = layer_bytes * tokens
    checkpointed = (shape.layers if checkpointed_layers is None else checkpointed_layers) if checkpointing else 0
    # The layers left whole are the last ones: backward frees them before it recomputes the first
    # checkpointed layer, so that recomputation's working set adds to the peak only when every layer
    # is checkpointed.
    activations = checkpointed * BF16 * shape.hidden * tokens + max(shape.layers - checkpointed, 1) * per_layer
    logits: float
    if fused_kernels:
        logits = tokens * shape.hidden * FUSED_LOGIT_BYTES_PER_TOKEN_HIDDEN
    else:
        logits = tokens * shape.vocab * LOGIT_BYTES_PER_ENTRY
    if preference:
        # The reference forward: one layer's working set, and logits without their gradients.
        activations += per_layer
        logits *= 1.5
    resident = weights + trainable  # the optimizer's state stays between steps, through every evaluation
    evaluation = 0.0 if preference else _phase(resident, _evaluation_bytes(shape, layer_bytes, micro_batch * seq_len))
    generation = _phase(resident, _generation_bytes(shape, layer_bytes, micro_batch, seq_len, generation_tokens)) \
        if generation_tokens else 0.0
    return MemoryEstimate(weights, trainable, activations, logits, _phase(resident, activations + logits),
                          evaluation, generation)
