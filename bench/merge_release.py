"""Issue #25 item 3: the time from a run's last optimizer step to its GPUs being released, with the
merge in the training pod (before) and in the LoraAdapter's merge Job (now).

After its last step the training pod evaluates the hold-out and saves the adapter in both cases.
What differed is the rest: with output.merge (the default) the pod then merged the adapter into a
full-precision copy of the base on its CPU, and its publication hashed and copied the merged files
too, all while it held its GPUs. Now it publishes the adapter alone and exits; the merge Job does the
merge in a pod of its own (CPU unless merge.gpus).

Measured on a random-init model of the named shape (bench/archs.py) with an r16 all-linear adapter
(random B, as bench/gguf_export.py makes it), publishing to a local folder (a pvc:// output: the
copy is a lower bound for an upload to S3):
- before: merge_adapter at bf16 (what the pod ran for a GPU run), then the publication of adapter/
  and merged/ (sha256 of every file for the manifest, copy, manifest last);
- now: the publication of adapter/ alone;
- the merge Job's work for the same merge, off the GPUs: merge_adapter and the merged manifest's
  publication.

Usage: python bench/merge_release.py --arch qwen2.5-7b --tokenizer build/devtok --out X.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from archs import build_model_dir
from gguf_export import _adapter


def _publish(src: Path, dest: Path) -> float:
    """Seconds to publish src to dest as the trainer does: describe (sha256), copy, manifest last."""
    from kubetune.storage.location import LocalLocation
    from kubetune.storage.manifest import Manifest, describe_dir, publish

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    started = time.monotonic()
    publish(LocalLocation(dest), Manifest("RunManifest", describe_dir(src), {}), src)
    return round(time.monotonic() - started, 1)


def main(arch: str, tokenizer: Path, out: Path | None) -> None:
    import torch

    from kubetune_trainer.modeling import merge_adapter

    model_dir = Path(build_model_dir(arch))
    for f in tokenizer.iterdir():
        shutil.copy(f, model_dir / f.name)
    work = Path("/tmp/merge-release")
    shutil.rmtree(work, ignore_errors=True)
    final = work / "final"
    _adapter(str(model_dir), final / "adapter")
    torch.cuda.empty_cache()
    result: dict = {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "model_safetensors_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        "adapter_bytes": sum(f.stat().st_size for f in (final / "adapter").rglob("*") if f.is_file()),
    }
    now = _publish(final, work / "published-now")
    started = time.monotonic()
    merge_adapter(model_dir, final / "adapter", final / "merged", torch.bfloat16)
    merge_s = round(time.monotonic() - started, 1)
    before_publish = _publish(final, work / "published-before")
    shutil.rmtree(work / "published-before")  # the GPU machine's disk holds three copies of a 7B, not four
    merge_job_publish = _publish(final / "merged", work / "published-merge-job")
    result["seconds"] = {
        "before: merge in the training pod": merge_s,
        "before: publication of adapter/ and merged/": before_publish,
        "before: last step -> GPUs released, after the adapter is saved": round(merge_s + before_publish, 1),
        "now: publication of adapter/ alone = last step -> GPUs released, after the adapter is saved": now,
        "merge Job, off the GPUs: merge + publication of merged/": round(merge_s + merge_job_publish, 1),
    }
    result["merged_bytes"] = sum(f.stat().st_size for f in (final / "merged").rglob("*") if f.is_file())
    text = json.dumps(result, indent=1)
    if out:
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    main(a.arch, a.tokenizer, a.out)
