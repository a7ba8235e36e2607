"""From a dataset file (or a directory of parts) to tokenized, packed rows held by `datasets`.

Records are read and checked by our readers (errors name the file, line or row, and field), then
held as a `datasets.Dataset` (Arrow on disk, memory-mapped), split, rendered and tokenized with
batched `map`, and packed. The result is cached under a key of everything that decides it (the
data's sha256, the tokenizer, the data-affecting spec fields), so a resumed attempt loads it
instead of tokenizing again, and one process per node prepares it while the others wait.

Memory: pages of a memory-mapped Arrow file count in a process's RSS once read, until it is
unmapped. So the preparing process reads the token lists once (to pack them) and otherwise only
flags, counts and list offsets; each split is written once, by `map`, into the files the cache
keeps, rather than selected from one table and copied out.

Nothing is dropped silently: overlong examples are truncated and counted (or refused, naming the
record), and the report records the data's sha256, the detected format and the split.

The hold-out is a seeded split of the training data (dataset.validationSplit) or a file of its own
(dataset.validationUri), read by the same readers, of the same format, with its own sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer import distributed
from kubetune_trainer.formats import Renderer, Span, detect_format
from kubetune_trainer.records import DatasetError, Record, dataset_parts, iter_records

if TYPE_CHECKING:  # annotations only: imported where used, which keeps importing this module cheap
    import datasets

log = logging.getLogger(__name__)
IGNORE = -100
# Bump when what prepare() writes changes, so no older cache is read as this one.
CACHE_VERSION = "2"
_MAP_BATCH = 1000
_EMPTY = "empty-features.json"


@dataclass
class DataReport:
    file: str
    sha256: str
    format: str
    records: int
    train: int
    validation: int
    truncated: int = 0
    no_loss_tokens: int = 0  # examples left with nothing to learn from after truncation
    tokens: int = 0
    loss_tokens: int = 0
    truncated_where: list[str] = field(default_factory=list)
    rows: int = 0  # training rows after packing
    validation_file: str | None = None  # the hold-out's own file (dataset.validationUri), if it has one
    validation_sha256: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["truncated_where"] = out["truncated_where"][:20]
        return out


@dataclass(frozen=True)
class DataFile:
    """A dataset on local disk (a file or a directory of parts) and what errors call it (its URI)."""
    path: Path
    name: str


@dataclass
class PreparedData:
    """train, validation: one example per record (input_ids, labels, where, prompt_text, reference);
    rows: what training batches are drawn from (input_ids, labels, seq_lengths, row)."""
    train: datasets.Dataset
    validation: datasets.Dataset
    rows: datasets.Dataset
    report: DataReport


def sha256_of(path: Path, name: str | None = None) -> str:
    """A file's sha256; a directory's is over its parts' names and contents, in name order."""
    digest = hashlib.sha256()
    parts = dataset_parts(path, name or str(path))
    for part, _ in parts:
        if path.is_dir():
            digest.update(part.name.encode() + b"\0")
        with open(part, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic hold-out: the same file, fraction and seed always give the same split."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * fraction)
    if fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_for_training(n: int, name: str, dataset: Dataset, training: Training) -> tuple[list[int], list[int]]:
    """The spec's hold-out split of n records; refuses one that leaves no record to train on."""
    train_idx, val_idx = split_indices(n, dataset.validation_split, training.seed)
    if not train_idx:
        raise DatasetError(name, f"{n} record(s) leave nothing to train on after a "
                           f"{dataset.validation_split} hold-out split")
    return train_idx, val_idx


def verified_digest(path: Path, name: str, pinned: str | None) -> str:
    """The data's sha256, checked against the spec's pin (dataset.sha256 or validationSha256) where it has one."""
    digest = sha256_of(path, name)
    if pinned and digest != pinned:
        raise DatasetError(name, f"sha256 {digest} does not match the pinned {pinned}")
    return digest


def same_format(held: str, fmt: str, validation: DataFile, name: str) -> None:
    """A hold-out file is scored as the training data is rendered: it must be of the same format."""
    if held != fmt:
        raise DatasetError(validation.name, f"is {held} but the training data {name} is {fmt}; a validation "
                           "file must have the training data's format")


def tokenize_spans(tokenizer, examples: list[list[Span]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each example's spans, each span tokenized on its own, and labels that keep the
    trainable ones.

    Tokenizing spans separately (as TRL does for prompt and completion) keeps the prompt's tokens
    exactly what generation will see at inference; a joint tokenization could merge the prompt's
    last characters with the completion's first into a token the model never sees at inference.
    All spans of a batch go to the tokenizer in one call (the fast tokenizer's batch path).
    """
    texts = [span.text for spans in examples for span in spans if span.text]
    tokens = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for spans in examples:
        ids: list[int] = []
        labels: list[int] = []
        for span in spans:
            piece = next(tokens) if span.text else []
            ids += piece
            labels += piece if span.trainable else [IGNORE] * len(piece)
        out.append((ids, labels))
    return out


def cache_key(sha256: str, tokenizer, dataset: Dataset, training: Training,
              validation_sha256: str | None = None) -> str:
    """Everything that decides the prepared data: its bytes (and the validation file's), the tokenizer
    (vocabulary, template, special tokens) and the spec fields that change rendering, truncation, the
    split or packing. The URIs are not part of it: the same bytes elsewhere prepare the same."""
    tok = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer.get_vocab())
    parts = {
        "version": CACHE_VERSION, "sha256": sha256, "validationSha256": validation_sha256,
        "tokenizer": hashlib.sha256(tok.encode()).hexdigest(),
        "chatTemplate": tokenizer.chat_template, "eos": tokenizer.eos_token,
        "dataset": dataset.model_dump(mode="json", exclude={"uri", "sha256", "validation_uri", "validation_sha256"}),
        "training": {"maxSeqLength": training.max_seq_length, "packing": training.packing, "seed": training.seed},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _raw_records(path: str, name: str):
    for record in iter_records(Path(path), name):
        yield {"record": json.dumps(record.data, ensure_ascii=False), "where": record.where, "file": record.file}


class _Tokenize:
    """The batched `map` function: render each record of one format into spans, tokenize, truncate."""

    def __init__(self, tokenizer, name: str, fmt: str, dataset: Dataset, max_len: int):
        self.tokenizer, self.name, self.fmt, self.dataset, self.max_len = tokenizer, name, fmt, dataset, max_len
        self.renderer = Renderer(tokenizer, name, completion_only=dataset.completion_only_loss and fmt != "text")

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        records = [Record(w, json.loads(r), f)
                   for r, w, f in zip(batch["record"], batch["where"], batch["file"], strict=True)]
        rendered = [self.renderer.render(self.fmt, record) for record in records]
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "where", "prompt_text", "reference",
                                                "truncated", "loss_tokens")}
        tokenized = tokenize_spans(self.tokenizer, rendered)
        for record, spans, (ids, labels) in zip(records, rendered, tokenized, strict=True):
            truncated = len(ids) > self.max_len
            if truncated:
                if self.dataset.on_overlong == "refuse":
                    raise DatasetError(record.file, f"{len(ids)} tokens exceed maxSeqLength {self.max_len} "
                                       "(onOverlong: refuse)", record.where)
                ids, labels = ids[: self.max_len], labels[: self.max_len]
            last = max((i for i, s in enumerate(spans) if s.trainable), default=len(spans))
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            # In a directory of parts, where a record is names its part.
            out["where"].append(record.where if record.file == self.name else
                                f"{record.file.rpartition('/')[2]} {record.where}")
            out["prompt_text"].append("".join(s.text for s in spans[:last]))
            out["reference"].append(spans[last].text if last < len(spans) else "")
            out["truncated"].append(truncated)
            out["loss_tokens"].append(sum(1 for x in labels if x != IGNORE))
        return out


def _workers(records: int) -> int | None:
    """Processes for `map`: worth it only on big data, and never more than the pod's CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 16) if records >= 50_000 and cpus > 1 else None


def _features():
    import datasets

    token = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"input_ids": token, "labels": token, "where": datasets.Value("string"),
                              "prompt_text": datasets.Value("string"), "reference": datasets.Value("string"),
                              "truncated": datasets.Value("bool"), "loss_tokens": datasets.Value("int32")})


def _tokenized(raw, indices: list[int], tokenize: _Tokenize, work: Path, part: str):
    """One split's examples, tokenized by batched `map` straight into Arrow files of its own, which
    become the cache entry as they are: no split is selected from a shared table and copied out."""
    import datasets

    records = raw.select(indices)
    if not len(records):  # `map` of nothing returns nothing, not the example columns
        return datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features())
    return records.map(tokenize, batched=True, batch_size=_MAP_BATCH,
                       remove_columns=records.column_names, features=_features(), num_proc=_workers(len(records)),
                       desc="tokenizing", new_fingerprint=f"{work.name}-{part}", load_from_cache_file=False,
                       cache_file_name=str(work / part / f"{part}.arrow"))


def _column(split, key: str):
    """A column of flags or counts as numpy, straight from Arrow (a split that `map` wrote, no row selection)."""
    return split.data.column(key).to_numpy()


def _detected_format(path: Path, name: str, dataset: Dataset) -> str:
    first = next(iter_records(path, name))
    return dataset.format if dataset.format != "auto" else detect_format(first, first.file or name)


def _raw(path: Path, name: str, cache: Path):
    """The records of a dataset as an Arrow table of JSON strings, read by our readers."""
    import datasets

    try:
        return datasets.Dataset.from_generator(_raw_records, gen_kwargs={"path": str(path), "name": name},
                                               cache_dir=str(cache),
                                               features=datasets.Features({k: datasets.Value("string")
                                                                           for k in ("record", "where", "file")}))
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, DatasetError):
            raise exc.__cause__ from None  # our reader's message, not the builder's wrapper
        raise


def _build(path: Path, name: str, digest: str, dataset: Dataset, training: Training, tokenizer, work: Path,
           staging: Path, validation: DataFile | None = None, validation_digest: str | None = None) -> DataReport:
    """Prepares the data into `staging` (train, validation, rows: Arrow files) and reports on it.

    Only small columns (flags, counts, list offsets) are read back into this process; the token
    lists are read once, by packing. Records are split before tokenizing, so when several records
    are bad the first bad one of the training split is named before any of the hold-out's.
    validation: the hold-out's own file; the training data is then not split (validationSplit is 0).
    """
    import datasets
    import numpy as np
    import pyarrow.compute as pc

    datasets.disable_progress_bars()  # a bar per map in a pod's log is noise; the report says what was done
    fmt = _detected_format(path, name, dataset)
    raw = _raw(path, name, work / "raw")
    train_idx, val_idx = split_for_training(len(raw), name, dataset, training)
    records = len(raw)
    # Named after the training data, so a hold-out file's examples carry their file's name in `where`.
    tokenize = _Tokenize(tokenizer, name, fmt, dataset, training.max_seq_length)
    train_all = _tokenized(raw, train_idx, tokenize, work, "train")
    if validation is None:
        validation_set = _tokenized(raw, val_idx, tokenize, work, "validation")
    else:
        same_format(_detected_format(validation.path, validation.name, dataset), fmt, validation, name)
        held = _raw(validation.path, validation.name, work / "raw-validation")
        val_idx = list(range(records, records + len(held)))  # in record order: after the training data's
        validation_set = _tokenized(held, list(range(len(held))), tokenize, work, "validation")
        del held
    del raw  # its mapped pages (read here when the data are too small for workers) are not held while packing

    report = DataReport(name, digest, fmt, records, 0, len(validation_set),
                        validation_file=validation.name if validation else None, validation_sha256=validation_digest)
    # In record order, across both splits, as the report lists them.
    truncated = sorted((order[i], split, int(i))
                       for split, order in ((train_all, train_idx), (validation_set, val_idx))
                       for i in np.flatnonzero(_column(split, "truncated")))
    report.truncated = len(truncated)
    report.truncated_where = [split[i]["where"] for _, split, i in truncated[:20]]
    loss = _column(train_all, "loss_tokens")
    report.no_loss_tokens = int((loss == 0).sum() + (_column(validation_set, "loss_tokens") == 0).sum())
    kept = np.flatnonzero(loss > 0)
    if not len(kept):
        raise DatasetError(name, "no training example has a token to learn from (all truncated away?)")
    train = train_all if len(kept) == len(train_all) else train_all.select(kept)
    report.train = len(train)
    # From the list offsets: the token lists themselves are not read for a count.
    lengths = pc.list_value_length(train_all.data.column("input_ids")).to_numpy()
    report.tokens, report.loss_tokens = int(lengths[kept].sum()), int(loss.sum())
    rows = training_rows(train, training.max_seq_length, training.packing, numbered=False,
                         cache_file_name=str(work / "rows" / "rows.arrow"))
    report.rows = len(rows)
    if train is not train_all:  # a selection of rows: written out on its own (the pages packing just read)
        train = train.flatten_indices(cache_file_name=str(work / "kept" / "train.arrow"))
    for part, table in (("train", train), ("validation", validation_set), ("rows", rows)):
        _store(table, staging / part)
    return report


def training_rows(train, max_len: int, packing: bool, *, numbered: bool = True, cache_file_name: str | None = None):
    """Training rows: several examples back to back (TRL's best-fit-decreasing packing; each row
    lists its examples' lengths), or one example per row; each numbered, for coverage counts.
    cache_file_name: where `map` writes them (else beside `train`'s own files, or in memory)."""
    from trl.data_utils import pack_dataset

    columns = train.select_columns(["input_ids", "labels"])
    kwargs = {"cache_file_name": cache_file_name} if cache_file_name else {}
    if packing:
        rows = pack_dataset(columns, max_len, strategy="bfd", map_kwargs=kwargs)
    else:
        rows = columns.map(lambda ids: {"seq_lengths": [[len(x)] for x in ids]}, input_columns="input_ids",
                           batched=True, **kwargs)
    return numbered_rows(rows) if numbered else rows


def numbered_rows(rows):
    """rows with a `row` column of their numbers (for coverage counts)."""
    # A column of row numbers costs 8 bytes a row in memory; it is not worth a pass over the rows to store.
    import numpy as np

    return rows.add_column("row", np.arange(len(rows)))


def _store(table, target: Path) -> None:
    """A split's Arrow files, as `map` wrote them, moved into the cache entry."""
    target.mkdir(parents=True)
    if not len(table):  # no Arrow file to keep; the features say what the empty split holds
        (target / _EMPTY).write_text(json.dumps(table.features.to_dict()))
        return
    for number, entry in enumerate(table.cache_files):
        shutil.move(entry["filename"], target / f"{number:05d}.arrow")


def _load(target: Path) -> PreparedData:
    import datasets

    def load(part: Path):
        if (part / _EMPTY).is_file():
            features = datasets.Features.from_dict(json.loads((part / _EMPTY).read_text()))
            return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f))
                                              for f in sorted(part.glob("*.arrow"))])

    parts = {p: load(target / p) for p in ("train", "validation", "rows")}
    parts["rows"] = numbered_rows(parts["rows"])
    return PreparedData(**parts, report=DataReport(**json.loads((target / "report.json").read_text())))


