"""Attention over packed rows on GPU: PyTorch's variable-length flash attention.

transformers' own answer for packed rows on sdpa is a block-diagonal mask, which takes sdpa off
its flash kernel (and computes the masked-out blocks anyway); its flash path needs the
flash-attn package, which an air-gapped image may not carry. PyTorch ships a variable-length
flash kernel (torch.nn.attention.varlen): each example attends only to itself, from the
cumulative lengths the collator computes once per batch (no GPU-to-CPU sync in the model).

Registered as an attention implementation of its own, with sdpa's mask function: calls without
cumulative lengths (evaluation, generation with a KV cache or padding) run sdpa unchanged.
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "kubetune_varlen"


def _kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


_VARLEN = _kernel()
# The keyword API moved between torch releases: causality by window or by flag, GQA in the kernel or not.
_PARAMS = set(inspect.signature(_VARLEN).parameters) if _VARLEN else set()


def available() -> bool:
    return _VARLEN is not None and torch.cuda.is_available()


def _varlen(q, k, v, cu_seq_lens, max_length, scale):
    kwargs = {"scale": scale}
    if "window_size" in _PARAMS:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in _PARAMS:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _VARLEN(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim) -> (batch, seq, heads, dim)."""
    if cu_seq_lens_q is None or dropout or not query.is_cuda:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    batch, heads, seq, dim = query.shape
    # The flash kernel takes bf16/fp16 only; norms kept in fp32 can hand it fp32 queries.
    dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16

    def flat(t):
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim).to(dtype)

    out = _varlen(flat(query), flat(key), flat(value), cu_seq_lens_q, max_length_q, scaling)
    return out.view(batch, seq, heads, dim).to(query.dtype), None


def register() -> str:
    AttentionInterface.register(NAME, varlen_attention)
    # A fresh instance's lookup is the class-wide mapping's, typed (the mapping itself mypy types as `function`).
    AttentionMaskInterface.register(NAME, AttentionMaskInterface()["sdpa"])
    return NAME

