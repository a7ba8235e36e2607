"""Writing a run's models as GGUF for llama.cpp and Ollama: the merged model in each requested type
and the adapter as a GGUF LoRA (llama.cpp's `--lora`, Ollama's ADAPTER).

Written with gguf-py: its tensor-name maps give the llama.cpp names, its quantizers the q8_0 blocks,
its SpecialVocab the merges, special token ids and chat template. gguf-py cannot quantize the k-quants
(q4_k_m) in Python, so those are made from the f16 file by llama.cpp's own quantizer, through
llama-cpp-python's binding of `llama_model_quantize` (the package is needed only for them).
Tensors are read from the safetensors files one at a time and written as they are converted, so the
model is never held twice in memory: the tensor index is written first from the files' headers.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

# Our names for the types a spec may ask for, and the GGUF tensor and file types they stand for.
FILE_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


# k-quants, made from an f16 file by llama.cpp: its quantizer picks each tensor's block type (and
# falls back where a row is not a multiple of 256 values, as in SmolLM2's 576-wide layers).
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


class GGUFExportError(Exception):
    pass


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    arch: gguf.MODEL_ARCH
    # llama.cpp's Llama graph applies RoPE to interleaved pairs of a head's q/k rows, transformers to
    # its two halves: the rows of q and k are reordered on the way out (Qwen2's graph uses halves too).
    interleaved_rope: bool


ARCHITECTURES = {a.hf_name: a for a in (
    Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
    Architecture("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
    Architecture("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, False),
)}


def architecture(config: dict[str, Any]) -> Architecture:
    names = config.get("architectures") or [config.get("model_type", "unknown")]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise GGUFExportError(f"architecture {', '.join(names)} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")


def _arch_name(arch: gguf.MODEL_ARCH) -> str:
    return gguf.MODEL_ARCH_NAMES[arch]


# llama.cpp splits text before BPE with a regex chosen by tokenizer.ggml.pre. These are the
# pre-tokenizers of tokenizer.json that match one of llama.cpp's exactly; the digit rule tells
# Llama 3 (up to three digits a piece) from Qwen2 (one digit a piece).
_LLAMA3_DIGITS, _QWEN2_DIGITS = r"\p{N}{1,3}|", r"\p{N}|"


def tokenizer_pre(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre_tokenizer section."""
    section = pre or {}
    steps: list[dict[str, Any]] = section.get("pretokenizers", []) if section.get("type") == "Sequence" else [section]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex", "")
        if _LLAMA3_DIGITS in regex:
            return "llama-bpe"
        if _QWEN2_DIGITS in regex:
            return "qwen2"
    raise GGUFExportError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:300]} matches none of llama.cpp's "
                          "(supported: GPT-2 byte-level, SmolLM, Llama 3, Qwen2; SentencePiece-style Llama/Mistral)")


