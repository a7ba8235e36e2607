"""spec.tracking.mlflow.secretRef through the operator, over HTTP against the API emulator: a
missing Secret, or one without usable credentials, keeps the job waiting with a message naming it,
as the storage Secret does; once it is right the Job is created with references to its keys."""

from __future__ import annotations

import base64

import pytest

from kubetune.local.apiserver import ApiServer
from tests.controller.test_operator import NS, apply, condition, job_doc, obj, running_operator, status
from tests.support import eventually

pytestmark = pytest.mark.kmock(cls=ApiServer)


def _secret(**data: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow", "namespace": NS},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


async def test_a_missing_or_incomplete_mlflow_secret_waits_with_a_clear_message(cluster):
    secrets = f"/api/v1/namespaces/{NS}/secrets"
    tracking = {"mlflow": {"uri": "https://mlflow.example.com", "experiment": "invoices",
                           "secretRef": {"name": "mlflow"}}}
    async with running_operator():
        await apply(cluster, job_doc(tracking=tracking))
        await eventually(lambda: condition(cluster, "Planned").get("reason") == "SecretNotFound", what="no Secret")
        assert status(cluster)["phase"] == "Pending"
        assert status(cluster)["message"] == (f"Secret mlflow (tracking.mlflow.secretRef) does not exist in "
                                              f"namespace {NS}")
        await cluster.post(secrets, json=_secret(MLFLOW_TRACKING_USERNAME="trainer"))
        await eventually(lambda: condition(cluster, "Planned").get("reason") == "SecretInvalid", timeout=20,
                         what="a Secret without a password")
        assert status(cluster)["message"] == (
            "Secret mlflow (tracking.mlflow.secretRef) needs key MLFLOW_TRACKING_TOKEN, or keys "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; it has MLFLOW_TRACKING_USERNAME")
        await cluster.patch(f"{secrets}/mlflow", json={"data": _secret(MLFLOW_TRACKING_TOKEN="t0ken")["data"]})
        job = await eventually(lambda: obj(cluster, "batch/v1/jobs", "job-train"), timeout=20, what="the Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow"
