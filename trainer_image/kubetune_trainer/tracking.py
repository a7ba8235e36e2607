"""Experiment tracking (spec.tracking.mlflow): one MLflow run per FineTuneJob.

What the Trainer logs, transformers' own MLflowCallback logs into that run: the Trainer's arguments
as params and each step's loss, learning rate, grad norm and epoch as metrics, asynchronously so a
slow server never holds up a step. Around it this module keeps what is kubetune's:
- the run itself: a resumed attempt finds the run by its tag kubetune.runUri (the job's output
  prefix, unique per FineTuneJob) and continues it, so a preempted job is still one MLflow run. The
  steps retrained after the last checkpoint are logged again: MLflow keeps both points of those
  steps, history.jsonl only the retrained one;
- the spec's training fields as params (lora.r, training.learningRate, ...), which the Trainer's
  arguments do not hold;
- at publish, once the manifest is written: the hold-out loss measured at each checkpoint, the
  baseline and final metrics, and the tags naming what the run produced (its manifest URI and its
  LoraAdapter's adapterName);
- the run's end: FINISHED, KILLED (preempted; the next attempt reopens it) or FAILED.

A tracking server that cannot be reached, or fails, never fails the training run: the error is
logged as a warning and recorded in the run's manifest (tracking.mlflow.error), and training goes
on without MLflow. Credentials come from the environment (MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD), which MLflow's client reads itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kubetune.api.finetunejob import IMMUTABLE_AFTER_START, FineTuneJobSpec, Mlflow
from kubetune_trainer.runspec import RunInfo

log = logging.getLogger(__name__)
RUN_TAG = "kubetune.runUri"
JOB_TAG = "kubetune.fineTuneJob"
MANIFEST_TAG = "kubetune.manifestUri"
ADAPTER_TAG = "kubetune.loraAdapter"
# MLflow's defaults (7 retries, backoff factor 2, 120 s per request) would hold an unreachable
# server's run for minutes at its start and again when the queued metrics are flushed at its end;
# with these, seconds. A server that is down for longer loses those metrics, not the training.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def spec_params(spec: FineTuneJobSpec) -> dict[str, str]:
    """The fields that decide what is trained, defaults applied, as flat params:
    {"lora.r": "16", "training.learningRate": "0.0002", "method": "lora", ...}; strings as they are,
    other values as JSON."""
    body = spec.model_dump(by_alias=True, mode="json", exclude_none=True)
    pending: list[tuple[str, Any]] = [(key, body[key]) for key in IMMUTABLE_AFTER_START if key in body]
    params: dict[str, str] = {}
    while pending:
        key, value = pending.pop()
        if isinstance(value, dict):
            pending += [(f"{key}.{name}", item) for name, item in value.items()]
        else:
            params[key] = value if isinstance(value, str) else json.dumps(value)
    return params


def numeric_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of an evaluation's metrics (bool flags and missing values are not metrics)."""
    return {f"{prefix}.{key}": float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


class TrackedRun:
    """This process's MLflow run. Without tracking, on ranks other than 0, or once the server has
    failed, `callback` is None and every method does nothing."""

    def __init__(self, settings: Mlflow | None, run_info: RunInfo):
        self.settings, self.run_info = settings, run_info
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.error: str | None = None
        self.published = False
        self.callback: Any = None  # transformers' MLflowCallback, for the Trainer

    def start(self, spec: FineTuneJobSpec) -> None:
        if self.settings is None:
            return
        for name, value in HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        try:
            import mlflow
            from transformers.integrations import MLflowCallback

            mlflow.set_tracking_uri(self.settings.uri)
            experiment = mlflow.set_experiment(self.settings.experiment)
            self.experiment_id = experiment.experiment_id
            earlier = mlflow.MlflowClient().search_runs(
                [experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{self.run_info.output_uri}'",
                max_results=1)
            run = mlflow.start_run(
                run_id=earlier[0].info.run_id if earlier else None, experiment_id=experiment.experiment_id,
                run_name=self.run_info.job_name,
                tags={RUN_TAG: self.run_info.output_uri,
                      JOB_TAG: f"{self.run_info.namespace}/{self.run_info.job_name}"})
            self.run_id = run.info.run_id
            mlflow.log_params(spec_params(spec))
        except Exception as exc:  # whatever the server, the network or the image lacks, training goes on
            self._failed("could not start the run", exc)
            return
        log.info("MLflow: %s run %s in experiment %s (%s)", "continuing" if earlier else "started",
                 self.run_id, self.settings.experiment, self.settings.uri)
        self.callback = MLflowCallback()

    def publish(self, *, manifest_uri: str, adapter_name: str, step: int, rows: list[dict],
                metrics: dict[str, dict]) -> None:
        """After the manifest is written: the hold-out loss curve, the baseline and final metrics,
        and the tags that lead from the MLflow run to the published run and its LoraAdapter."""
        self.published = True
        if self.run_id is None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        curve = [Metric("eval_loss", row["evalLoss"], now, row["step"]) for row in rows if "evalLoss" in row]
        summary = [Metric(key, value, now, step) for phase in ("baseline", "final")
                   for key, value in numeric_metrics(phase, metrics.get(phase, {})).items()]
        try:
            MlflowClient().log_batch(self.run_id, metrics=curve + summary,
                                     tags=[RunTag(MANIFEST_TAG, manifest_uri), RunTag(ADAPTER_TAG, adapter_name)])
        except Exception as exc:
            self._failed("could not record the published run", exc)

    def end(self, status: str) -> None:
        if self.run_id is None:
            return
        import mlflow

        try:
            mlflow.end_run(status)  # flushes the metrics the callback queued
        except Exception as exc:
            self._failed(f"could not end the run as {status}", exc)

    def record(self) -> dict[str, Any]:
        """For the run's manifest: where the MLflow run is, or why there is none."""
        if self.settings is None:
            return {}
        where: dict[str, Any] = {"uri": self.settings.uri, "experiment": self.settings.experiment}
        if self.run_id:
            where |= {"experimentId": self.experiment_id, "runId": self.run_id}
        if self.error:
            where["error"] = self.error
        return {"mlflow": where}

    def _failed(self, what: str, exc: Exception) -> None:
        self.error = f"{what}: {exc}"
        self.callback = None
        log.warning("MLflow at %s: %s; training goes on without it", self.settings and self.settings.uri,
                    self.error)


@contextmanager
def tracked_run(spec: FineTuneJobSpec, run_info: RunInfo, *, main: bool) -> Iterator[TrackedRun]:
    """The run's MLflow run for the duration of the block, ended as FAILED if it raises, FINISHED
    once published and KILLED otherwise (a preemption: the next attempt continues it)."""
    run = TrackedRun(spec.tracking.mlflow if spec.tracking and main else None, run_info)
    run.start(spec)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED" if run.published else "KILLED")
