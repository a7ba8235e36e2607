"""What the trainer is given: the FineTuneJob spec plus what the operator resolved for this run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.finetunejob import FineTuneJobSpec


class RunInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: str = "default"
    job_name: str = "local"
    attempt: int = Field(default=0, ge=0)
    output_uri: str = Field(description="Where this run writes: the spec's output URI plus the run's own prefix.")
    # The pod's directories: from its environment (the Job sets them), or these defaults.
    volume_root: str = Field(default_factory=lambda: os.environ.get("KUBETUNE_VOLUME_ROOT", "/mnt/volumes"),
                             description="pvc://CLAIM/... is mounted at volume_root/CLAIM.")
    work_dir: str = Field(default_factory=lambda: os.environ.get("KUBETUNE_WORK_DIR", "/tmp/kubetune"),
                          description="Local scratch: checkpoints before upload, merges.")
    cache_dir: str = Field(default_factory=lambda: os.environ.get("KUBETUNE_CACHE_DIR", "/tmp/kubetune-cache"),
                           description="Downloaded models and datasets.")
    image: str | None = None
    progress_file: str | None = Field(default=None, description="Also write progress JSON here (local runs).")
    progress_interval_s: float = Field(default=5.0, gt=0)


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: FineTuneJobSpec
    run: RunInfo

    @classmethod
    def load(cls, path: Path) -> RunSpec:
        return cls.model_validate(json.loads(path.read_text()))