def prepare(path: Path, name: str, dataset: Dataset, training: Training, tokenizer, *,
            validation: DataFile | None = None, cache_dir: Path | None = None,
            ranks: distributed.Ranks | None = None) -> PreparedData:
    """The prepared data for this spec: from the cache when an earlier attempt (or another job with
    the same data, tokenizer and fields) prepared it, else built by the node's first process.
    validation: the local copy of dataset.validationUri, when the spec has one.
    cache_dir: the pod's cache (KUBETUNE_CACHE_DIR), which outlives the pod where it is a volume."""
    ranks = ranks or distributed.Ranks()
    cache_dir = cache_dir or Path(os.environ.get("KUBETUNE_CACHE_DIR", "/tmp/kubetune-cache")) / "datasets"
    digest = verified_digest(path, name, dataset.sha256)
    held = verified_digest(validation.path, validation.name, dataset.validation_sha256) if validation else None
    target = cache_dir / "prepared" / cache_key(digest, tokenizer, dataset, training, held)
    failure = None
    if ranks.is_local_main and not (target / "report.json").is_file():
        work = cache_dir / "preparing" / target.name
        shutil.rmtree(work, ignore_errors=True)  # what a killed attempt left
        try:
            # Built beside the target, then renamed into place: a reader never sees half a cache.
            staging = work / "entry"
            report = _build(path, name, digest, dataset, training, tokenizer, work, staging, validation, held)
            (staging / "report.json").write_text(json.dumps(asdict(report)))
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
            log.info("dataset prepared in %s", target)
        except DatasetError as exc:
            failure = exc
        finally:
            shutil.rmtree(work, ignore_errors=True)
    else:
        log.info("dataset from the cache %s", target)
    # Every process of the node agrees on the outcome: bad data fails them all with the same message.
    failure = distributed.from_local_main(ranks, failure)
    if failure is not None:
        raise failure
    return _load(target)
