"""From a dataset file (or a directory of parts) to tokenized, packed rows held by `datasets`.

Records are read and checked by our readers (errors name the file, line or row, and field), then
held as a `datasets.Dataset` (Arrow on disk, memory-mapped), rendered and tokenized with batched
`map`, split, and packed. The result is cached under a key of everything that decides it (the
data's sha256, the tokenizer, the data-affecting spec fields), so a resumed attempt loads it
instead of tokenizing again, and one process per node prepares it while the others wait.

Nothing is dropped silently: overlong examples are truncated and counted (or refused, naming the
record), and the report records the data's sha256, the detected format and the split.
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

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer import distributed
from kubetune_trainer.formats import Renderer, Span, detect_format
from kubetune_trainer.records import DatasetError, Record, dataset_parts, iter_records

log = logging.getLogger(__name__)
IGNORE = -100
# Bump when what prepare() writes changes, so no older cache is read as this one.
CACHE_VERSION = "1"
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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["truncated_where"] = out["truncated_where"][:20]
        return out


@dataclass
class PreparedData:
    """train, validation: one example per record (input_ids, labels, where, prompt_text, reference);
    rows: what training batches are drawn from (input_ids, labels, seq_lengths, row)."""
    train: "datasets.Dataset"  # noqa: F821
    validation: "datasets.Dataset"  # noqa: F821
    rows: "datasets.Dataset"  # noqa: F821
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


def cache_key(sha256: str, tokenizer, dataset: Dataset, training: Training) -> str:
    """Everything that decides the prepared data: its bytes, the tokenizer (vocabulary, template,
    special tokens) and the spec fields that change rendering, truncation, the split or packing."""
    tok = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer.get_vocab())
    parts = {
        "version": CACHE_VERSION, "sha256": sha256,
        "tokenizer": hashlib.sha256(tok.encode()).hexdigest(),
        "chatTemplate": tokenizer.chat_template, "eos": tokenizer.eos_token,
        "dataset": dataset.model_dump(mode="json", exclude={"uri", "sha256"}),
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
        records = [Record(w, json.loads(r), f) for r, w, f in zip(batch["record"], batch["where"], batch["file"])]
        rendered = [self.renderer.render(self.fmt, record) for record in records]
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "where", "prompt_text", "reference",
                                                "truncated", "loss_tokens")}
        for record, spans, (ids, labels) in zip(records, rendered, tokenize_spans(self.tokenizer, rendered)):
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


def _build(path: Path, name: str, digest: str, dataset: Dataset, training: Training, tokenizer,
           work: Path) -> tuple[PreparedData, DataReport]:
    import datasets
    import pyarrow.compute as pc

    datasets.disable_progress_bars()  # a bar per map in a pod's log is noise; the report says what was done
    first = next(iter_records(path, name))
    fmt = dataset.format if dataset.format != "auto" else detect_format(first, first.file or name)
    try:
        raw = datasets.Dataset.from_generator(_raw_records, gen_kwargs={"path": str(path), "name": name},
                                              cache_dir=str(work / "raw"),
                                              features=datasets.Features({k: datasets.Value("string")
                                                                          for k in ("record", "where", "file")}))
    except datasets.exceptions.DatasetGenerationError as exc:
        if isinstance(exc.__cause__, DatasetError):
            raise exc.__cause__ from None  # our reader's message, not the builder's wrapper
        raise
    token = datasets.Sequence(datasets.Value("int32"))
    features = datasets.Features({"input_ids": token, "labels": token, "where": datasets.Value("string"),
                                  "prompt_text": datasets.Value("string"), "reference": datasets.Value("string"),
                                  "truncated": datasets.Value("bool"), "loss_tokens": datasets.Value("int32")})
    examples = raw.map(_Tokenize(tokenizer, name, fmt, dataset, training.max_seq_length), batched=True,
                       batch_size=_MAP_BATCH, remove_columns=raw.column_names, features=features,
                       num_proc=_workers(len(raw)), desc="tokenizing", new_fingerprint=work.name,
                       cache_file_name=str(work / "examples" / "examples.arrow"))
    report = DataReport(name, digest, fmt, len(examples), 0, 0)
    truncated = examples.filter(lambda flags: flags, input_columns="truncated", batched=True)
    report.truncated = len(truncated)
    report.truncated_where = list(truncated.select(range(min(20, len(truncated))))["where"])
    train_idx, val_idx = split_indices(len(examples), dataset.validation_split, training.seed)
    if not train_idx:
        raise DatasetError(name, f"{len(examples)} record(s) leave nothing to train on after a "
                           f"{dataset.validation_split} hold-out split")
    train_all = examples.select(train_idx)
    report.no_loss_tokens = sum(1 for n in examples["loss_tokens"] if n == 0)
    train = train_all.filter(lambda counts: [n > 0 for n in counts], input_columns="loss_tokens", batched=True)
    if not len(train):
        raise DatasetError(name, "no training example has a token to learn from (all truncated away?)")
    validation = examples.select(val_idx)
    report.train, report.validation = len(train), len(validation)
    # Counted in Arrow: a million rows' token lists never become Python lists.
    report.tokens = pc.sum(pc.list_value_length(train.with_format("arrow")["input_ids"])).as_py()
    report.loss_tokens = pc.sum(train.with_format("arrow")["loss_tokens"]).as_py()
    rows = training_rows(train, training.max_seq_length, training.packing)
    report.rows = len(rows)
    return PreparedData(train, validation, rows, report), report


def training_rows(train, max_len: int, packing: bool):
    """Training rows: several examples back to back (TRL's best-fit-decreasing packing; each row
    lists its examples' lengths), or one example per row; each numbered, for coverage counts."""
    from trl.data_utils import pack_dataset

    columns = train.select_columns(["input_ids", "labels"])
    if packing:
        rows = pack_dataset(columns, max_len, strategy="bfd")
    else:
        rows = columns.map(lambda ids: {"seq_lengths": [[len(x)] for x in ids]}, input_columns="input_ids",
                           batched=True)
    return rows.add_column("row", list(range(len(rows))))


def _save(data: PreparedData, target: Path) -> None:
    """Written beside the target, then renamed into place: a reader never sees half a cache."""
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    for part in ("train", "validation", "rows"):
        table = getattr(data, part)
        if len(table):
            table.save_to_disk(str(staging / part))
        else:  # datasets writes an empty dataset as no shards, which it cannot load back
            (staging / part).mkdir(parents=True)
            (staging / part / _EMPTY).write_text(json.dumps(table.features.to_dict()))
    (staging / "report.json").write_text(json.dumps(asdict(data.report)))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def _load(target: Path) -> PreparedData:
    import datasets

    def load(part: Path):
        if (part / _EMPTY).is_file():
            features = datasets.Features.from_dict(json.loads((part / _EMPTY).read_text()))
            return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        return datasets.load_from_disk(str(part))

    parts = {p: load(target / p) for p in ("train", "validation", "rows")}
    return PreparedData(**parts, report=DataReport(**json.loads((target / "report.json").read_text())))


def prepare(path: Path, name: str, dataset: Dataset, training: Training, tokenizer, *, cache_dir: Path | None = None,
            ranks: distributed.Ranks = distributed.Ranks()) -> PreparedData:
    """The prepared data for this spec: from the cache when an earlier attempt (or another job with
    the same data, tokenizer and fields) prepared it, else built by the node's first process.
    cache_dir: the pod's cache (KUBETUNE_CACHE_DIR), which outlives the pod where it is a volume."""
    cache_dir = cache_dir or Path(os.environ.get("KUBETUNE_CACHE_DIR", "/tmp/kubetune-cache")) / "datasets"
    digest = sha256_of(path, name)
    if dataset.sha256 and digest != dataset.sha256:
        raise DatasetError(name, f"sha256 {digest} does not match the pinned {dataset.sha256}")
    target = cache_dir / "prepared" / cache_key(digest, tokenizer, dataset, training)
    failure = None
    if ranks.is_local_main and not (target / "report.json").is_file():
        work = cache_dir / "preparing" / target.name
        try:
            data, _ = _build(path, name, digest, dataset, training, tokenizer, work)
            _save(data, target)
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
