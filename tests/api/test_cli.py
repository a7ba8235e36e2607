from __future__ import annotations

import subprocess
import sys

import yaml

from tests.support import EXAMPLES, REPO, minimal_job


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], cwd=REPO, capture_output=True, text=True)


def test_validate_examples_exit_zero():
    result = run_cli("validate", str(EXAMPLES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("resource(s) valid")


def test_validate_reports_each_error_on_its_own_line(tmp_path):
    bad = minimal_job(lora={"r": 0}, dataset={"uri": "pvc://data/../etc"})
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([secret, bad]))
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{path}: FineTuneJob/job: spec.dataset.uri: URI must not contain '.' or '..' path segments",
        f"{path}: FineTuneJob/job: spec.lora.r: input should be greater than or equal to 1",
        "2 error(s) in 1 resource(s)",
    ]


def test_validate_reports_broken_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: [unclosed\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr


def test_crds_generate_check_is_clean():
    result = run_cli("crds", "generate", "--check")
    assert result.returncode == 0, result.stdout


def test_crds_generate_check_detects_drift(tmp_path):
    (tmp_path / "README.md").write_text((REPO / "README.md").read_text())
    result = run_cli("crds", "generate", "--check", "--root", str(tmp_path))
    assert result.returncode == 1
    assert "out of date:" in result.stdout and "finetunejobs.kubetune.dev.yaml" in result.stdout
