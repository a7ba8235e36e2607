"""Storage over a real S3 server and a local directory, through the code path production uses."""

from __future__ import annotations

import hashlib
import os

import pytest

from kubetune.storage.config import StorageConfig, StorageConfigError
from kubetune.storage.location import IntegrityError, LocalLocation, ObjectMissing, S3Location, PART_SIZE
from kubetune.storage.client import make_client
from kubetune.storage.manifest import Manifest, describe_dir, listing_problems, publish, read_manifest, verify


@pytest.fixture(params=["s3", "local"])
def location(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket").child("runs/job-a")
    return LocalLocation(tmp_path / "volume" / "runs" / "job-a")


def test_multipart_round_trip_keeps_sha256(s3_bucket, tmp_path):
    payload = os.urandom(PART_SIZE * 2 + 12345)  # three parts
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    s3_bucket.put_file("model/big.bin", src)
    dest = tmp_path / "back.bin"
    s3_bucket.get_file("model/big.bin", dest, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert s3_bucket.sha256("model/big.bin") == hashlib.sha256(payload).hexdigest()  # streamed, no file


def test_download_resumes_from_partial_file(s3_bucket, tmp_path):
    payload = os.urandom(3 * 1024 * 1024)
    s3_bucket.put_bytes("x.bin", payload)
    dest = tmp_path / "x.bin"
    dest.with_name("x.bin.part").write_bytes(payload[:1_000_000])  # as left by an interrupted download
    s3_bucket.get_file("x.bin", dest, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload


def test_corrupt_partial_is_refused_and_discarded(s3_bucket, tmp_path):
    payload = os.urandom(100_000)
    s3_bucket.put_bytes("x.bin", payload)
    dest = tmp_path / "x.bin"
    dest.with_name("x.bin.part").write_bytes(b"garbage" * 10)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        s3_bucket.get_file("x.bin", dest, sha256=hashlib.sha256(payload).hexdigest())
    assert not dest.with_name("x.bin.part").exists()


def test_missing_object(location, tmp_path):
    with pytest.raises(ObjectMissing):
        location.get_bytes("nope.json")
    with pytest.raises(ObjectMissing):
        location.get_file("nope.bin", tmp_path / "n")


def test_publish_then_verify(location, tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(os.urandom(5000))
    manifest = Manifest("RunManifest", describe_dir(src, "adapter"), {"metrics": {"evalLoss": 1.0}})
    publish(location, manifest, tmp_path)
    back = read_manifest(location)
    assert back.files == manifest.files and back.metadata["metrics"] == {"evalLoss": 1.0}
    assert verify(location, back) == []
    location.put_bytes("adapter/adapter_model.safetensors", os.urandom(5000))  # same size, other bytes
    assert verify(location, back) == ["adapter/adapter_model.safetensors: sha256 mismatch"]
    location.put_bytes("adapter/adapter_model.safetensors", os.urandom(4999))
    assert listing_problems(back, location.list()) == ["adapter/adapter_model.safetensors: size 4999 != 5000"]
    location.delete_prefix("adapter")
    assert verify(location, back) == ["adapter/adapter_config.json: missing",
                                      "adapter/adapter_model.safetensors: missing"]


def test_list_and_delete_prefix(location):
    for name in ("checkpoints/checkpoint-1/a", "checkpoints/checkpoint-2/a", "manifest.json"):
        location.put_bytes(name, b"x")
    assert [o.rel for o in location.list("checkpoints")] == ["checkpoints/checkpoint-1/a", "checkpoints/checkpoint-2/a"]
    assert location.delete_prefix("checkpoints/checkpoint-1") == 1
    assert [o.rel for o in location.list()] == ["checkpoints/checkpoint-2/a", "manifest.json"]


def test_delete_keys_removes_exactly_those_keys(location):
    for name in ("manifest.json", "adapter/a", "adapter/b", "adapter/b.bak"):
        location.put_bytes(name, b"x")
    assert location.delete_keys(["manifest.json", "adapter/b", "adapter/gone"]) == 2
    assert [o.rel for o in location.list()] == ["adapter/a", "adapter/b.bak"]


def test_a_rewritten_object_lists_with_another_etag(location):
    location.put_bytes("adapter/a", b"one")
    before = location.list()[0].etag
    location.put_bytes("adapter/a", b"two")
    assert before and location.list()[0].etag != before


def test_local_location_refuses_escape(tmp_path):
    with pytest.raises(ValueError, match="escapes"):
        LocalLocation(tmp_path / "a").put_bytes("../b", b"x")


def test_wrong_credentials_are_refused(s3_server, s3_bucket):
    bad = StorageConfig(endpoint=s3_server.config.endpoint, access_key="kubetune-test", secret_key="wrong",
                        secure=False)
    location = S3Location(make_client(bad), s3_bucket.bucket, "")
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        location.put_bytes("x", b"x")


def test_config_from_secret_names_missing_keys():
    with pytest.raises(StorageConfigError, match="Secret minio lacks accessKey, secretKey"):
        StorageConfig.from_secret({"stringData": {"endpoint": "minio:9000"}}, "minio")


def test_config_never_prints_secrets():
    config = StorageConfig.from_mapping({"endpoint": "https://minio:9000", "accessKey": "AK",
                                         "secretKey": "PLANTED-SECRET-42"}, "test")
    assert config.secure and config.endpoint == "minio:9000"
    assert "PLANTED-SECRET-42" not in repr(config)


def test_a_bucket_created_by_a_concurrent_run_is_ready(s3_bucket):
    # Two pods starting together both see no bucket; the one that creates it second must not fail.
    s3_bucket._make_bucket()
    s3_bucket.ensure_ready()
    assert s3_bucket.client.bucket_exists(s3_bucket.bucket)
