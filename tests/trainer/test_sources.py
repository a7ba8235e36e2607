"""Base models from s3:// are downloaded by their manifest, checked, cached, and pinned by revision."""

from __future__ import annotations

import hashlib
import os

import pytest

from kubetune.api.finetunejob import BaseModelSource
from kubetune.storage.location import IntegrityError
from kubetune.storage.manifest import Manifest, describe_dir, publish
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.sources import resolve_dataset, resolve_model


@pytest.fixture
def model_on_s3(tmp_path, s3_bucket):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(os.urandom(200_000))
    digest = publish(s3_bucket.child("models/tiny"), Manifest("ModelManifest", describe_dir(src)), src)
    return src, digest


def _resolve(s3_server, s3_bucket, tmp_path, revision=None):
    source = BaseModelSource(uri=f"s3://{s3_bucket.bucket}/models/tiny", revision=revision)
    return resolve_model(source, storage=s3_server.config, volume_root=tmp_path / "vol",
                         cache_dir=tmp_path / "cache", allow_hub=False)


def test_download_records_manifest_sha_as_revision(s3_server, s3_bucket, tmp_path, model_on_s3):
    src, digest = model_on_s3
    resolved = _resolve(s3_server, s3_bucket, tmp_path, revision=digest)
    assert resolved.revision == digest
    assert (resolved.path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_wrong_pin_is_refused(s3_server, s3_bucket, tmp_path, model_on_s3):
    with pytest.raises(ConfigError, match="does not match baseModel.revision"):
        _resolve(s3_server, s3_bucket, tmp_path, revision="0" * 64)


def test_corrupted_object_is_refused(s3_server, s3_bucket, tmp_path, model_on_s3):
    s3_bucket.put_bytes("models/tiny/model.safetensors", os.urandom(200_000))
    with pytest.raises(IntegrityError, match="model.safetensors: sha256 mismatch"):
        _resolve(s3_server, s3_bucket, tmp_path)


def test_model_without_manifest_is_refused(s3_server, s3_bucket, tmp_path):
    s3_bucket.put_bytes("models/tiny/config.json", b"{}")
    with pytest.raises(ConfigError, match="no manifest.json; upload models with `kubetune models import`"):
        _resolve(s3_server, s3_bucket, tmp_path)


def test_hub_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="hub downloads are not allowed"):
        resolve_model(BaseModelSource(uri="hf://org/model"), storage=None, volume_root=tmp_path,
                      cache_dir=tmp_path, allow_hub=False)


def test_dataset_from_s3_and_missing_dataset(s3_server, s3_bucket, tmp_path):
    s3_bucket.put_bytes("data/train.jsonl", b'{"text": "x"}\n')
    path = resolve_dataset(f"s3://{s3_bucket.bucket}/data/train.jsonl", storage=s3_server.config,
                           volume_root=tmp_path, cache_dir=tmp_path / "cache")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(b'{"text": "x"}\n').hexdigest()
    with pytest.raises(ConfigError, match="no such object"):
        resolve_dataset(f"s3://{s3_bucket.bucket}/data/nope.jsonl", storage=s3_server.config,
                        volume_root=tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="pvc://claim/none.jsonl: no such file on the claim"):
        resolve_dataset("pvc://claim/none.jsonl", storage=None, volume_root=tmp_path, cache_dir=tmp_path)


def test_dataset_prefix_of_shards_from_s3(s3_server, s3_bucket, tmp_path):
    s3_bucket.put_bytes("data/shards/part-0001.jsonl", b'{"text": "a"}\n')
    s3_bucket.put_bytes("data/shards/part-0000.jsonl", b'{"text": "b"}\n')
    s3_bucket.put_bytes("data/shards-old/part-0000.jsonl", b'{"text": "not this one"}\n')
    path = resolve_dataset(f"s3://{s3_bucket.bucket}/data/shards", storage=s3_server.config,
                           volume_root=tmp_path, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in path.iterdir()) == ["part-0000.jsonl", "part-0001.jsonl"]
    assert (path / "part-0001.jsonl").read_bytes() == b'{"text": "a"}\n'
