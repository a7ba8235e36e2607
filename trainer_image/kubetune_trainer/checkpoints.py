"""Checkpoints at the output location: uploaded file by file, made complete by a manifest written last.

The Trainer saves a checkpoint locally; `CheckpointStore.push` copies it to the output location
and writes `checkpoints/checkpoint-N/checkpoint.json` last. A restarted run resumes from the newest
checkpoint that has that manifest, so a checkpoint interrupted mid-upload is never used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from kubetune.storage.location import Location, ObjectMissing
from kubetune.storage.manifest import Manifest, describe_dir, publish, read_manifest
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.sharding import FSDP_OPTIMIZER_STATE

log = logging.getLogger(__name__)
CHECKPOINT_MANIFEST = "checkpoint.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointStore:
    def __init__(self, output: Location, keep: int):
        self.location = output.child("checkpoints")
        self.keep = keep

    def complete_steps(self) -> list[int]:
        steps = set()
        for obj in self.location.list():
            folder, _, name = obj.rel.partition("/")
            match = _NAME.match(folder)
            if match and name == CHECKPOINT_MANIFEST:
                steps.add(int(match.group(1)))
        return sorted(steps)

    def push(self, local_dir: Path, step: int) -> str:
        name = f"checkpoint-{step}"
        manifest = Manifest("CheckpointManifest", describe_dir(local_dir), {"step": step})
        publish(self.location.child(name), manifest, local_dir, CHECKPOINT_MANIFEST)
        self._prune()
        return f"{self.location.uri}/{name}"

    def _prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[: -self.keep]:
            self.location.delete_prefix(f"checkpoint-{step}")
        # Leftovers of uploads that died before their manifest, older than the newest complete one.
        newest = complete[-1] if complete else None
        for obj in self.location.list():
            match = _NAME.match(obj.rel.partition("/")[0])
            if match and newest is not None and int(match.group(1)) < newest and int(match.group(1)) not in complete:
                self.location.delete_prefix(obj.rel.partition("/")[0])

    def pull_latest(self, work_dir: Path) -> tuple[Path, str] | None:
        """Download the newest complete checkpoint; None when there is none."""
        for step in reversed(self.complete_steps()):
            name = f"checkpoint-{step}"
            source = self.location.child(name)
            try:
                manifest = read_manifest(source, CHECKPOINT_MANIFEST)
                target = work_dir / name
                for entry in manifest.files:
                    source.get_file(entry.path, target / entry.path, size=entry.size, sha256=entry.sha256)
                return target, f"{self.location.uri}/{name}"
            except (ObjectMissing, ValueError) as exc:
                log.warning("checkpoint %s unusable (%s); trying an older one", name, exc)
        return None


def check_resumable(local_dir: Path, *, sharded: bool) -> None:
    """A checkpoint resumes at any GPU count, but only in the mode that wrote it: FSDP keys its
    optimizer state by parameter name, DDP by position, and transformers loads each one only in its
    own mode. The planner picks the mode from the memory per GPU, so a change of GPU type can switch it."""
    written_sharded = (local_dir / FSDP_OPTIMIZER_STATE).exists()
    if written_sharded != sharded:
        def mode(s: bool) -> str:
            return "sharded (FSDP)" if s else "unsharded (one copy of the model per GPU)"
        raise ConfigError(
            f"{local_dir.name} was written by a {mode(written_sharded)} run but this run is planned "
            f"{mode(sharded)}; resume it on GPUs like the ones that wrote it (resources.gpus, "
            f"resources.gpuMemoryGiB), or delete the checkpoints to start over")
