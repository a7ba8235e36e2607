"""One real QLoRA job through `kubetune-trainer` on a GPU: the invoice task, a random-initialised
model of a real architecture (the GPU machine has no hub), the full pipeline (evaluation,
checkpoints, adapter, bf16 merge, manifest). Prints the run manifest's metrics as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from archs import build_model_dir  # noqa: E402

from kubetune_trainer.samples import invoice_records, write_jsonl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2.5-0.5b")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--root", default="/tmp/qlora-job")
    a = ap.parse_args()
    root = Path(a.root)
    shutil.rmtree(root, ignore_errors=True)
    model = Path(build_model_dir(a.arch))
    for f in Path(a.tokenizer).iterdir():
        shutil.copy(f, model / f.name)
    volumes = root / "volumes"
    (volumes / "models").mkdir(parents=True)
    (volumes / "models" / "base").symlink_to(model)
    write_jsonl(volumes / "data" / "invoices.jsonl", invoice_records(2000))
    spec = {
        "baseModel": {"uri": "pvc://models/base"},
        "dataset": {"uri": "pvc://data/invoices.jsonl", "validationSplit": 0.02},
        "method": "qlora", "lora": {"r": 16, "alpha": 32, "targetModules": ["all-linear"]},
        "training": {"maxSteps": a.steps, "learningRate": 0.001, "maxSeqLength": 512, "batchSize": 8},
        "evaluation": {"exactMatch": True, "maxSamples": 32, "maxNewTokens": 48},
        "resources": {"gpus": 1}, "output": {"uri": "pvc://runs/job", "merge": True}, "checkpointEverySteps": 50,
    }
    body = {"spec": spec, "run": {"output_uri": "pvc://runs/job", "volume_root": str(volumes),
                                  "work_dir": str(root / "work"), "cache_dir": str(root / "cache")}}
    (root / "spec.json").write_text(json.dumps(body))
    code = subprocess.call([sys.executable, "-m", "kubetune_trainer.main", "--spec", str(root / "spec.json")])
    manifest = json.loads((volumes / "runs" / "job" / "manifest.json").read_text())
    print(json.dumps({"exit": code, "arch": a.arch, "metrics": manifest["metrics"],
                      "files": len(manifest["files"]),
                      "merged_bytes": sum(f["size"] for f in manifest["files"] if f["path"].startswith("merged/"))}))


if __name__ == "__main__":
    main()
