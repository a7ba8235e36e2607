"""The merge Job a LoraAdapter asks for (spec.merge): download the base model and the adapter the
run manifest lists (sizes and sha256 checked), merge them into a full-precision copy of the base,
and publish it under ARTIFACT/merged/ with its own manifest, written last."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.finetunejob import BaseModelSource
from kubetune.contract import MERGED_DIR
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import open_location
from kubetune.storage.manifest import MANIFEST, Manifest, describe_dir, publish, read_manifest
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.modeling import merge_adapter
from kubetune_trainer.sources import resolve_model

log = logging.getLogger(__name__)


class MergeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    base_model: BaseModelSource = Field(alias="baseModel")
    artifact_uri: str = Field(alias="artifactUri", description="The run: manifest.json and adapter/.")
    dtype: Literal["bfloat16", "float32"] | None = Field(default=None, description="bf16 on a GPU, fp32 on the CPU.")


def run_merge(spec: MergeSpec) -> tuple[str, str]:
    """Returns the merged manifest's URI and sha256."""
    volumes = Path(os.environ.get("KUBETUNE_VOLUME_ROOT", "/mnt/volumes"))
    work = Path(os.environ.get("KUBETUNE_WORK_DIR", "/tmp/kubetune"))
    cache = Path(os.environ.get("KUBETUNE_CACHE_DIR", "/tmp/kubetune-cache"))
    uris = (spec.base_model.uri, spec.artifact_uri)
    storage = StorageConfig.from_env() if any(u.startswith("s3://") for u in uris) else None
    source = resolve_model(spec.base_model, storage=storage, volume_root=volumes, cache_dir=cache, allow_hub=False)
    artifact = open_location(spec.artifact_uri, storage=storage, volume_root=volumes)
    run = read_manifest(artifact)
    layout = run.metadata.get("layout") or {}
    prefix = (layout.get("adapter") or "adapter").rstrip("/") + "/"
    adapter_files = [f for f in run.files if f.path.startswith(prefix)]
    if not adapter_files:
        raise ConfigError(f"{spec.artifact_uri}/{MANIFEST} lists no {prefix} files")
    adapter_dir, out_dir = work / "adapter", work / MERGED_DIR
    shutil.rmtree(out_dir, ignore_errors=True)
    for entry in adapter_files:
        artifact.get_file(entry.path, adapter_dir / entry.path[len(prefix):], size=entry.size, sha256=entry.sha256)
    dtype = getattr(torch, spec.dtype or ("bfloat16" if torch.cuda.is_available() else "float32"))
    log.info("merging %s into %s (%s)", spec.artifact_uri, spec.base_model.uri, dtype)
    merge_adapter(source.path, adapter_dir, out_dir, dtype)
    manifest = Manifest("ModelManifest", describe_dir(out_dir), {"mergedFrom": {
        "artifactUri": spec.artifact_uri, "baseModelUri": source.uri, "baseModelRevision": source.revision,
        "dtype": str(dtype).removeprefix("torch.")}})
    target = artifact.child(MERGED_DIR)
    digest = publish(target, manifest, out_dir)
    log.info("published %s/%s (sha256 %s)", target.uri, MANIFEST, digest)
    return f"{target.uri}/{MANIFEST}", digest


def load(path: Path) -> MergeSpec:
    return MergeSpec.model_validate(json.loads(path.read_text()))
