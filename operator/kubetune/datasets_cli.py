"""`kubetune datasets check` and `kubetune datasets push`: a dataset checked on the laptop with the
trainer's own readers and formatting, before any GPU is held, then uploaded with its sha256.

The check runs exactly what the trainer pod runs (kubetune_trainer.data.prepare, or for --method dpo
kubetune_trainer.preference.prepare_preferences): the same error messages, the same truncation and
hold-out split. It needs the trainer extra (`.[trainer]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# What a tokenizer is made of in a transformers model directory; a check needs nothing else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "config.json")


def add_arguments(parser: argparse.ArgumentParser, *, push: bool) -> None:
    parser.add_argument("path", metavar="FILE_OR_DIR", help="a dataset file, or a directory of parts")
    if push:
        parser.add_argument("uri", help="s3://bucket/key (a directory goes under it as key/PART)")
    parser.add_argument("--format", default="auto", choices=["auto", "alpaca", "chat", "prompt-completion", "text"])
    parser.add_argument("--method", default="sft", choices=["sft", "dpo"],
                        help="the job's objective.type: dpo reads preference pairs (prompt, chosen, rejected)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, help="a local model or tokenizer directory")
    source.add_argument("--base-model", help="the base model's URI (s3:// or a local directory); only its "
                                             "tokenizer files are read")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--validation-split", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--completion-only-loss", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _tokenizer(args, scratch: Path):
    from kubetune_trainer.modeling import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if "://" not in args.base_model:
        return load_tokenizer(Path(args.base_model))
    from kubetune.storage.config import StorageConfig
    from kubetune.storage.location import ObjectMissing, open_location

    location = open_location(args.base_model, storage=StorageConfig.from_env(), volume_root=Path("/"))
    target = scratch / "tokenizer"
    for name in TOKENIZER_FILES:
        try:
            location.get_file(name, target / name)
        except ObjectMissing:
            continue
    return load_tokenizer(target)


def _percentiles(lengths) -> dict[str, int]:
    import numpy as np

    if not len(lengths):
        return {}
    values = np.percentile(lengths, [50, 90, 99, 100], method="nearest")
    return dict(zip(("p50", "p90", "p99", "max"), (int(v) for v in values), strict=True))


def check(args) -> dict:
    """The report for a dataset; raises the trainer's DatasetError on bad data."""
    from kubetune.api.finetunejob import Dataset, Training

    # field names, not aliases: the models populate by name, and mypy knows the names
    spec_dataset = Dataset(uri="pvc://local/data", format=args.format, validation_split=args.validation_split,
                           completion_only_loss=args.completion_only_loss)
    training = Training(max_seq_length=args.max_seq_length, seed=args.seed)
    path = Path(args.path)
    if args.method == "dpo" and args.format != "auto":
        raise ValueError("--method dpo reads prompt/chosen/rejected records: leave --format auto")
    with tempfile.TemporaryDirectory(prefix="kubetune-check-") as scratch:
        tokenizer = _tokenizer(args, Path(scratch))
        prepared = _prepare_pairs if args.method == "dpo" else _prepare_examples
        report, lengths = prepared(path, spec_dataset, training, tokenizer, Path(scratch) / "cache")
    return {"file": str(path), "sha256": report.sha256, "format": report.format, "records": report.records,
            "train": report.train, "holdout": report.validation, "rows": report.rows,
            "truncated": report.truncated, "truncatedWhere": report.truncated_where[:20],
            "tokenLengths": _percentiles(lengths), "maxSeqLength": args.max_seq_length}


def _prepare_examples(path: Path, spec_dataset, training, tokenizer, cache_dir: Path):
    """The SFT data's report, and the token lengths of its training examples."""
    import pyarrow.compute as pc

    from kubetune_trainer.data import prepare

    data = prepare(path, str(path), spec_dataset, training, tokenizer, cache_dir=cache_dir)
    return data.report, pc.list_value_length(data.train.data.column("input_ids")).to_numpy()


def _prepare_pairs(path: Path, spec_dataset, training, tokenizer, cache_dir: Path):
    """The preference pairs' report, and the token lengths of each training pair's longer sequence."""
    from kubetune_trainer.preference import prepare_preferences

    data = prepare_preferences(path, str(path), spec_dataset, training, tokenizer)
    return data.report, data.train_lengths


def _print(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    lengths = ", ".join(f"{k} {v}" for k, v in report["tokenLengths"].items())
    print(f"{report['file']}: {report['records']} records, format {report['format']}")
    print(f"  train {report['train']}, hold-out {report['holdout']}")
    print(f"  tokens per training example: {lengths}")
    print(f"  truncated to {report['maxSeqLength']} tokens: {report['truncated']}"
          + (f" ({', '.join(report['truncatedWhere'][:5])})" if report["truncated"] else ""))
    print(f"  sha256 {report['sha256']} (pin it as dataset.sha256)")


def _bad_data(command: str, exc: Exception) -> int:
    print(f"kubetune datasets {command}: {exc}", file=sys.stderr)
    return 1


def run_check(args) -> int:
    from kubetune_trainer.records import DatasetError

    try:
        report = check(args)
    except (DatasetError, ValueError, OSError) as exc:
        return _bad_data("check", exc)
    _print(report, args.json)
    return 0


def push(path: Path, uri: str) -> list[str]:
    """Upload a checked dataset file (or a directory's parts under the URI); returns the URIs written."""
    from kubetune.api.uris import parse_uri
    from kubetune.storage.config import StorageConfig
    from kubetune.storage.location import open_location
    from kubetune_trainer.records import dataset_parts

    parsed = parse_uri(uri)
    if parsed.scheme != "s3":
        raise ValueError(f"{uri}: push uploads to s3://bucket/key")
    storage = StorageConfig.from_env()
    if path.is_dir():
        location = open_location(uri, storage=storage, volume_root=Path("/"))
        location.ensure_ready()
        parts = dataset_parts(path, uri)
        for part, _ in parts:
            location.put_file(part.name, part)
        return [name for _, name in parts]
    parent, _, name = str(parsed).rpartition("/")
    location = open_location(parent, storage=storage, volume_root=Path("/"))
    location.ensure_ready()
    location.put_file(name, path)
    return [str(parsed)]


def run_push(args) -> int:
    from kubetune_trainer.records import DatasetError

    try:
        report = check(args)
        written = push(Path(args.path), args.uri)
    except (DatasetError, ValueError, OSError) as exc:
        return _bad_data("push", exc)
    _print(report, args.json)
    print(f"uploaded {len(written)} object(s) to {args.uri}; dataset.uri: {args.uri}, "
          f"dataset.sha256: {report['sha256']}")
    return 0


def register(sub) -> None:
    """The `datasets` command group, on the CLI's subparsers."""
    group = sub.add_parser("datasets", help="check datasets locally with the trainer's readers; upload them")
    group = group.add_subparsers(dest="datasets_command", required=True)
    check_parser = group.add_parser("check", help="check a dataset as the trainer would (exit 1 on bad data) and "
                                                  "report records, token lengths, truncation, hold-out and sha256")
    add_arguments(check_parser, push=False)
    check_parser.set_defaults(run=run_check)
    push_parser = group.add_parser("push", help="check, then upload to s3:// with the KUBETUNE_S3_* credentials "
                                                "(as `models import`); prints the sha256 to pin")
    add_arguments(push_parser, push=True)
    push_parser.set_defaults(run=run_push)
