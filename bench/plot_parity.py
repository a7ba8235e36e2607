"""Plot the loss-parity curves recorded by bench/loss_parity.py (through bench/side_by_side.py,
torchrun or bench/gpu_session.sh) and print how far apart they are, next to the step-to-step noise
of the baseline; optionally write the curves and those figures as one results JSON.

Usage: python bench/plot_parity.py --out bench/results/loss-parity.png [--json-out FILE.json]
           [--note TEXT ...] [--pytest-log FILE] LABEL=SOURCE ...
SOURCE is either FILE:CASE (a results JSON, CASE a key under its "cases") or a JSONL file written
by `loss_parity.py --log` (per-step lines, then the final result line when the run finished; a run
stopped by its time limit still gives the steps it logged). The first curve is the reference.
Curves of different lengths are compared over the steps both have. The PNG needs matplotlib.
--pytest-log adds each test's outcome and pytest's summary line from a `pytest -v` log (the GPU
packing-parity tests that bench/gpu_session.sh runs in the same call) to the results JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from pathlib import Path


def moving_average(values: list[float], k: int = 10) -> list[float]:
    return [sum(values[i - k + 1:i + 1]) / k for i in range(k - 1, len(values))]


def load_curve(source: str) -> tuple[list[float], dict]:
    """(losses, the run's final result line or entry without its losses; {} if it did not finish)."""
    path, _, case = source.rpartition(":")
    if path and Path(path).is_file() and not Path(source).is_file():
        entry = json.load(open(path))["cases"][case]
        result = entry.get("result", entry)
        return result["losses"], {k: v for k, v in result.items() if k != "losses"}
    steps, final = {}, {}
    for line in Path(source).read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "losses" in item:
            final = item
        elif "step" in item:
            steps[item["step"]] = item["loss"]
    losses = final["losses"] if final else [steps[s] for s in sorted(steps)]
    return losses, {k: v for k, v in final.items() if k != "losses"}


def compare(ref: list[float], losses: list[float]) -> dict:
    n = min(len(ref), len(losses))
    ref, losses = ref[:n], losses[:n]
    window = min(100, max(n - 9, 0))
    gaps = [abs(x - y) for x, y in zip(moving_average(losses)[-window:], moving_average(ref)[-window:], strict=True)]
    return {
        "steps_compared": n,
        "last20_mean": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "reference_last20_mean": round(sum(ref[-20:]) / len(ref[-20:]), 4),
        "max_gap_10step_means_last100": round(max(gaps), 4) if window else None,
        "mean_gap_10step_means_last100": round(sum(gaps) / window, 4) if window else None,
    }


def pytest_outcomes(path: str) -> dict:
    text = Path(path).read_text(errors="replace").splitlines()
    tests = dict(re.findall(r"::(\w+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", "\n".join(text)))
    counts = re.compile(r"\d+ (passed|failed|error|skipped)")
    summary = next((line.strip("= ") for line in reversed(text) if counts.search(line)), None)
    return {"log": Path(path).name, "tests": tests, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="the PNG")
    ap.add_argument("--json-out", help="also write the curves and the comparison here")
    ap.add_argument("--note", action="append", default=[], help="a note for the results JSON (repeatable)")
    ap.add_argument("--pytest-log", help="a `pytest -v` log whose outcomes go into the results JSON")
    ap.add_argument("curves", nargs="+", help="LABEL=FILE:CASE or LABEL=FILE.jsonl; the first is the reference")
    a = ap.parse_args()
    curves, meta = {}, {}
    for item in a.curves:
        label, _, where = item.partition("=")
        curves[label], meta[label] = load_curve(where)
    ref_label, ref = next(iter(curves.items()))
    diffs = [ref[i] - ref[i - 1] for i in range(max(len(ref) // 2, 1), len(ref))]
    noise = statistics.pstdev(diffs) if len(diffs) > 1 else None
    comparisons = {}
    for label, losses in curves.items():
        if label == ref_label:
            continue
        c = comparisons[label] = compare(ref, losses)
        print(f"{label}: {len(losses)} steps (reference {len(ref)}); over the {c['steps_compared']} both have: "
              f"last-20 mean {c['last20_mean']:.3f} vs {c['reference_last20_mean']:.3f}; largest gap of "
              f"10-step means over the last 100 steps {c['max_gap_10step_means_last100']} "
              f"(step-to-step noise of the reference {noise if noise is None else round(noise, 3)})")

    first = next((m for m in meta.values() if m), {})
    shape = first.get("arch", "qwen2.5-0.5b")
    if first.get("layers"):
        shape += f", {first['layers']} layers"
    if a.json_out:
        result = {
            "date": datetime.date.today().isoformat(),
            "what": "loss parity: bench/loss_parity.py, the same 16 examples per step, seed and hyperparameters; "
                    "QLoRA NF4 r16 q/k/v/o on a random-init architecture learning the invoice task",
            "reference": ref_label, "reference_step_noise": round(noise, 4) if noise is not None else None,
            "comparisons": comparisons, "notes": a.note,
            **({"gpu_tests": pytest_outcomes(a.pytest_log)} if a.pytest_log else {}),
            "cases": {label: {"finished": bool(meta[label]), "steps_logged": len(curves[label]),
                              **meta[label], "losses": curves[label]} for label in curves},
        }
        Path(a.json_out).write_text(json.dumps(result, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    ax.set_xlabel("optimizer step (16 examples)")
    ax.set_ylabel("training loss")
    ax.set_title(f"QLoRA loss parity: {shape} (random init), invoice task, same data and seed", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
