"""The object store goes away in the middle of a publication: a short outage is retried through,
a long one fails the publication, and in neither case does a reader see half of it (the manifest
is written last and readers trust only what a manifest lists)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from kubetune.local.s3server import S3Server
from kubetune.storage.client import StorageUnavailable, make_client
from kubetune.storage.location import ObjectMissing, S3Location
from kubetune.storage.manifest import Manifest, describe_dir, publish, read_manifest, verify


class _OnRetry(logging.Handler):
    def __init__(self, event: threading.Event):
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.event.set()


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own, since it is stopped and started again."""
    server = S3Server(tmp_path / "s3", tmp_path / "weed.log")
    server.start()
    yield server
    server.stop()


def _run_dir(root, files: int = 40):
    for i in range(files):
        (root / f"part-{i:02d}.bin").parent.mkdir(parents=True, exist_ok=True)
        (root / f"part-{i:02d}.bin").write_bytes(os.urandom(2 << 20))
    return Manifest("RunManifest", describe_dir(root))


def _publish_in_background(location, manifest, root):
    outcome: dict = {}

    def work():
        try:
            outcome["sha256"] = publish(location, manifest, root)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc
    thread = threading.Thread(target=work)
    thread.start()
    return thread, outcome


def _stop_after_first_object(server, location):
    probe = S3Location(make_client(server.config, connect_timeout=1, read_timeout=5), location.bucket, location.prefix)
    deadline = time.monotonic() + 30
    while not probe.list() and time.monotonic() < deadline:
        time.sleep(0.02)
    server.stop()


@pytest.mark.parametrize("outage", ["short", "long"])
def test_publication_through_an_outage(own_server, tmp_path, outage):
    location = S3Location(make_client(own_server.config), "outage", "run",
                          retry_budget_s=60 if outage == "short" else 3)
    location.ensure_ready()
    manifest = _run_dir(tmp_path / "run")
    thread, outcome = _publish_in_background(location, manifest, tmp_path / "run")
    retried = threading.Event()
    watcher = _OnRetry(retried)
    logging.getLogger("kubetune.storage.client").addHandler(watcher)
    try:
        _stop_after_first_object(own_server, location)
        assert "sha256" not in outcome, "the publication finished before the outage: nothing was tested"
        if outage == "short":
            assert retried.wait(30), "the publisher never retried"
            own_server.start()  # back after at least one failed attempt
        thread.join(120)
    finally:
        logging.getLogger("kubetune.storage.client").removeHandler(watcher)
    if outage == "long":
        assert isinstance(outcome.get("error"), StorageUnavailable)
        own_server.start()
        with pytest.raises(ObjectMissing):  # no manifest: readers see nothing of the half-uploaded run
            read_manifest(location)
        assert 0 < len(location.list()) < len(manifest.files)  # the files that did land stay unlisted
    else:
        assert "error" not in outcome, outcome.get("error")
        published = read_manifest(location)
        assert len(published.files) == len(manifest.files)
        assert verify(location, published) == []
