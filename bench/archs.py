"""Model architectures for benchmarks: random-initialised weights of real shapes (no hub on the GPU
machine; throughput and memory do not depend on the weight values)."""

from __future__ import annotations

import os
import subprocess
import sys

ARCHS = {
    # name: (model_type, hidden, layers, heads, kv_heads, intermediate, vocab)
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936),
    "qwen2.5-1.5b": ("qwen2", 1536, 28, 12, 2, 8960, 151936),
    "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 18944, 152064),
}


def build_model_dir(arch: str, root: str = "/tmp/bench-models") -> str:
    """The random-init model directory, built once, in a process of its own: a benchmark that built
    the 7B on its GPU itself kept ~15 GiB of it (and once ran out of memory on a plan that fits)."""
    path = os.path.join(root, arch)
    if not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, __file__, arch, path], check=True)
    return path


def _build(arch: str, path: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    mt, h, layers, nh, kv, inter, vocab = ARCHS[arch]
    cfg = AutoConfig.for_model(mt, hidden_size=h, num_hidden_layers=layers, num_attention_heads=nh,
                               num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                               max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)


def flops_per_token(arch: str) -> float:
    """LoRA training: forward 2N + input-gradient backward 2N per token, plus the LM head (2 x 3)."""
    _, h, layers, nh, kv, inter, vocab = ARCHS[arch]
    n_nonemb = layers * (h * h * 2 + 2 * h * (h // nh) * kv + 3 * h * inter)
    return 4 * n_nonemb + 6 * h * vocab


if __name__ == "__main__":
    _build(sys.argv[1], sys.argv[2])
