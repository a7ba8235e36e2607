"""`kubetune runs show|plot`: a run's training history (ARTIFACT/history.jsonl, one row per step)
read from the object store through the run's manifest, as a table or as loss curves.

A run is named by its artifact URI (s3://bucket/prefix or pvc://claim/path, where manifest.json
lies), or by a LoraAdapter or FineTuneJob in the cluster (kubeconfig), whose artifact URI the
resource gives. Store credentials come from the environment, as for `kubetune models import`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.meta import API_VERSION
from kubetune.contract import HISTORY_FILE
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import Location, ObjectMissing, open_location
from kubetune.storage.manifest import Manifest, read_manifest

TEXT_WIDTH, TEXT_HEIGHT = 72, 16
# Text plot markers, one pair (loss, eval loss) per run.
MARKERS = (("*", "@"), ("+", "#"), ("o", "%"), ("x", "&"))
COLUMNS = (("step", "step", "{}"), ("epoch", "epoch", "{:.3f}"), ("loss", "loss", "{:.4f}"),
           ("evalLoss", "eval loss", "{:.4f}"), ("learningRate", "lr", "{:.2e}"), ("gradNorm", "grad norm", "{:.3f}"),
           ("tokensPerSecond", "tokens/s", "{:.1f}"),
           ("gpuPeakMemoryGiB", "GPU GiB", "{:.2f}"))


class RunError(Exception):
    """A run that cannot be read: the message says which and why."""


@dataclass
class Run:
    label: str
    uri: str
    rows: list[dict]


def resolve(refs: list[str], namespace: str) -> list[str]:
    """The artifact URI of each run: the reference itself, or the artifact of the LoraAdapter it
    names (directly, or as a FineTuneJob's status.adapterRef); one client for all of them."""
    if all("://" in ref for ref in refs):
        return refs
    import asyncio

    from kubetune.controller.adapters import adapter_path
    from kubetune.controller.kube import KubeClient, KubeConfig, path_for

    async def lookup(client: KubeClient, ref: str) -> str:
        if "://" in ref:
            return ref
        adapter = await client.get(adapter_path(namespace, ref))
        if adapter is not None:
            return str(adapter["spec"]["artifact"]["uri"])
        job = await client.get(path_for(API_VERSION, "finetunejobs", namespace, ref))
        if job is None:
            raise RunError(f"{namespace}/{ref}: no LoraAdapter or FineTuneJob of that name")
        name = ((job.get("status") or {}).get("adapterRef") or {}).get("name")
        if not name:
            raise RunError(f"FineTuneJob {namespace}/{ref} has published no run yet (no status.adapterRef)")
        adapter = await client.get(adapter_path(namespace, name))
        if adapter is None:
            raise RunError(f"FineTuneJob {namespace}/{ref}: its LoraAdapter {name} is gone")
        return str(adapter["spec"]["artifact"]["uri"])

    async def lookup_all() -> list[str]:
        client = KubeClient(KubeConfig.load())
        try:
            return [await lookup(client, ref) for ref in refs]
        finally:
            await client.close()
    return asyncio.run(lookup_all())


def read_history(uri: str, storage: StorageConfig | None, volume_root: Path = Path("/")) -> list[dict]:
    """The history rows of the run at `uri`."""
    location = open_location(uri, storage=storage, volume_root=volume_root, retry_budget_s=10)
    try:
        manifest = read_manifest(location)
    except ObjectMissing as exc:
        raise RunError(f"{uri}: no run manifest (a run publishes manifest.json last, once it succeeded)") from exc
    return history_rows(location, manifest, uri)


def history_rows(location: Location, manifest: Manifest, uri: str) -> list[dict]:
    """The history rows the run's manifest lists, checked against the manifest's size and sha256."""
    entry = next((f for f in manifest.files if f.path == HISTORY_FILE), None)
    if entry is None:
        raise RunError(f"{uri}: the run kept no {HISTORY_FILE} (published by an older trainer)")
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / HISTORY_FILE
        location.get_file(HISTORY_FILE, target, size=entry.size, sha256=entry.sha256)
        return [json.loads(line) for line in target.read_text().splitlines() if line.strip()]


def load_runs(refs: list[str], namespace: str, volume_root: Path) -> list[Run]:
    uris = resolve(refs, namespace)
    storage = StorageConfig.from_env() if any(u.startswith("s3://") for u in uris) else None
    return [Run(ref, uri, read_history(uri, storage, volume_root)) for ref, uri in zip(refs, uris, strict=True)]


def table(rows: list[dict]) -> str:
    """Every step as a line; columns no row has are left out."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(r[key]) if key in r else "" for key, _, fmt in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def _series(run: Run, key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in run.rows if r.get(key) is not None and math.isfinite(r[key])]


def text_plot(runs: list[Run], width: int = TEXT_WIDTH, height: int = TEXT_HEIGHT) -> str:
    """Loss (and eval loss) against step on a character grid; later runs draw over earlier ones.
    By hand rather than with a terminal-plotting package (plotext): a character grid is a few lines,
    and the CLI takes no dependency for a quick look (the PNG, through matplotlib, is the real plot)."""
    points = [p for run in runs for key in ("loss", "evalLoss") for p in _series(run, key)]
    if not points:
        return "no steps to plot"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    grid = [[" "] * width for _ in range(height)]
    for run, (loss_mark, eval_mark) in zip(runs, itertools.cycle(MARKERS)):
        for key, mark in (("loss", loss_mark), ("evalLoss", eval_mark)):
            for x, y in _series(run, key):
                col = round((x - x0) / ((x1 - x0) or 1) * (width - 1))
                row = round((y1 - y) / ((y1 - y0) or 1) * (height - 1))
                grid[row][col] = mark
    label = max(len(f"{y1:.4g}"), len(f"{y0:.4g}"))
    lines = [f"{(f'{y1:.4g}' if i == 0 else f'{y0:.4g}' if i == height - 1 else ''):>{label}} |{''.join(row)}"
             for i, row in enumerate(grid)]
    lines.append(" " * label + " +" + "-" * width)
    lines.append(" " * label + f"  step {x0}" + f"step {x1}".rjust(width - len(f"step {x0}")))
    for run, (loss_mark, eval_mark) in zip(runs, itertools.cycle(MARKERS)):
        lines.append(f"{loss_mark} loss  {eval_mark} eval loss  {run.label}")
    return "\n".join(lines)


def png_plot(runs: list[Run], out: Path) -> None:
    """Loss (line) and eval loss (markers) against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the plot goes to a file
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for run, color in zip(runs, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])):
        loss, evals = _series(run, "loss"), _series(run, "evalLoss")
        ax.plot([x for x, _ in loss], [y for _, y in loss], color=color, linewidth=1.2, label=f"{run.label} loss")
        if evals:
            ax.plot([x for x, _ in evals], [y for _, y in evals], color=color, linestyle="--", marker="o",
                    markersize=4, label=f"{run.label} eval loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _cmd_show(args: argparse.Namespace) -> int:
    (run,) = load_runs([args.ref], args.namespace, Path(args.volume_root))
    print(table(run.rows))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    runs = load_runs(args.refs, args.namespace, Path(args.volume_root))
    if args.out:
        png_plot(runs, Path(args.out))
        print(Path(args.out).resolve())
    else:
        print(text_plot(runs))
    return 0


def _guarded(command):
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (RunError, ValueError) as exc:  # ValueError: a bad URI or incomplete credentials
            print(f"kubetune runs: {exc}", file=sys.stderr)
            return 1
    return run


def register(sub) -> None:
    """Adds `runs show` and `runs plot` to the CLI's subcommands."""
    runs = sub.add_parser("runs", help="training histories of published runs (store credentials from "
                                       "KUBETUNE_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY)").add_subparsers(
        dest="runs_command", required=True)
    show = runs.add_parser("show", help="a run's history as a table, one line per step")
    show.add_argument("ref", metavar="RUN", help="artifact URI (s3://..., pvc://...), LoraAdapter or FineTuneJob name")
    plot = runs.add_parser("plot", help="loss and eval loss against step, several runs on one plot")
    plot.add_argument("refs", metavar="RUN", nargs="+", help="artifact URIs, LoraAdapter or FineTuneJob names")
    plot.add_argument("--out", help="write a PNG here (needs matplotlib); default: a text plot on the terminal")
    for cmd, run in ((show, _cmd_show), (plot, _cmd_plot)):
        cmd.add_argument("--namespace", "-n", default="default", help="of LoraAdapter and FineTuneJob names")
        cmd.add_argument("--volume-root", default="/", help="where pvc:// claims are mounted on this machine")
        cmd.set_defaults(run=_guarded(run))
