"""From a dataset file to tokenized train and hold-out examples, with a report of what was done.

Nothing is dropped silently: overlong examples are truncated and counted (or refused, naming the
record), and the report records the file's sha256, the detected format and the split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.formats import Renderer, Span, detect_format
from kubetune_trainer.records import DatasetError, read_records

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken
    where: str
    prompt_text: str = ""  # everything before the last trainable span: the generation prompt
    reference: str = ""  # the last trainable span's text: what exact-match compares with

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["truncated_where"] = out["truncated_where"][:20]
        return out


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    report: DataReport


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tokenize_spans(tokenizer, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Token ids of the spans, each tokenized on its own, and labels that keep the trainable ones.

    Tokenizing spans separately (as TRL does for prompt and completion) keeps the prompt's tokens
    exactly what generation will see at inference; a joint tokenization could merge the prompt's
    last characters with the completion's first into a token the model never sees at inference.
    """
    ids: list[int] = []
    labels: list[int] = []
    for span in spans:
        tokens = tokenizer(span.text, add_special_tokens=False)["input_ids"] if span.text else []
        ids += tokens
        labels += tokens if span.trainable else [IGNORE] * len(tokens)
    return ids, labels


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic hold-out: the same file, fraction and seed always give the same split."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * fraction)
    if fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    return sorted(order[n_val:]), sorted(order[:n_val])


def prepare(path: Path, name: str, dataset: Dataset, training: Training, tokenizer) -> PreparedData:
    digest = sha256_of(path)
    if dataset.sha256 and digest != dataset.sha256:
        raise DatasetError(name, f"sha256 {digest} does not match the pinned {dataset.sha256}")
    records = read_records(path, name)
    fmt = dataset.format if dataset.format != "auto" else detect_format(records[0], name)
    renderer = Renderer(tokenizer, name, completion_only=dataset.completion_only_loss and fmt != "text")
    report = DataReport(name, digest, fmt, len(records), 0, 0)
    examples = []
    for record in records:
        spans = renderer.render(fmt, record)
        ids, labels = tokenize_spans(tokenizer, spans)
        if len(ids) > training.max_seq_length:
            if dataset.on_overlong == "refuse":
                raise DatasetError(name, f"{len(ids)} tokens exceed maxSeqLength {training.max_seq_length} "
                                   "(onOverlong: refuse)", record.where)
            ids, labels = ids[: training.max_seq_length], labels[: training.max_seq_length]
            report.truncated += 1
            report.truncated_where.append(record.where)
        last = max((i for i, s in enumerate(spans) if s.trainable), default=len(spans))
        example = Example(ids, labels, record.where, "".join(s.text for s in spans[:last]),
                          spans[last].text if last < len(spans) else "")
        if example.loss_tokens == 0:
            report.no_loss_tokens += 1
        examples.append(example)
    train_idx, val_idx = split_indices(len(examples), dataset.validation_split, training.seed)
    if not train_idx:
        raise DatasetError(name, f"{len(examples)} record(s) leave nothing to train on after a "
                           f"{dataset.validation_split} hold-out split")
    train = [examples[i] for i in train_idx if examples[i].loss_tokens]
    if not train:
        raise DatasetError(name, "no training example has a token to learn from (all truncated away?)")
    report.train, report.validation = len(train), len(val_idx)
    report.tokens = sum(len(e.input_ids) for e in train)
    report.loss_tokens = sum(e.loss_tokens for e in train)
    return PreparedData(train, [examples[i] for i in val_idx], report)
