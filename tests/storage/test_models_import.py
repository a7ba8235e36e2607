"""`kubetune models import`: a model directory into the object store with a manifest whose sha256
pins it (baseModel.revision), as air-gapped clusters preload base models."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from kubetune.storage.config import SECRET_KEYS
from kubetune.storage.manifest import MANIFEST, read_manifest, verify


def test_import_uploads_files_and_a_manifest_to_pin(s3_server, s3_bucket, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(os.urandom(3 << 20))
    config = s3_server.config
    env = {**os.environ, SECRET_KEYS["endpoint"]: f"http://{config.endpoint}",
           SECRET_KEYS["accessKey"]: config.access_key, SECRET_KEYS["secretKey"]: config.secret_key}
    uri = f"s3://{s3_bucket.bucket}/models/tiny"
    done = subprocess.run([sys.executable, "-m", "kubetune.cli", "models", "import", str(model), uri], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    location = s3_bucket.child("models/tiny")
    digest = hashlib.sha256(location.get_bytes(MANIFEST)).hexdigest()
    assert done.stdout.strip().endswith(f"pin it with baseModel.revision: {digest}")
    manifest = read_manifest(location)
    assert {f.path for f in manifest.files} == {"config.json", "model.safetensors"}
    assert manifest.metadata["model"]["architectures"] == ["LlamaForCausalLM"]
    assert verify(location, manifest) == []

    (tmp_path / "empty").mkdir()
    refused = subprocess.run([sys.executable, "-m", "kubetune.cli", "models", "import", str(tmp_path / "empty"), uri],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.startswith("kubetune models import:")
    assert "is not a transformers model directory: no config.json" in refused.stderr
