"""Liger's fused Triton kernels on GPU: RMSNorm, SwiGLU and RoPE. The LM head's loss is TRL's
chunked log-probabilities (its fused LM head, which SFTTrainer adds), which never materialise the
(tokens x vocabulary) logits either; Liger's own fused linear cross-entropy would replace the
model's forward under it, so it stays off."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _liger():
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError:
        return None
    return monkey_patch


def fused_kernels_available(model_type: str | None) -> bool:
    """Whether apply_fused_kernels will patch a model of this type here (a CUDA GPU and liger-kernel)."""
    liger = _liger() if torch.cuda.is_available() else None
    return liger is not None and model_type in liger.MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_fused_kernels(model) -> bool:
    model_type = getattr(model.config, "model_type", None)
    if not fused_kernels_available(model_type):
        if torch.cuda.is_available():
            log.warning("no fused kernels for model type %s (liger-kernel missing or no support)", model_type)
        return False
    _liger()._apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False)
    log.info("fused kernels (liger): rms_norm, swiglu, rope")
    return True
