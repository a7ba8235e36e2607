"""Getting the base model and the dataset onto local disk, recording exactly what was used."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.finetunejob import BaseModelSource
from kubetune.api.uris import parse_uri
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import ObjectMissing, open_location
from kubetune.storage.manifest import MANIFEST, Manifest
from kubetune_trainer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    path: Path
    uri: str
    revision: str  # the pin that identifies these exact weights


def _cache_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def resolve_model(source: BaseModelSource, *, storage: StorageConfig | None, volume_root: Path, cache_dir: Path,
                  allow_hub: bool) -> ModelSource:
    uri = parse_uri(source.uri)
    if uri.scheme == "hf":
        return _from_hub(source, cache_dir, allow_hub)
    location = open_location(uri, storage=storage, volume_root=volume_root)
    try:
        raw = location.get_bytes(MANIFEST)
    except ObjectMissing:
        raw = None
    if uri.scheme == "pvc":
        path = volume_root / uri.authority / uri.path
        if not (path / "config.json").is_file():
            raise ConfigError(f"{source.uri}: no config.json (is the claim mounted and the path right?)")
        revision = hashlib.sha256(raw).hexdigest() if raw else "unpinned"
        _check_pin(source, revision)
        return ModelSource(path, source.uri, revision)
    if raw is None:
        raise ConfigError(f"{source.uri}: no {MANIFEST}; upload models with `kubetune models import`")
    revision = hashlib.sha256(raw).hexdigest()
    _check_pin(source, revision)
    manifest = Manifest.from_json(raw)
    target = cache_dir / "models" / f"{_cache_key(source.uri)}-{revision[:16]}"
    for entry in manifest.files:
        dest = target / entry.path
        if dest.exists() and dest.stat().st_size == entry.size:
            continue  # already downloaded and checked by an earlier attempt
        location.get_file(entry.path, dest, size=entry.size, sha256=entry.sha256)
    log.info("base model %s (manifest sha256 %s) in %s", source.uri, revision, target)
    return ModelSource(target, source.uri, revision)


def _check_pin(source: BaseModelSource, revision: str) -> None:
    if source.revision and source.revision != revision:
        raise ConfigError(f"{source.uri}: manifest sha256 {revision} does not match baseModel.revision "
                          f"{source.revision}")


def _from_hub(source: BaseModelSource, cache_dir: Path, allow_hub: bool) -> ModelSource:
    if not allow_hub or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"{source.uri}: hub downloads are not allowed for this job")
    from huggingface_hub import snapshot_download

    repo = source.uri.removeprefix("hf://")
    path = snapshot_download(repo, revision=source.revision, cache_dir=str(cache_dir / "hub"))
    return ModelSource(Path(path), source.uri, Path(path).name)


def resolve_dataset(uri_text: str, *, storage: StorageConfig | None, volume_root: Path, cache_dir: Path) -> Path:
    """The dataset on local disk: a file, or a directory holding the parts of a prefix of shards."""
    uri = parse_uri(uri_text)
    if uri.scheme == "hf":
        raise ConfigError(f"{uri_text}: hub datasets are not supported by this trainer; mirror it to s3:// or pvc://")
    if uri.scheme == "pvc":
        path = volume_root / uri.authority / uri.path
        if not path.exists():
            raise ConfigError(f"{uri_text}: no such file on the claim")
        return path
    parent_uri, _, name = str(uri).rpartition("/")
    location = open_location(parent_uri, storage=storage, volume_root=volume_root)
    dest = cache_dir / "datasets" / _cache_key(uri_text) / name
    try:
        location.get_file(name, dest)
        return dest
    except ObjectMissing:
        pass
    # A prefix of shards: its parts (the reader picks the data files among them, in name order).
    parts = [obj for obj in location.list(f"{name}/") if "/" not in obj.rel.removeprefix(f"{name}/")]
    if not parts:
        raise ConfigError(f"{uri_text}: no such object or prefix")
    for obj in parts:
        location.get_file(obj.rel, dest / obj.rel.removeprefix(f"{name}/"), size=obj.size)
    return dest
