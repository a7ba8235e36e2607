"""The trainer image's `verify-job` command, as its Job runs it: its own process, the spec file the
operator writes, the store's credentials from the environment, the report in the termination
message. A mismatch is the verification's result (exit 0, reported), not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kubetune.controller.artifacts import fingerprint
from kubetune.storage.config import SECRET_KEYS
from kubetune.storage.manifest import Manifest, describe_dir, publish


def _run(tmp_path, s3_server, spec: dict) -> tuple[int, dict]:
    config = s3_server.config
    env = {**os.environ, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    env |= {SECRET_KEYS["endpoint"]: f"http://{config.endpoint}", SECRET_KEYS["accessKey"]: config.access_key,
            SECRET_KEYS["secretKey"]: config.secret_key, SECRET_KEYS["region"]: config.region}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "kubetune_trainer.main", "verify-job", "--spec",
                           str(tmp_path / "spec.json")], env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads((tmp_path / "termination-log").read_text())


def test_verify_job_reports_matching_content_then_names_a_changed_file(s3_server, s3_bucket, tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(20_000))
    location = s3_bucket.child("run")
    manifest = Manifest("RunManifest", describe_dir(run))
    digest = publish(location, manifest, run)
    listed = fingerprint(digest, manifest.files, location.list())
    spec = {"artifactUri": location.uri, "manifestSha256": digest, "fingerprint": listed}

    code, report = _run(tmp_path, s3_server, spec)
    assert code == 0
    assert report == {"fingerprint": listed, "files": 2, "bytes": manifest.total_size, "problems": ""}

    location.put_bytes("adapter/adapter_model.safetensors", os.urandom(20_000))  # same size, other bytes
    code, report = _run(tmp_path, s3_server, spec)
    assert code == 0
    assert report["problems"] == "adapter/adapter_model.safetensors: sha256 mismatch"
    assert report["fingerprint"] != listed  # the operator learns these are not the objects it listed

    code, report = _run(tmp_path, s3_server, {**spec, "manifestSha256": "0" * 64})
    assert code == 0 and report["problems"].startswith("manifest.json: sha256 ")
    assert report["fingerprint"] == ""
