"""The merge Job a LoraAdapter asks for (spec.merge): download the base model and the adapter the
run manifest lists (sizes and sha256 checked), merge them into a full-precision copy of the base,
write its GGUF files when asked (spec.merge.gguf), and publish it all under ARTIFACT/merged/ with
its own manifest, written last."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.finetunejob import BaseModelSource, GgufType
from kubetune.contract import GGUF_DIR, MERGED_DIR
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
    gguf: list[GgufType] = Field(default_factory=list, description="GGUF types to write under merged/gguf/.")
    name: str = Field(default="model", description="The Ollama model name in the GGUF export's record.")


def run_merge(spec: MergeSpec) -> tuple[str, str, dict[str, Any] | None]:
    """Returns the merged manifest's URI and sha256, and its record of the GGUF export (if asked for)."""
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
    metadata: dict[str, Any] = {"mergedFrom": {
        "artifactUri": spec.artifact_uri, "baseModelUri": source.uri, "baseModelRevision": source.revision,
        "dtype": str(dtype).removeprefix("torch.")}}
    if spec.gguf:
        metadata["gguf"] = _export_gguf(out_dir, adapter_dir, spec)
    manifest = Manifest("ModelManifest", describe_dir(out_dir), metadata)
    target = artifact.child(MERGED_DIR)
    digest = publish(target, manifest, out_dir)
    log.info("published %s/%s (sha256 %s)", target.uri, MANIFEST, digest)
    return f"{target.uri}/{MANIFEST}", digest, metadata.get("gguf")


def _export_gguf(merged_dir: Path, adapter_dir: Path, spec: MergeSpec) -> dict[str, Any]:
    """merged/gguf/, recorded in the merged manifest; a model GGUF cannot be written for is
    recorded there too, and the merged model is published all the same (as the trainer does)."""
    from kubetune_trainer.gguf_export import GGUFExportError, export_folder

    try:
        return export_folder(merged_dir, adapter_dir, merged_dir / GGUF_DIR, list(dict.fromkeys(spec.gguf)),
                             spec.name)
    except GGUFExportError as exc:
        log.warning("no GGUF files: %s", exc)
        shutil.rmtree(merged_dir / GGUF_DIR, ignore_errors=True)
        return {"error": str(exc)}


def load(path: Path) -> MergeSpec:
    return MergeSpec.model_validate(json.loads(path.read_text()))
