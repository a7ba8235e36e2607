"""spec.tracking.mlflow against MLflow's own tracking server on 127.0.0.1 (tests/trainer/conftest.py):
the run, its params, its per-step metrics and the tags naming what it published, read back through
MLflow's client; a preempted job stays one MLflow run; a server that is not there fails nothing."""

from __future__ import annotations

import json
import os
import signal
import uuid

import pytest
from mlflow import MlflowClient
from pydantic import ValidationError

from kubetune.api.finetunejob import FineTuneJob
from kubetune.contract import EXIT_OK, EXIT_PREEMPTED, HISTORY_FILE
from kubetune.controller.jobs import build_job
from kubetune.controller.settings import OperatorSettings
from kubetune.local.s3server import free_port
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import MANIFEST, read_manifest
from kubetune_trainer.tracking import ADAPTER_TAG, JOB_TAG, MANIFEST_TAG, RUN_TAG
from tests.support import minimal_job
from tests.trainer.recipe_support import make_volume, run_spec, run_trainer, write_spec
from tests.trainer.test_resume import _start, _wait_for

STEPS, EVERY = 10, 4


def _progress_step(path) -> int:
    try:
        return json.loads(path.read_text()).get("step") or 0
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0


@pytest.mark.slow
def test_a_preempted_and_resumed_job_is_one_mlflow_run_with_its_curve_params_and_tags(
        tmp_path, smollm2_dir, mlflow_server):
    experiment = f"invoices-{uuid.uuid4().hex[:8]}"
    volumes = make_volume(tmp_path, smollm2_dir, records=60)
    body = run_spec(tmp_path / "run", volumes, output_uri="pvc://runs/tracked", training={"maxSteps": STEPS},
                    checkpointEverySteps=EVERY, output={"adapterName": "invoice-extractor"},
                    tracking={"mlflow": {"uri": mlflow_server, "experiment": experiment}})
    body["run"]["job_name"] = "tracked"
    spec = write_spec(tmp_path / "run.json", body)
    log = tmp_path / "run.log"

    # Attempt 1 is preempted (SIGTERM: it checkpoints where it stopped); attempt 2 resumes and finishes.
    first = _start(spec, {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    progress = tmp_path / "run" / "progress.json"
    _wait_for(lambda: _progress_step(progress) >= 3, 600, first, "step 3")
    first.send_signal(signal.SIGTERM)
    assert first.wait(120) == EXIT_PREEMPTED
    second_log = tmp_path / "resume.log"
    assert run_trainer(spec, second_log) == EXIT_OK
    assert "resuming from pvc://runs/tracked/checkpoints/checkpoint-" in second_log.read_text()

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1  # both attempts logged into one run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert f"MLflow: started run {run.info.run_id}" in log.read_text()
    assert f"MLflow: continuing run {run.info.run_id}" in second_log.read_text()
    for text in (log.read_text(), second_log.read_text()):
        assert "Failed to log run data" not in text and "goes on without it" not in text

    out = LocalLocation(volumes / "runs" / "tracked")
    manifest = read_manifest(out)
    assert manifest.metadata["tracking"]["mlflow"]["runId"] == run.info.run_id
    assert run.data.tags[MANIFEST_TAG] == f"pvc://runs/tracked/{MANIFEST}"
    assert run.data.tags[ADAPTER_TAG] == "invoice-extractor"
    assert (run.data.tags[RUN_TAG], run.data.tags[JOB_TAG]) == ("pvc://runs/tracked", "default/tracked")

    # The spec's LoRA rank and learning rate, and the Trainer's own arguments.
    assert run.data.params["lora.r"] == "16" and run.data.params["training.learningRate"] == "0.002"
    assert float(run.data.params["learning_rate"]) == 0.002

    # One loss point per trained step, equal to the published history, and falling.
    history = [json.loads(line) for line in (out.root / HISTORY_FILE).read_text().splitlines()]
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [r["step"] for r in history] == list(range(1, STEPS + 1))
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in history])
    assert sum(m.value for m in losses[-3:]) < sum(m.value for m in losses[:3])
    evals = sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)
    evaluated = [r for r in history if "evalLoss" in r]
    assert [m.step for m in evals] == [r["step"] for r in evaluated] and evaluated[-1]["step"] == STEPS
    assert [m.value for m in evals] == pytest.approx([r["evalLoss"] for r in evaluated])
    final = manifest.metadata["metrics"]["final"]["evalLoss"]
    assert run.data.metrics["final.evalLoss"] == pytest.approx(final)
    assert run.data.metrics["final.evalLoss"] < run.data.metrics["baseline.evalLoss"]


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_nothing(tmp_path, smollm2_dir):
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    volumes = make_volume(tmp_path, smollm2_dir, records=40)
    spec = write_spec(tmp_path / "run.json", run_spec(
        tmp_path / "run", volumes, output_uri="pvc://runs/untracked", training={"maxSteps": 2},
        tracking={"mlflow": {"uri": nowhere, "experiment": "invoices"}}))
    log = tmp_path / "run.log"
    assert run_trainer(spec, log) == EXIT_OK
    assert f"MLflow at {nowhere}: could not start the run" in log.read_text()
    out = LocalLocation(volumes / "runs" / "untracked")
    recorded = read_manifest(out).metadata["tracking"]["mlflow"]
    assert recorded["uri"] == nowhere and "runId" not in recorded
    assert "Connection refused" in recorded["error"]
    assert len((out.root / HISTORY_FILE).read_text().splitlines()) == 2


def _job(**tracking) -> FineTuneJob:
    return FineTuneJob.model_validate(minimal_job(tracking={"mlflow": {"experiment": "e", **tracking}}))


@pytest.mark.parametrize("uri", ["ftp://mlflow.example.com", "https://user:secret@mlflow.example.com",
                                 "mlflow.example.com", "https://mlflow.example.com/?token=x", "file:///tmp/mlruns"])
def test_tracking_uris_other_than_http_without_credentials_are_refused(uri):
    with pytest.raises(ValidationError, match=r"tracking\.mlflow\.uri"):
        _job(uri=uri)


def test_the_mlflow_secret_reaches_the_trainer_as_references_to_its_keys():
    settings = OperatorSettings()
    job = build_job(_job(uri="https://mlflow.example.com:5000/prefix", secretRef={"name": "mlflow-creds"}), settings)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-creds", "key": key, "optional": True}
    untracked = build_job(FineTuneJob.model_validate(minimal_job()), settings)
    assert not [e for e in untracked["spec"]["template"]["spec"]["containers"][0]["env"]
                if e["name"].startswith("MLFLOW_")]