def _bpe_tokens(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[gguf.TokenType]]:
    """Every id up to the model's vocab size: special added tokens are CONTROL (llama.cpp stops on
    them and parses them only as specials), other added tokens USER_DEFINED, unused ids padding."""
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    by_id |= {i: a["content"] for i, a in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _write_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json (a fast tokenizer is needed for GGUF)")
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):  # SentencePiece-style: Llama 2, Mistral
        vocab = gguf.LlamaHfVocab(model_dir)
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
    elif model.get("type") == "BPE":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre(tokenizer.get("pre_tokenizer")))
        names, kinds = _bpe_tokens(tokenizer, vocab_size)
        writer.add_token_list(names)
        writer.add_token_types(kinds)
    else:
        raise GGUFExportError(f"tokenizer model {model.get('type')!r} is not supported (supported: BPE)")
    gguf.SpecialVocab(model_dir, load_merges=model.get("type") == "BPE" and not model.get("byte_fallback"),
                      n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise GGUFExportError(f"rope scaling {rope_type!r} is not supported (supported: default)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or a LoRA B's rows) from transformers' half-split RoPE order to llama.cpp's pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _fix_rope_rows(arch: Architecture, config: dict[str, Any], name: str, tensor: torch.Tensor) -> torch.Tensor:
    if not arch.interleaved_rope:
        return tensor
    if name.endswith("self_attn.q_proj.weight"):
        return interleave_rope_rows(tensor, config["num_attention_heads"])
    if name.endswith("self_attn.k_proj.weight"):
        return interleave_rope_rows(tensor, config.get("num_key_value_heads") or config["num_attention_heads"])
    return tensor


def tensor_type(shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms and biases stay f32 (llama.cpp reads them so); a matrix whose rows do not split into
    whole quantization blocks is written f16."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no safetensors weights")
    return files


@dataclass(frozen=True)
class _Planned:
    source: str  # the name in the safetensors file
    name: str  # the GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def _write_streamed(writer: gguf.GGUFWriter, planned: list[_Planned],
                    read: Iterator[tuple[_Planned, torch.Tensor]]) -> None:
    """The index from the plan first, then each tensor's data as it is read and converted."""
    for p in planned:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p, tensor in read:
        writer.write_tensor_data(gguf.quants.quantize(tensor.to(torch.float32).numpy(), p.qtype))
    writer.close()


def _llama_cpp(type_name: str) -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise GGUFExportError(f"GGUF type {type_name} is made by llama.cpp's quantizer (the llama-cpp-python "
                              "package), which this trainer environment lacks; ask for f16 or q8_0") from exc
    return llama_cpp


def quantize(f16: Path, out: Path, type_name: str) -> Path:
    """An f16 GGUF file as the k-quant type_name, by llama.cpp."""
    llama_cpp = _llama_cpp(type_name)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[type_name])
    params.nthread = os.cpu_count() or 1
    tmp = out.with_name(out.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise GGUFExportError(f"llama.cpp could not quantize {f16.name} to {type_name}")
    tmp.rename(out)
    return out


def export_model(model_dir: Path, out: Path, type_name: str) -> Path:
    """The model in model_dir (transformers layout, safetensors) as one GGUF file of type type_name
    (f16 or q8_0; the k-quants go through quantize)."""
    if type_name not in FILE_TYPES:
        raise GGUFExportError(f"GGUF type {type_name!r} is not supported (supported: {', '.join(FILE_TYPES)})")
    wanted, file_type = FILE_TYPES[type_name]
    config = json.loads((model_dir / "config.json").read_text())
    arch = architecture(config)
    names = gguf.get_tensor_name_map(arch.arch, config["num_hidden_layers"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, _arch_name(arch.arch))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, config)
    _write_vocab(writer, model_dir, config["vocab_size"])
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(f, framework="pt")) for f in _safetensors_files(model_dir)]
        planned, where = [], {}
        for f in files:
            for key in f.keys():
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"tensor {key} has no llama.cpp name for {arch.hf_name}")
                shape = tuple(f.get_slice(key).get_shape())
                planned.append(_Planned(key, name, shape, tensor_type(shape, wanted)))
                where[key] = f
        _write_streamed(writer, planned, ((p, _fix_rope_rows(arch, config, p.source, where[p.source].get_tensor(
            p.source))) for p in planned))
    tmp.rename(out)
    return out


_PEFT_PREFIX = "base_model.model."


