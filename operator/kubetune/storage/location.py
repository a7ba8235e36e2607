"""A place that holds a run's files: an S3 prefix or a directory on a mounted volume.

Both speak the same small interface so the trainer's checkpointing and publication, and the
operator's verification, have one code path whatever the spec's URI scheme.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from kubetune.api.uris import StorageUri, parse_uri
from kubetune.storage.client import make_client, with_retries
from kubetune.storage.config import StorageConfig

PART_SIZE = 16 * 1024 * 1024
_CHUNK = 1024 * 1024


class ObjectMissing(FileNotFoundError):
    pass


class IntegrityError(ValueError):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    rel: str
    size: int
    etag: str = ""  # changes whenever the object is rewritten: a cheap "has it changed" check


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check(path: Path, what: str, size: int | None, sha256: str | None) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise IntegrityError(f"{what}: size {actual} != expected {size}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise IntegrityError(f"{what}: sha256 mismatch")


class Location(Protocol):
    uri: str

    def child(self, rel: str) -> Location: ...
    def ensure_ready(self) -> None: ...
    def put_file(self, rel: str, path: Path) -> None: ...
    def put_bytes(self, rel: str, data: bytes) -> None: ...
    def get_bytes(self, rel: str) -> bytes: ...
    def get_file(self, rel: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> None: ...
    def sha256(self, rel: str) -> str: ...
    def list(self, rel_prefix: str = "") -> list[ObjectInfo]: ...
    def delete_prefix(self, rel_prefix: str) -> int: ...
    # builtins.list: in a class body that defines list(), `list` names the method
    def delete_keys(self, rels: builtins.list[str]) -> int: ...


def _rel_join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class LocalLocation:
    """A directory, e.g. a PVC mounted into the pod. Writes are atomic renames."""

    def __init__(self, root: Path, uri: str | None = None):
        self.root = root
        self.uri = uri or str(root)

    def _path(self, rel: str) -> Path:
        path = (self.root / rel).resolve()
        if path != self.root.resolve() and self.root.resolve() not in path.parents:
            raise ValueError(f"{rel!r} escapes {self.uri}")
        return path

    def ensure_ready(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def child(self, rel: str) -> LocalLocation:
        return LocalLocation(self._path(rel), f"{self.uri.rstrip('/')}/{rel.strip('/')}")

    def _atomic_write(self, rel: str, write) -> None:
        target = self._path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, rel: str, path: Path) -> None:
        self._atomic_write(rel, lambda fh: shutil.copyfileobj(open(path, "rb"), fh, _CHUNK))

    def put_bytes(self, rel: str, data: bytes) -> None:
        self._atomic_write(rel, lambda fh: fh.write(data))

    def get_bytes(self, rel: str) -> bytes:
        try:
            return self._path(rel).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectMissing(f"{self.uri}/{rel}") from exc

    def get_file(self, rel: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> None:
        source = self._path(rel)
        if not source.is_file():
            raise ObjectMissing(f"{self.uri}/{rel}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        _check(dest, f"{self.uri}/{rel}", size, sha256)

    def sha256(self, rel: str) -> str:
        source = self._path(rel)
        if not source.is_file():
            raise ObjectMissing(f"{self.uri}/{rel}")
        return sha256_file(source)

    def list(self, rel_prefix: str = "") -> list[ObjectInfo]:
        base = self._path(rel_prefix) if rel_prefix else self.root
        if not base.exists():
            return []
        found = [ObjectInfo(str(p.relative_to(self.root)), p.stat().st_size, str(p.stat().st_mtime_ns))
                 for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return sorted(found, key=lambda o: o.rel)

    def delete_prefix(self, rel_prefix: str) -> int:
        target = self._path(rel_prefix)
        count = len(self.list(rel_prefix))
        shutil.rmtree(target, ignore_errors=True)
        return count

    def delete_keys(self, rels: builtins.list[str]) -> int:
        """Exactly these files, in this order; those already gone are not counted."""
        removed = 0
        for rel in rels:
            path = self._path(rel)
            if path.is_file():
                path.unlink()
                removed += 1
        return removed


class S3Location:
    """A key prefix in a bucket."""

    def __init__(self, client: Minio, bucket: str, prefix: str, *, retry_budget_s: float = 120):
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.retry_budget_s = retry_budget_s
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, rel: str) -> str:
        return _rel_join(self.prefix, rel)

    def _retry(self, what: str, op):
        return with_retries(what, op, budget_s=self.retry_budget_s)

    def child(self, rel: str) -> S3Location:
        return S3Location(self.client, self.bucket, self._key(rel), retry_budget_s=self.retry_budget_s)

    def ensure_ready(self) -> None:
        """Create the bucket if it does not exist."""
        if not self._retry(f"check bucket {self.bucket}", lambda: self.client.bucket_exists(self.bucket)):
            self._retry(f"create bucket {self.bucket}", self._make_bucket)

    def _make_bucket(self) -> None:
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as exc:
            # Runs starting together race to create a shared bucket: whoever loses finds it made.
            if exc.code != "BucketAlreadyOwnedByYou":
                raise

    def put_file(self, rel: str, path: Path) -> None:
        key = self._key(rel)
        # A multipart upload becomes visible only when completed, so a retry never exposes half an object.
        self._retry(f"upload {self.uri}/{rel}",
            lambda: self.client.fput_object(self.bucket, key, str(path), part_size=PART_SIZE))

    def put_bytes(self, rel: str, data: bytes) -> None:
        key = self._key(rel)
        self._retry(f"upload {self.uri}/{rel}",
            lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data)))

    def _missing(self, exc: S3Error, rel: str) -> Exception:
        if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
            return ObjectMissing(f"{self.uri}/{rel}")
        return exc

    def get_bytes(self, rel: str) -> bytes:
        def fetch() -> bytes:
            response = self.client.get_object(self.bucket, self._key(rel))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        try:
            return self._retry(f"download {self.uri}/{rel}", fetch)
        except S3Error as exc:
            raise self._missing(exc, rel) from exc

    def get_file(self, rel: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> None:
        """Download with resume: an interrupted transfer continues from the bytes already on disk."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        key = self._key(rel)

        def fetch_rest() -> None:
            offset = part.stat().st_size if part.exists() else 0
            if size is not None and offset >= size:
                return
            response = self.client.get_object(self.bucket, key, offset=offset)
            try:
                with open(part, "ab") as fh:
                    for block in response.stream(_CHUNK):
                        fh.write(block)
            finally:
                response.close()
                response.release_conn()

        try:
            self._retry(f"download {self.uri}/{rel}", fetch_rest)
        except S3Error as exc:
            if exc.code == "InvalidRange" and part.exists():
                pass  # the .part file already holds the whole object
            else:
                raise self._missing(exc, rel) from exc
        try:
            _check(part, f"{self.uri}/{rel}", size, sha256)
        except IntegrityError:
            part.unlink(missing_ok=True)  # a corrupt partial must not be resumed from
            raise
        os.replace(part, dest)

    def sha256(self, rel: str) -> str:
        """The object's sha256, streamed: nothing is written to disk and memory stays one chunk."""
        def stream() -> str:
            # A retry starts the digest again: it cannot resume from a hash state.
            digest = hashlib.sha256()
            response = self.client.get_object(self.bucket, self._key(rel))
            try:
                for block in response.stream(_CHUNK):
                    digest.update(block)
            finally:
                response.close()
                response.release_conn()
            return digest.hexdigest()
        try:
            return self._retry(f"download {self.uri}/{rel}", stream)
        except S3Error as exc:
            raise self._missing(exc, rel) from exc

    def list(self, rel_prefix: str = "") -> list[ObjectInfo]:
        base = self._key(rel_prefix)
        prefix = base + "/" if base else ""

        def fetch() -> list[ObjectInfo]:
            return [ObjectInfo(o.object_name[len(self.prefix) + 1 if self.prefix else 0:], o.size,
                               (o.etag or "").strip('"'))
                    for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        try:
            return sorted(self._retry(f"list {self.uri}/{rel_prefix}", fetch), key=lambda o: o.rel)
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                return []
            raise

    def delete_prefix(self, rel_prefix: str) -> int:
        objects = self.list(rel_prefix)
        if objects:
            errors = self._retry(f"delete {self.uri}/{rel_prefix}", lambda: list(self.client.remove_objects(
                self.bucket, [DeleteObject(self._key(o.rel)) for o in objects])))
            if errors:
                raise RuntimeError(f"could not delete {len(errors)} object(s) under {self.uri}/{rel_prefix}")
        return len(objects)

    def delete_keys(self, rels: builtins.list[str]) -> int:
        """Exactly these keys, in one batch (S3 deletes of absent keys succeed); the count of those
        that existed."""
        present = {o.rel for o in self.list()}
        wanted = [r for r in rels if r in present]
        if wanted:
            errors = self._retry(f"delete {len(wanted)} object(s) under {self.uri}", lambda: list(
                self.client.remove_objects(self.bucket, [DeleteObject(self._key(r)) for r in wanted])))
            if errors:
                raise RuntimeError(f"could not delete {len(errors)} object(s) under {self.uri}: "
                                   + ", ".join(str(e.name) for e in errors[:5]))
        return len(wanted)


def open_location(uri: str | StorageUri, *, storage: StorageConfig | None, volume_root: Path,
                  retry_budget_s: float = 120) -> Location:
    """The Location for a spec URI. pvc://claim/path is the claim mounted at volume_root/claim."""
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.scheme == "pvc":
        return LocalLocation(volume_root / parsed.authority / parsed.path, str(parsed))
    if parsed.scheme == "s3":
        if storage is None:
            raise ValueError(f"{parsed} needs object-store credentials (storage.secretRef)")
        return S3Location(make_client(storage), parsed.authority, parsed.path, retry_budget_s=retry_budget_s)
    raise ValueError(f"{parsed}: {parsed.scheme}:// is not a storage location")
