"""`kubetune-trainer`: run a fine-tune from a spec file, merge an adapter into its base, or verify an
adapter's content."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from kubetune.contract import EXIT_CONFIG, EXIT_DATA, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_UNAVAILABLE
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.config import StorageConfigError
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.records import DatasetError

log = logging.getLogger("kubetune.trainer")
TERMINATION_LOG = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
_MAX_MESSAGE = 3800  # the kubelet keeps 4096 bytes of a termination message


def write_termination_message(body: dict) -> None:
    """The final word the operator reads from the Pod's status (works for pvc:// outputs too)."""
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > _MAX_MESSAGE and "error" in body:
        body["error"]["message"] = body["error"]["message"][:1500] + " ..."
        text = json.dumps(body, separators=(",", ":"))
    try:
        TERMINATION_LOG.write_text(text[:_MAX_MESSAGE])
    except OSError:
        pass  # outside a pod there is no termination log


def _failure(reason: str, exc: BaseException, code: int) -> int:
    log.error("%s: %s", reason, exc)
    write_termination_message({"error": {"reason": reason, "message": str(exc)}})
    return code


def _at_process_boundary(work: Callable[[], int], failed_as: str) -> int:
    """Run the container's work; what it raises becomes the termination message and the exit code
    the operator's contract gives it (bad data and bad configuration fail the Job at once)."""
    try:
        return work()
    except DatasetError as exc:
        return _failure("InvalidDataset", exc, EXIT_DATA)
    except (ConfigError, StorageConfigError, ValidationError) as exc:
        return _failure("InvalidConfiguration", exc, EXIT_CONFIG)
    except StorageUnavailable as exc:
        return _failure("StorageUnavailable", exc, EXIT_UNAVAILABLE)
    except Exception as exc:
        log.exception("%s", failed_as)
        return _failure(failed_as, exc, EXIT_FAILED)


def run_spec(path: Path) -> int:
    from kubetune_trainer import distributed, launch
    from kubetune_trainer.recipe import FineTuneRecipe
    from kubetune_trainer.runspec import RunSpec

    def train() -> int:
        runspec = RunSpec.load(path)
        if launch.needs_launcher(runspec.spec.resources):
            return launch.launch(runspec.spec.resources, path)
        ranks = distributed.init_from_env()
        try:
            result = FineTuneRecipe(runspec, ranks=ranks).run()
        finally:
            distributed.shutdown(ranks)
        if result.preempted:
            if ranks.is_main:
                write_termination_message({"preempted": True})
            return EXIT_PREEMPTED
        if ranks.is_main:  # the other workers of this pod share its termination log
            final = result.metrics.get("final", {})
            keys = (("rewardAccuracy", "rewardMargin", "preferenceAccuracy") if runspec.spec.objective.type == "dpo"
                    else ("evalLoss", "exactMatch", "jsonValid"))
            write_termination_message({"manifest": result.manifest_uri, "manifestSha256": result.manifest_sha256,
                                       "metrics": {k: final.get(k) for k in keys}})
        return EXIT_OK
    return _at_process_boundary(train, "TrainerError")


def run_merge_job(path: Path) -> int:
    from kubetune_trainer.merge_job import load, run_merge

    def merge() -> int:
        uri, digest, gguf = run_merge(load(path))
        # The GGUF record too: the operator reads no pvc:// claim, so this is what it learns of them.
        write_termination_message({"manifest": uri, "manifestSha256": digest, **({"gguf": gguf} if gguf else {})})
        return EXIT_OK
    return _at_process_boundary(merge, "MergeError")


def run_verify_job(path: Path) -> int:
    from kubetune.storage.config import StorageConfig
    from kubetune_trainer.verify_job import load, run_verify

    def check() -> int:
        spec = load(path)
        storage = StorageConfig.from_env() if spec.artifact_uri.startswith("s3://") else None
        # Found problems are the verification's result, not its failure: exit 0, report them.
        write_termination_message(run_verify(spec, storage))
        return EXIT_OK
    return _at_process_boundary(check, "VerifyError")


def run_merge(base: Path, adapter: Path, out: Path, dtype_name: str) -> int:
    import torch

    from kubetune_trainer.modeling import merge_adapter

    merge_adapter(base, adapter, out, getattr(torch, dtype_name))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="kubetune-trainer")
    parser.add_argument("--spec", type=Path, help="run spec JSON (FineTuneJob spec + run information)")
    sub = parser.add_subparsers(dest="command")
    merge = sub.add_parser("merge", help="merge an adapter into a full-precision copy of its base")
    merge.add_argument("--base", type=Path, required=True)
    merge.add_argument("--adapter", type=Path, required=True)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    merge_job = sub.add_parser("merge-job", help="the LoraAdapter merge Job: from object storage to object storage")
    merge_job.add_argument("--spec", type=Path, required=True, help="merge spec JSON (baseModel, artifactUri, dtype)")
    verify_job = sub.add_parser("verify-job", help="the LoraAdapter verification Job: hash the artifact's content")
    verify_job.add_argument("--spec", type=Path, required=True,
                            help="verify spec JSON (artifactUri, manifestSha256, fingerprint)")
    args = parser.parse_args(argv)
    if args.command == "merge":
        return run_merge(args.base, args.adapter, args.out, args.dtype)
    if args.command == "merge-job":
        return run_merge_job(args.spec)
    if args.command == "verify-job":
        return run_verify_job(args.spec)
    if not args.spec:
        parser.error("--spec is required")
    return run_spec(args.spec)


if __name__ == "__main__":
    sys.exit(main())
