"""Preloading base models into the object store (`kubetune models import`), for air-gapped clusters:
the files, then a ModelManifest listing them, whose sha256 is the revision a FineTuneJob can pin."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.storage.config import StorageConfig
from kubetune.storage.location import open_location
from kubetune.storage.manifest import Manifest, describe_dir, publish

REQUIRED_FILES = ("config.json",)


def import_model(local_dir: Path, uri: str, storage: StorageConfig | None, *, volume_root: Path = Path("/")) -> str:
    """Upload a transformers model directory; returns the manifest's sha256 (baseModel.revision)."""
    missing = [f for f in REQUIRED_FILES if not (local_dir / f).is_file()]
    if missing:
        raise ValueError(f"{local_dir} is not a transformers model directory: no {', '.join(missing)}")
    config = json.loads((local_dir / "config.json").read_text())
    location = open_location(uri, storage=storage, volume_root=volume_root)
    location.ensure_ready()
    manifest = Manifest("ModelManifest", describe_dir(local_dir), {
        "model": {"architectures": config.get("architectures"), "modelType": config.get("model_type")}})
    return publish(location, manifest, local_dir)