def export_lora(adapter_dir: Path, base_config: dict[str, Any], out: Path) -> Path:
    """A PEFT LoRA adapter as a GGUF LoRA for llama.cpp (`--lora`) and Ollama (ADAPTER), kept f32
    (it is small, and its products are added to the base's weights at run time)."""
    arch = architecture(base_config)
    peft = json.loads((adapter_dir / "adapter_config.json").read_text())
    if peft.get("peft_type", "LORA") != "LORA":
        raise GGUFExportError(f"adapter type {peft.get('peft_type')} is not supported (supported: LORA)")
    if peft.get("modules_to_save"):
        raise GGUFExportError(f"modules_to_save {peft['modules_to_save']} cannot be written as a GGUF LoRA")
    if peft.get("rank_pattern") or peft.get("alpha_pattern") or peft.get("use_dora"):
        raise GGUFExportError("per-module ranks or alphas and DoRA cannot be written as a GGUF LoRA")
    rank = peft["r"]
    # llama.cpp scales by alpha / rank; rsLoRA scales by alpha / sqrt(rank), the same with this alpha.
    alpha = float(peft["lora_alpha"]) * (rank ** 0.5 if peft.get("use_rslora") else 1.0)
    names = gguf.get_tensor_name_map(arch.arch, base_config["num_hidden_layers"])
    heads = {"q_proj": base_config["num_attention_heads"],
             "k_proj": base_config.get("num_key_value_heads") or base_config["num_attention_heads"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, _arch_name(arch.arch))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    f32 = gguf.GGMLQuantizationType.F32
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        planned = []
        for key in sorted(f.keys()):
            module, _, part = key.removeprefix(_PEFT_PREFIX).rpartition(".lora_")
            if part not in ("A.weight", "B.weight"):
                raise GGUFExportError(f"adapter tensor {key} is not a LoRA A or B matrix")
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if name is None:
                raise GGUFExportError(f"adapter module {module} has no llama.cpp name for {arch.hf_name}")
            suffix = ".lora_a" if part == "A.weight" else ".lora_b"
            planned.append(_Planned(key, name + suffix, tuple(f.get_slice(key).get_shape()), f32))

        def tensors() -> Iterator[tuple[_Planned, torch.Tensor]]:
            for p in planned:
                tensor = f.get_tensor(p.source)
                projection = p.source.removesuffix(".lora_B.weight").rpartition(".")[2]
                # The rows B writes are q's or k's rows: they get the model's reordering; A's are not.
                if arch.interleaved_rope and p.name.endswith(".lora_b") and projection in heads:
                    tensor = interleave_rope_rows(tensor, heads[projection])
                yield p, tensor
        _write_streamed(writer, planned, tensors())
    tmp.rename(out)
    return out


MODELFILE = "Modelfile"


def export_folder(merged_dir: Path, adapter_dir: Path, out_dir: Path, types: list[str], name: str) -> dict[str, Any]:
    """ARTIFACT/gguf/: the merged model in each type, the adapter as a GGUF LoRA and a Modelfile.
    Returns what the run's manifest records: the files by role, the seconds each took, and the
    command that makes an Ollama model called name from a copy of the folder."""
    from kubetune_trainer.modelfile import classify, modelfile, read_chat_template

    config = json.loads((merged_dir / "config.json").read_text())
    architecture(config)  # before any file is written
    for type_name in types:
        if type_name in K_QUANTS:
            _llama_cpp(type_name)
        elif type_name not in FILE_TYPES:
            raise GGUFExportError(f"GGUF type {type_name!r} is not supported "
                                  f"(supported: {', '.join([*FILE_TYPES, *K_QUANTS])})")
    out_dir.mkdir(parents=True, exist_ok=True)
    models: dict[str, str] = {}
    seconds: dict[str, float] = {}
    # gguf-py's types first: a k-quant is made from the f16 file, written for it alone when not asked for.
    for type_name in sorted(types, key=lambda t: t in K_QUANTS):
        started, out = time.monotonic(), out_dir / f"model-{type_name}.gguf"
        if type_name in K_QUANTS and "f16" in models:
            quantize(out_dir / models["f16"], out, type_name)
        elif type_name in K_QUANTS:
            # Inside out_dir, so a failed export's clean-up (the caller removes out_dir) takes it too:
            # beside it, it would be published with the merged model.
            source = export_model(merged_dir, out_dir / "model-f16.gguf.source", "f16")
            try:
                quantize(source, out, type_name)
            finally:
                source.unlink()
        else:
            export_model(merged_dir, out, type_name)
        models[type_name] = out.name
        seconds[out.name] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    adapter = export_lora(adapter_dir, config, out_dir / "adapter-lora-f32.gguf").name
    seconds[adapter] = round(time.monotonic() - started, 1)
    tokenizer_config = merged_dir / "tokenizer_config.json"
    eos = json.loads(tokenizer_config.read_text()).get("eos_token") if tokenizer_config.is_file() else None
    text = modelfile(models[types[0]], classify(read_chat_template(merged_dir)),
                     eos if isinstance(eos, str) else None, adapter=adapter)
    (out_dir / MODELFILE).write_text(text)
    return {"models": models, "adapter": adapter, "modelfile": MODELFILE, "seconds": seconds,
            "ollama": f"ollama create {name} -f {MODELFILE}"}
