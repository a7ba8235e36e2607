"""GGUF export of a 7B-shaped model and its adapter: time, size and the exporting process's peak
memory (issue #21: the tensors are streamed, so the export must not hold the model twice).

A random-init model of the named shape (bench/archs.py) is built once, with the given tokenizer's
files beside it; an r16 LoRA adapter on every linear layer (random B, so it is not a no-op) is made
by peft; then kubetune_trainer.gguf_export.export_folder writes ARTIFACT/gguf/ in a process of its
own, whose anonymous and file-backed resident memory are sampled while it runs.

Usage: python bench/gguf_export.py --arch qwen2.5-7b --tokenizer build/devtok --types f16 q8_0 --out X.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from archs import build_model_dir


def _adapter(model_dir: str, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def _export(model_dir: str, adapter_dir: Path, out_dir: Path, types: list[str]) -> dict:
    """export_folder in a child process, its memory sampled every 0.2 s: anonymous memory (what the
    export holds) apart from file pages (the safetensors it reads through mmap, which the kernel
    may drop at any time)."""
    code = ("import json,sys; from pathlib import Path; from kubetune_trainer.gguf_export import export_folder;"
            "a=sys.argv[1:]; print(json.dumps(export_folder(Path(a[0]), Path(a[1]), Path(a[2]), a[3:], 'bench')))")
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", code, model_dir, str(adapter_dir), str(out_dir), *types],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        try:
            peak = {k: max(v, _rss_kib(child.pid).get(k, 0)) for k, v in peak.items()}
        except FileNotFoundError:
            break
        time.sleep(0.2)
    stdout, stderr = child.communicate()
    if child.returncode:
        raise SystemExit(f"export failed:\n{stderr}")
    return {"wall_s": round(time.monotonic() - started, 1),
            "peak_rss_anon_gib": round(peak["RssAnon"] / 2**20, 2),
            "peak_rss_file_gib": round(peak["RssFile"] / 2**20, 2),
            "export": json.loads(stdout.strip().splitlines()[-1])}


def main(arch: str, tokenizer: Path, types: list[str], out: Path | None) -> None:
    import torch

    model_dir = build_model_dir(arch)
    for f in tokenizer.iterdir():
        shutil.copy(f, Path(model_dir) / f.name)
    work = Path("/tmp/gguf-bench")
    shutil.rmtree(work, ignore_errors=True)
    _adapter(model_dir, work / "adapter")
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    result: dict = {
        "what": f"GGUF export of a random-init {arch}-shaped model (bf16 safetensors, {weights / 2**30:.2f} GiB) "
                "and an r16 all-linear LoRA adapter, with the given tokenizer's vocabulary padded to the shape's; "
                "one export process per type (each also writes the adapter and the Modelfile)",
        "command": " ".join(["python", *sys.argv]),
        "machine": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "model_safetensors_bytes": weights, "types": {},
    }
    for type_name in types:  # one at a time: a run cut by its time limit still reports the first
        result["types"][type_name] = _export(model_dir, work / "adapter", work / "gguf", [type_name])
        result["files"] = {f.name: f.stat().st_size for f in sorted((work / "gguf").iterdir())}
        if out:
            out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    main(a.arch, a.tokenizer, a.types, a.out)
