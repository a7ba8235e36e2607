"""Manifests: the list of files (size, sha256) that makes a set of objects a published whole.

Publication uploads every file first and the manifest last, so a reader that trusts only what
a manifest lists never sees half a checkpoint or half an adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.meta import API_VERSION, now_rfc3339
from kubetune.storage.location import Location, ObjectInfo, ObjectMissing, sha256_file

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    kind: str  # RunManifest, CheckpointManifest, ModelManifest
    files: list[FileEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=now_rfc3339)

    def to_json(self) -> bytes:
        body = {"apiVersion": API_VERSION, "kind": self.kind, "createdAt": self.created_at,
                "files": [asdict(f) for f in self.files], **self.metadata}
        return json.dumps(body, indent=2, sort_keys=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        body = json.loads(data)
        files = [FileEntry(**f) for f in body.pop("files")]
        kind, created = body.pop("kind"), body.pop("createdAt", "")
        body.pop("apiVersion", None)
        return cls(kind=kind, files=files, metadata=body, created_at=created)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def describe_dir(local_dir: Path, under: str = "") -> list[FileEntry]:
    return [FileEntry(f"{under}/{p.relative_to(local_dir)}".lstrip("/"), p.stat().st_size, sha256_file(p))
            for p in sorted(local_dir.rglob("*")) if p.is_file()]


def upload_entries(location: Location, entries: list[FileEntry], local_root: Path) -> None:
    for entry in entries:
        location.put_file(entry.path, local_root / entry.path)


def publish(location: Location, manifest: Manifest, local_root: Path, name: str = MANIFEST) -> str:
    """Upload the manifest's files from local_root, then the manifest; returns the manifest's sha256."""
    upload_entries(location, manifest.files, local_root)
    data = manifest.to_json()
    location.put_bytes(name, data)
    return hashlib.sha256(data).hexdigest()


def read_manifest(location: Location, name: str = MANIFEST) -> Manifest:
    return Manifest.from_json(location.get_bytes(name))


def listing_problems(manifest: Manifest, listing: list[ObjectInfo]) -> list[str]:
    """What one listing shows wrong with the objects a manifest lists: missing, or of another size.

    ETags are not compared with the manifest: an ETag is the MD5 of the content only for a
    single-part upload without SSE-KMS; a multipart upload's is a digest of its parts' MD5s, which
    depends on the part size, so a faithful copy made by another tool (or with another part size)
    would differ while its content is right. The ETags a listing reports are kept instead as the
    artifact's fingerprint: a later listing that differs says something was rewritten."""
    present = {o.rel: o.size for o in listing}
    problems: list[str] = []
    for entry in manifest.files:
        if entry.path not in present:
            problems.append(f"{entry.path}: missing")
        elif present[entry.path] != entry.size:
            problems.append(f"{entry.path}: size {present[entry.path]} != {entry.size}")
    return problems


def verify(location: Location, manifest: Manifest) -> list[str]:
    """Problems with the objects a manifest lists: missing or wrong size (from one listing), then
    wrong sha256 (each object streamed through the digest, never written to disk)."""
    problems = listing_problems(manifest, location.list())
    if problems:
        return problems
    for entry in manifest.files:
        try:
            if location.sha256(entry.path) != entry.sha256:
                problems.append(f"{entry.path}: sha256 mismatch")
        except ObjectMissing:
            problems.append(f"{entry.path}: missing")
    return problems
