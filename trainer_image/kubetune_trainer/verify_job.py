"""The verification Job a LoraAdapter runs once the operator has checked its manifest and listing:
stream every object the run manifest lists through sha256 and report, in the termination message,
the problems found and the listing's fingerprint (so the operator knows which objects were hashed).

The operator checks only what a listing shows (the manifest's sha256, each object's size): hashing
a merged 72B is about 145 GB of reads, which belongs in a pod sized for it, not in the operator."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kubetune.controller.artifacts import fingerprint
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import open_location
from kubetune.storage.manifest import MANIFEST, Manifest, verify

_MAX_PROBLEMS = 3000  # characters of problems in the termination message (the kubelet keeps 4096 bytes)


class VerifySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    artifact_uri: str = Field(alias="artifactUri", description="The run: manifest.json and the files it lists.")
    manifest_sha256: str = Field(alias="manifestSha256", description="The manifest the operator verified.")
    fingerprint: str = Field(default="", description="The listing the operator verified; reported back as found.")


def run_verify(spec: VerifySpec, storage: StorageConfig | None) -> dict[str, Any]:
    """The report: {"fingerprint", "files", "bytes", "problems"} (problems empty when the content
    matches). A manifest other than the one the operator verified is a problem too: what it lists
    is not what the operator vouched for."""
    volumes = Path(os.environ.get("KUBETUNE_VOLUME_ROOT", "/mnt/volumes"))
    location = open_location(spec.artifact_uri, storage=storage, volume_root=volumes)
    data = location.get_bytes(MANIFEST)
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.manifest_sha256:
        return {"fingerprint": "", "files": 0, "bytes": 0,
                "problems": f"{MANIFEST}: sha256 {digest} is not the verified {spec.manifest_sha256}"}
    manifest = Manifest.from_json(data)
    # Listed before hashing: if an object is rewritten while it is read, the fingerprint the
    # operator compares no longer matches, and what was hashed is not taken as verified.
    found = fingerprint(digest, manifest.files, location.list())
    problems = verify(location, manifest)
    message = "; ".join(problems)
    if len(message) > _MAX_PROBLEMS:
        message = message[:_MAX_PROBLEMS] + f" ... ({len(problems)} problems in all)"
    return {"fingerprint": found, "files": len(manifest.files), "bytes": manifest.total_size, "problems": message}


def load(path: Path) -> VerifySpec:
    return VerifySpec.model_validate(json.loads(path.read_text()))
