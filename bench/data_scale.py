"""From a 1,000,000-row Alpaca-shaped JSONL to packed training rows on the CPU: time and peak RSS
(this process and its tokenizing workers), with the trainer's own prepare().

    python bench/data_scale.py --tokenizer DIR [--rows 1000000] [--out bench/results/FILE.json]

The rows are generated (seeded) with Alpaca's shape: an instruction, an input one time in three,
an output of a few dozen to a few hundred words.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

WORDS = ("the a of to and in is for on with as by at from that this it be are was invoice total customer model "
         "data train step loss token batch memory report error value field line record vendor amount date").split()


def write_alpaca(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(rows):
            record = {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(6, 30))),
                      "input": " ".join(rng.choices(WORDS, k=rng.randint(5, 60))) if rng.random() < 1 / 3 else "",
                      "output": " ".join(rng.choices(WORDS, k=rng.randint(20, 300)))}
            fh.write(json.dumps(record) + "\n")


def peak_rss_gib() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"process": round(own, 3), "largestWorker": round(workers, 3)}


class MemorySampler(threading.Thread):
    """Peaks of this process's memory by kind, sampled: ru_maxrss alone cannot tell the process's
    own (anonymous) memory from file pages of the memory-mapped Arrow files it has touched, which
    count in RSS while mapped but are page cache the kernel can drop."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.peaks = interval, {}

    def sample(self) -> None:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in self.FIELDS:
                    self.peaks[key] = max(self.peaks.get(key, 0), int(rest.split()[0]))

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.sample()

    def gib(self) -> dict[str, float]:
        self.sample()
        return {k: round(v / 2**20, 3) for k, v in sorted(self.peaks.items())}


def _library_versions(names: tuple[str, ...]) -> dict[str, str]:
    from kubetune_trainer.recipe import library_versions

    return library_versions(names)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from kubetune.api.finetunejob import Dataset, Training
    from kubetune_trainer.data import prepare
    from kubetune_trainer.modeling import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="kubetune-data-scale-") as scratch:
        path = Path(scratch) / "alpaca.jsonl"
        t0 = time.monotonic()
        write_alpaca(path, args.rows)
        written = time.monotonic() - t0
        tokenizer = load_tokenizer(args.tokenizer)
        sampler = MemorySampler()
        sampler.start()
        t0 = time.monotonic()
        data = prepare(path, "pvc://bench/alpaca.jsonl", Dataset(uri="pvc://bench/alpaca.jsonl", format="alpaca"),
                       Training(maxSeqLength=args.max_seq_length), tokenizer, cache_dir=Path(scratch) / "cache")
        prepared = time.monotonic() - t0
        peak_preparing = sampler.gib()
        t0 = time.monotonic()
        cached = prepare(path, "pvc://bench/alpaca.jsonl", Dataset(uri="pvc://bench/alpaca.jsonl", format="alpaca"),
                         Training(maxSeqLength=args.max_seq_length), tokenizer, cache_dir=Path(scratch) / "cache")
        from_cache = time.monotonic() - t0
        result = {
            "rows": args.rows, "fileBytes": path.stat().st_size, "secondsToWriteFile": round(written, 1),
            "secondsFileToPackedRows": round(prepared, 1), "secondsFromCache": round(from_cache, 2),
            "peakRssGiB": peak_rss_gib(), "peakMemoryGiB": {"preparing": peak_preparing, "overall": sampler.gib()},
            "report": data.report.to_dict(), "packedRows": len(cached.rows),
            "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            # Imported here, after the memory was read: the recipe module imports torch and TRL.
            "versions": _library_versions(("datasets", "pyarrow", "trl", "transformers", "tokenizers")),
            "command": " ".join(sys.argv),
        }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
