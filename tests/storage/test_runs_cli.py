"""`kubetune runs show|plot`: histories read from a real S3 server through each run's manifest,
with the store credentials from the environment as `kubetune models import` takes them."""

from __future__ import annotations

import json

from kubetune.cli import main
from kubetune.contract import HISTORY_FILE
from kubetune.runs_cli import Run, text_plot
from kubetune.storage.manifest import Manifest, describe_dir, publish


def _curve(rate: float, steps: int = 20, every: int = 5) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": step / steps, "loss": round(2.0 * (1 - rate) ** step + 0.3, 4),
               "learningRate": 2e-3, "gradNorm": 1.0, "tokensPerSecond": 50.0}
        if step % every == 0:
            row["evalLoss"] = round(row["loss"] + 0.1, 4)
        rows.append(row)
    return rows


def _publish_run(location, tmp_path, name: str, rows: list[dict] | None) -> str:
    """A run artifact as the trainer publishes it: files first, manifest.json listing them last."""
    local = tmp_path / name
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "adapter_config.json").write_text("{}")
    if rows is not None:
        (local / HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = location.child(f"runs/{name}")
    publish(run, Manifest("RunManifest", describe_dir(local), {"metrics": {}}), local)
    return f"s3://{location.bucket}/runs/{name}"


def test_show_prints_every_step_of_the_published_history(store_env, s3_bucket, tmp_path, capsys):
    uri = _publish_run(s3_bucket, tmp_path, "a", _curve(0.2))
    assert main(["runs", "show", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "epoch", "loss", "eval", "loss", "lr", "grad", "norm", "tokens/s"]
    assert [int(line.split()[0]) for line in lines[1:]] == list(range(1, 21))
    assert lines[5].split()[3] == f"{_curve(0.2)[4]['evalLoss']:.4f}"  # step 5 was evaluated


def test_plot_draws_several_runs_as_text_and_as_png(store_env, s3_bucket, tmp_path, capsys):
    a = _publish_run(s3_bucket, tmp_path, "a", _curve(0.2))
    b = _publish_run(s3_bucket, tmp_path, "b", _curve(0.35))
    assert main(["runs", "plot", a, b]) == 0
    text = capsys.readouterr().out
    assert f"* loss  @ eval loss  {a}" in text and f"+ loss  # eval loss  {b}" in text
    assert "step 1" in text and "step 20" in text

    out = tmp_path / "plots" / "curve.png"
    assert main(["runs", "plot", a, b, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (960, 540)


def test_runs_without_a_usable_history_are_refused_by_name(store_env, s3_bucket, tmp_path, capsys):
    old = _publish_run(s3_bucket, tmp_path, "old", None)
    assert main(["runs", "show", old]) == 1
    assert f"{old}: the run kept no {HISTORY_FILE}" in capsys.readouterr().err
    assert main(["runs", "show", f"s3://{s3_bucket.bucket}/runs/never"]) == 1
    assert "no run manifest" in capsys.readouterr().err
    # A history changed after publication no longer matches the manifest's sha256.
    tampered = _publish_run(s3_bucket, tmp_path, "tampered", _curve(0.2))
    s3_bucket.put_bytes(f"runs/tampered/{HISTORY_FILE}", b'{"step": 1, "loss": 0.0}\n' + b" " * 1000)
    assert main(["runs", "show", tampered]) == 1
    assert "kubetune runs:" in capsys.readouterr().err


def test_text_plot_puts_the_extremes_on_the_grid_edges():
    plot = text_plot([Run("r", "s3://b/r", [{"step": 1, "loss": 2.0}, {"step": 10, "loss": 1.0, "evalLoss": 1.5}])],
                     width=10, height=5)
    lines = plot.splitlines()
    assert lines[0] == "2 |*" + " " * 9
    assert lines[2] == "  |" + " " * 9 + "@"
    assert lines[4] == "1 |" + " " * 9 + "*"
