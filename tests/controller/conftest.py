"""The API emulator with our CRDs served, and a kubeconfig pointing at it, for the operator tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.fixture
def cluster(kmock, tmp_path, monkeypatch):
    for crd in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(crd.read_text()):
            kmock.serve_crd(doc)
    config = tmp_path / "kubeconfig"
    config.write_text(f"""
apiVersion: v1
kind: Config
current-context: emulator
clusters: [{{name: emulator, cluster: {{server: "{str(kmock.url).rstrip('/')}"}}}}]
contexts: [{{name: emulator, context: {{cluster: emulator}}}}]
""")
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kmock
