"""Run examples/local/finetunejob.yaml with the trainer on this machine (no cluster, no GPU).

Prepares a local volume (the SmolLM2 model converted once and cached, the sample dataset), runs
the same recipe the trainer pod runs, then prints the hold-out metrics before and after and the
published artifacts with sizes and sha256.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import yaml

from kubetune.api.validation import validate_object
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest, verify
from kubetune_trainer.gguf_import import import_gguf, smollm2_gguf
from kubetune_trainer.recipe import FineTuneRecipe
from kubetune_trainer.runspec import RunInfo, RunSpec
from kubetune_trainer.samples import invoice_records, write_jsonl

HERE = Path(__file__).resolve().parent
STATE = HERE.parents[1] / ".cache" / "local"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    resource, problems = validate_object(yaml.safe_load((HERE / "finetunejob.yaml").read_text()))
    if problems:
        for p in problems:
            print(f"{p.path}: {p.message}", file=sys.stderr)
        return 1
    volumes = STATE / "volumes"
    model = import_gguf(smollm2_gguf(), STATE / "models" / "smollm2")
    link = volumes / "models" / "smollm2"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    write_jsonl(volumes / "data" / "invoices.jsonl", invoice_records(120))
    output = resource.spec.output.uri
    runspec = RunSpec(spec=resource.spec, run=RunInfo(
        job_name=resource.metadata.name, output_uri=output, volume_root=str(volumes),
        work_dir=str(STATE / "work"), cache_dir=str(STATE / "cache"), progress_interval_s=2))
    result = FineTuneRecipe(runspec).run()
    location = LocalLocation(volumes / "runs" / resource.metadata.name)
    manifest = read_manifest(location)
    print("\nhold-out metrics (baseline -> after training):")
    for key in ("evalLoss", "perplexity", "exactMatch", "jsonValid"):
        print(f"  {key:11s} {result.metrics['baseline'].get(key)} -> {result.metrics['final'].get(key)}")
    print(f"\nartifacts in {output} (manifest sha256 {result.manifest_sha256}):")
    for entry in manifest.files:
        print(f"  {entry.size:>12,d}  {entry.sha256[:16]}…  {entry.path}")
    problems = verify(location, manifest)
    print("verified: every file matches its size and sha256" if not problems else f"NOT VERIFIED: {problems}")
    print(json.dumps({"train": result.metrics["train"]}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
