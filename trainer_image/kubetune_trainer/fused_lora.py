"""A fused forward and backward for peft's LoRA layers (on nn.Linear and bitsandbytes' 4-bit Linear).

peft computes `base(x).clone() + lora_B(lora_A(x)) * scaling`: the clone, the scale and the add
each read and write a tensor of the layer's full output size, and autograd adds the base's and
the adapter's input gradients in another pass of the input's size. On a 7B QLoRA step those
passes, not the rank-16 arithmetic, are most of the adapters' cost. Here the adapter's product is
accumulated into the base output in place (one addmm), and its input gradient into the base's
(another), with the same matmuls peft runs, in the same dtype. LoRA dropout draws its mask with
the kernel nn.Dropout uses, in the same order, so a seeded run draws the masks peft's would.

Used only where it computes what peft computes: one plain LoRA adapter (no DoRA or other
variant), a frozen base, inputs in the compute dtype. Any other call goes to peft's own forward.
KUBETUNE_FUSED_LORA=0 turns it off (for debugging, or to measure it).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV_SWITCH = "KUBETUNE_FUSED_LORA"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


class _Base:
    """The frozen base layer's product and input gradient: dense, or 4-bit through bitsandbytes."""

    def __init__(self, layer: Any, dtype: torch.dtype, quantized: bool):
        self.layer, self.dtype, self.quantized = layer, dtype, quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.layer.bias is None else self.layer.bias.to(self.dtype)
        if self.quantized:
            import bitsandbytes as bnb

            return bnb.matmul_4bit(x, self.layer.weight, bias=bias, quant_state=self.layer.weight.quant_state)
        return nn.functional.linear(x, self.layer.weight.to(self.dtype), bias)

    def grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            import bitsandbytes.functional as bnbf

            return grad @ bnbf.dequantize_4bit(self.layer.weight, self.layer.weight.quant_state).to(grad.dtype)
        return grad @ self.layer.weight.to(grad.dtype)


class _FusedLora(torch.autograd.Function):
    """out = base(x) + scaling * (dropout(x) @ A^T) @ B^T, for x of shape (tokens, in)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout: float, base: _Base) -> torch.Tensor:
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        out = base.forward(x)
        dropped, mask = torch.native_dropout(x, dropout, True) if dropout else (x, None)
        xa = dropped @ a.t()
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(dropped, mask, xa, lora_a, lora_b)
        ctx.scaling, ctx.dropout, ctx.base = scaling, dropout, base
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        dropped, mask, xa, lora_a, lora_b = ctx.saved_tensors
        grad = grad.contiguous()
        a, b = lora_a.to(grad.dtype), lora_b.to(grad.dtype)
        grad_xa = grad @ b  # d(out)/d(xa) without the scaling, which the users below apply once each
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.base.grad_input(grad)
            if mask is None:
                grad_x.addmm_(grad_xa, a, alpha=ctx.scaling)
            else:  # nn.Dropout's backward, in place on the one temporary
                grad_x.add_((grad_xa @ a).mul_(mask), alpha=ctx.scaling / (1 - ctx.dropout))
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad_xa.t(), dropped).mul_(ctx.scaling).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.mm(grad.t(), xa).mul_(ctx.scaling).to(lora_b.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# The layers are typed Any: peft's LoRA attributes (lora_A, scaling, ...) and bitsandbytes' weight
# state are set at run time, which nn.Module's typing reads as Tensor | Module.
def _plain_adapter(module: Any) -> tuple[str, float] | None:
    """The one active adapter and its dropout probability now (0 in eval mode) when the fused path
    computes exactly what peft would, else None."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    name = module.active_adapters[0]
    if name not in module.lora_A or name in module.lora_variant:
        return None
    dropout = module.lora_dropout[name]
    if isinstance(dropout, nn.Identity):
        return name, 0.0
    if type(dropout) is nn.Dropout:
        return name, dropout.p if dropout.training else 0.0
    return None


def _forward(module: Any, peft_forward, quantized: bool, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _plain_adapter(module)
    base = module.base_layer
    dtype = _compute_dtype(x)
    if (adapter is None or args or kwargs or x.dtype != dtype or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            # bitsandbytes would cast the input to its own compute dtype: peft's path does that
            or (quantized and base.compute_dtype not in (None, dtype))):
        return peft_forward(x, *args, **kwargs)
    name, dropout = adapter
    if module.lora_A[name].weight.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        return peft_forward(x, *args, **kwargs)  # peft then runs the adapter in its weights' dtype
    if quantized:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
    flat = x.reshape(-1, x.shape[-1])
    # Autocast off inside: _FusedLora casts explicitly, and autocast does not cover in-place addmm.
    with torch.autocast(x.device.type, enabled=False):
        out = _FusedLora.apply(flat, module.lora_A[name].weight, module.lora_B[name].weight,
                               float(module.scaling[name]), dropout, _Base(base, dtype, quantized))
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_layers(model: nn.Module) -> int:
    """Routes the forward of each of peft's LoRA Linear layers (dense or 4-bit) through the fused
    path; returns how many. The adapter's weights and state dict are peft's, untouched."""
    from peft.tuners.lora import Linear

    quantized_kind: type | None
    try:
        from peft.tuners.lora.bnb import Linear4bit as quantized_kind
    except ImportError:  # bitsandbytes is not installed (a CPU-only environment)
        quantized_kind = None
    fused = 0
    for module in model.modules():
        quantized = quantized_kind is not None and type(module) is quantized_kind
        if (type(module) is Linear or quantized) and isinstance(getattr(module, "base_layer", None), nn.Linear):
            module.forward = functools.partial(_forward, module, module.forward, quantized)
            fused += 1
    if fused:
        log.info("fused LoRA forward and backward in %d layers (%s=0 turns it off)", fused, ENV_SWITCH)
    return fused


def fused_layer_count(model: nn.Module) -> int:
    """How many of the model's layers fuse_lora_layers routed through the fused path."""
    return sum(getattr(m.__dict__.get("forward"), "func", None) is _forward for m in model.modules())
