"""The chart's Grafana dashboard, rendered by helm: every query names only series the operator
exports, and the key series (each job's curves, phases, queue wait, GPU-hours, failures) are each
drawn by some panel."""

from __future__ import annotations

import json
import re

from prometheus_client import Metric
from prometheus_client.metrics import MetricWrapperBase

from kubetune.controller import metrics
from tests.chart.test_chart import objects

KEY = {"kubetune_finetunejobs", "kubetune_finetunejob_loss", "kubetune_finetunejob_eval_loss",
       "kubetune_finetunejob_tokens_per_second", "kubetune_finetunejob_progress_ratio",
       "kubetune_queue_wait_seconds_bucket", "kubetune_gpu_hours_requested_total",
       "kubetune_finetunejobs_failed_total", "kubetune_attempts_retried_total"}
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> set[str]:
    """The series names of every metric the operator's metrics module defines."""
    families: list[Metric] = [m for value in vars(metrics).values()
                              for collector in (value.values() if isinstance(value, dict) else [value])
                              if isinstance(collector, MetricWrapperBase) for m in collector.describe()]
    return {f.name + suffix for f in families for suffix in SERIES_SUFFIXES[f.type]}


def dashboard_map(*sets: str) -> dict:
    maps = [d for d in objects("grafanaDashboard.enabled=true", *sets) if d["kind"] == "ConfigMap"
            and d["metadata"]["name"].endswith("-dashboard")]
    assert len(maps) == 1
    return maps[0]


def dashboard(*sets: str) -> dict:
    return json.loads(dashboard_map(*sets)["data"]["kubetune.json"])


def queries(dash: dict) -> list[str]:
    variables = [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return [t["expr"] for p in dash["panels"] for t in p["targets"]] + variables


def test_every_query_names_an_exported_series_and_every_key_series_is_drawn():
    dash = dashboard()
    named = {name for q in queries(dash) for name in re.findall(r"\bkubetune_[a-z0-9_]+", q)}
    assert named - exported() == set()
    drawn = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"\bkubetune_[a-z0-9_]+", t["expr"])}
    assert KEY - drawn == set()


def test_the_dashboard_is_off_by_default_and_goes_where_grafana_looks():
    assert not [d for d in objects() if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard_map()["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's default label
    placed = dashboard_map("grafanaDashboard.namespace=monitoring", "grafanaDashboard.labels.team=ml")
    assert placed["metadata"]["namespace"] == "monitoring" and placed["metadata"]["labels"]["team"] == "ml"
