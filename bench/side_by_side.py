"""Every GPU measurement of the trainer in one run, on one GPU, with the baseline beside it.

Runs each case in its own process (a fresh CUDA context, so peaks do not leak between cases):
- the plain TRL SFTTrainer script as blog posts write it (bench/baseline/qlora_anchor.py, kept
  verbatim) and its tuned variant;
- the kubetune trainer (bench/trainer_bench.py, the planner choosing micro-batch and
  checkpointing) on Qwen2.5-7B and -1.5B shapes, attention-only and all-linear LoRA, and the
  memory-lean profile (resources.gpuMemoryGiB: 10) and 40 GiB, each also with every layer
  checkpointed (gradientCheckpointing: on);
- the loss-parity pair (bench/loss_parity.py).
Writes one JSON file: GPU, library versions, the command of each case and what it printed.

Usage (on the GPU machine): python bench/side_by_side.py --tokenizer DIR --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from archs import build_model_dir  # noqa: E402

BENCH = [sys.executable, str(HERE / "trainer_bench.py"), "--batch", "16", "--steps", "14", "--warmup", "4"]
ANCHOR = [sys.executable, str(HERE / "baseline" / "qlora_anchor.py"), "--steps", "14", "--warmup", "4"]
PARITY = [sys.executable, str(HERE / "loss_parity.py"), "--steps", "200"]

CASES = {
    "kubetune-7b-attn": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn"],
    "kubetune-7b-all-linear": BENCH + ["--arch", "qwen2.5-7b", "--targets", "all-linear"],
    "kubetune-7b-lean": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--gpu-memory-gib", "10"],
    # peft's own LoRA forward, for the fused path's before and after in the same run
    "unfused-7b-attn": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--fused-lora", "off"],
    "unfused-7b-all-linear": BENCH + ["--arch", "qwen2.5-7b", "--targets", "all-linear", "--fused-lora", "off"],
    "unfused-7b-lean": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--gpu-memory-gib", "10",
                                "--fused-lora", "off"],
    "unfused-1.5b-attn": BENCH + ["--arch", "qwen2.5-1.5b", "--targets", "attn", "--fused-lora", "off"],
    # Every decoder layer checkpointed (gradientCheckpointing: on), against the planner's choice of how
    # many: the selective checkpointing's before and after at the same memory
    "full-checkpointing-7b-lean": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--gpu-memory-gib", "10",
                                           "--checkpointing", "on"],
    # Four layers whole at the lean profile's micro-batch: what each layer kept costs and buys
    "sweep-7b-lean-24-layers": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--gpu-memory-gib", "10",
                                        "--checkpointed-layers", "24"],
    "kubetune-7b-40gib": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--gpu-memory-gib", "40"],
    "full-checkpointing-7b-40gib": BENCH + ["--arch", "qwen2.5-7b", "--targets", "attn", "--gpu-memory-gib", "40",
                                            "--checkpointing", "on"],
    "baseline-seed-7b": ANCHOR + ["--arch", "qwen2.5-7b", "--case", "seed"],
    "baseline-tuned-7b": ANCHOR + ["--arch", "qwen2.5-7b", "--case", "tuned"],
    "kubetune-1.5b-attn": BENCH + ["--arch", "qwen2.5-1.5b", "--targets", "attn"],
    "baseline-tuned-1.5b": ANCHOR + ["--arch", "qwen2.5-1.5b", "--case", "tuned"],
    "kubetune-1.5b-all-linear": BENCH + ["--arch", "qwen2.5-1.5b", "--targets", "all-linear"],
    "baseline-seed-1.5b": ANCHOR + ["--arch", "qwen2.5-1.5b", "--case", "seed"],
    "parity-baseline": PARITY + ["--case", "baseline"],
    "parity-kubetune": PARITY + ["--case", "kubetune"],
}


def _build_model_dirs() -> None:
    """Every random-init model directory the cases use, built before the first case runs; the
    anchor script's own copies of the same shapes point at ours."""
    for arch in ("qwen2.5-7b", "qwen2.5-1.5b", "qwen2.5-0.5b"):
        build_model_dir(arch)
    for arch in ("qwen2.5-7b", "qwen2.5-1.5b"):
        ours, theirs = Path("/tmp/bench-models") / arch, Path(f"/tmp/anchor-{arch}")
        if ours.exists() and not theirs.exists():
            theirs.symlink_to(ours, target_is_directory=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="a subset of the cases")
    a = ap.parse_args()
    import torch

    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
              "versions": {n: importlib.metadata.version(n) for n in (
                  "torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel")},
              "command": " ".join(sys.argv),
              "cases": {}}
    _build_model_dirs()
    for name in a.only or CASES:
        command = CASES[name] + ["--tokenizer", a.tokenizer]
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        entry = {"command": " ".join(Path(c).name if c.endswith(".py") else c for c in command[1:]),
                 "rc": proc.returncode, "wall_s": round(time.perf_counter() - started, 1)}
        if lines:
            entry["result"] = json.loads(lines[-1])
        else:
            entry["stderr_tail"] = proc.stderr[-3000:]
        result["cases"][name] = entry
        print(name, json.dumps(entry)[:400], flush=True)
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
