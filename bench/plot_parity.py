"""Plot the loss-parity curves recorded by bench/loss_parity.py (through bench/side_by_side.py or
torchrun) and print how far apart they are, next to the step-to-step noise of the baseline.

Usage: python bench/plot_parity.py --out bench/results/loss-parity.png NAME=FILE:CASE ...
(FILE a results JSON, CASE a key under its "cases"; matplotlib needed).
"""

from __future__ import annotations

import argparse
import json
import statistics


def moving_average(values: list[float], k: int = 10) -> list[float]:
    return [sum(values[i - k + 1:i + 1]) / k for i in range(k - 1, len(values))]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("curves", nargs="+", help="LABEL=FILE:CASE; the first is the reference")
    a = ap.parse_args()
    curves = {}
    for item in a.curves:
        label, _, where = item.partition("=")
        path, _, case = where.rpartition(":")
        entry = json.load(open(path))["cases"][case]
        curves[label] = entry.get("result", entry)["losses"]
    ref_label, ref = next(iter(curves.items()))
    noise = statistics.pstdev([ref[i] - ref[i - 1] for i in range(len(ref) // 2, len(ref))])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
        if label != ref_label:
            gap = max(abs(x - y) for x, y in zip(moving_average(losses)[-100:], moving_average(ref)[-100:]))
            print(f"{label}: last-20 mean {sum(losses[-20:]) / 20:.3f} vs {sum(ref[-20:]) / 20:.3f}; "
                  f"largest gap of 10-step means over the last 100 steps {gap:.3f} "
                  f"(step-to-step noise {noise:.3f})")
    ax.set_xlabel("optimizer step (16 examples)")
    ax.set_ylabel("training loss")
    ax.set_title("QLoRA loss parity: Qwen2.5-0.5B shape (random init), invoice task, same data and seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
