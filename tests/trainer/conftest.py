from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import pytest

from kubetune.local.s3server import free_port
from tests.trainer.test_resume import _wait_for

REPO = Path(__file__).resolve().parents[2]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """MLflow's own tracking server on 127.0.0.1 (sqlite store, local artifacts), from the venv that
    scripts/mlflow-server keeps beside the project's; yields its URL."""
    command = subprocess.run([str(REPO / "scripts" / "mlflow-server")], check=True, capture_output=True,
                             text=True).stdout.strip()
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root",
             str(root / "artifacts")], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _healthy(url), 180, server, f"the MLflow server (log: {root / 'server.log'})")
        yield url
    finally:
        server.terminate()
        server.wait(30)
