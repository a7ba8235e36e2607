"""Building run specs for trainer tests (a volume with the model and the invoice data), and
running the trainer (and the merge Job) on one as their pods would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kubetune.contract import MERGED_DIR
from kubetune_trainer.samples import invoice_records, write_jsonl


def make_volume(root: Path, model_dir: Path, records: int = 120, seed: int = 0) -> Path:
    volumes = root / "volumes"
    (volumes / "models").mkdir(parents=True, exist_ok=True)
    link = volumes / "models" / "smollm2"
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    write_jsonl(volumes / "data" / "invoices.jsonl", invoice_records(records, seed))
    return volumes


def run_spec(root: Path, volumes: Path, *, output_uri: str = "pvc://runs/job", dataset_uri: str =
             "pvc://data/invoices.jsonl", storage: bool = False, **overrides) -> dict:
    spec = {
        "baseModel": {"uri": "pvc://models/smollm2"},
        "dataset": {"uri": dataset_uri, "validationSplit": 0.15},
        "method": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"maxSteps": 30, "learningRate": 0.002, "maxSeqLength": 128, "batchSize": 2,
                     "warmupRatio": 0.0},
        "resources": {"gpus": 0},
        "output": {"uri": output_uri, "merge": False},
        "checkpointEverySteps": 100,
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    if storage:
        spec["storage"] = {"secretRef": {"name": "minio"}}
    return {"spec": spec, "run": {"output_uri": output_uri, "volume_root": str(volumes),
                                  "work_dir": str(root / "work"), "cache_dir": str(root / "cache"),
                                  "progress_file": str(root / "progress.json"), "progress_interval_s": 0.5}}


def write_spec(path: Path, body: dict) -> Path:
    path.write_text(json.dumps(body))
    return path


def run_trainer(spec_path: Path, log: Path, **env: str) -> int:
    """The trainer's exit code for a spec, through its entry point; its output goes to log."""
    command = [sys.executable, "-m", "kubetune_trainer.main", "--spec", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, timeout=900).returncode


def merge_run(root: Path, volumes: Path, run_uri: str = "pvc://runs/job", **spec) -> Path:
    """What the run's LoraAdapter's merge Job does with it (`kubetune-trainer merge-job`, in a process
    as in its pod); returns the merged model's folder, ARTIFACT/merged/."""
    path = write_spec(root / "merge.json", {"baseModel": {"uri": "pvc://models/smollm2"}, "artifactUri": run_uri,
                                            **spec})
    command = [sys.executable, "-m", "kubetune_trainer.main", "merge-job", "--spec", str(path)]
    env = {**os.environ, "KUBETUNE_VOLUME_ROOT": str(volumes), "KUBETUNE_WORK_DIR": str(root / "merge-work"),
           "KUBETUNE_CACHE_DIR": str(root / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return volumes / run_uri.removeprefix("pvc://") / MERGED_DIR
