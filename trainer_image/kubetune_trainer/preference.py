"""Preference data for DPO: checked pairs (kubetune_trainer.pairs) held as `datasets.Dataset`s in
TRL's preference format, which DPOTrainer tokenizes itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.data import DataFile, DataReport, numbered_rows, same_format, split_for_training, verified_digest
from kubetune_trainer.pairs import CONVERSATIONAL, FIELDS, read_pairs
from kubetune_trainer.records import DatasetError

if TYPE_CHECKING:
    import datasets


@dataclass
class PreparedPreferences:
    """train, validation: one pair per record (prompt, chosen, rejected, where); train_lengths: the
    tokens of each training pair's longer sequence."""
    train: datasets.Dataset
    validation: datasets.Dataset
    report: DataReport
    train_lengths: list[int]


def rendered(tokenizer, pair: dict) -> tuple[str, str, str]:
    """Prompt, chosen and rejected as the text the model reads (TRL's rendering of either layout)."""
    from trl.data_utils import apply_chat_template

    if isinstance(pair["prompt"], list):
        out = apply_chat_template({k: pair[k] for k in FIELDS}, tokenizer)
        return out["prompt"], out["chosen"], out["rejected"]
    return pair["prompt"], pair["chosen"] + tokenizer.eos_token, pair["rejected"] + tokenizer.eos_token


def pair_lengths(tokenizer, pairs) -> list[int]:
    """Tokens of each pair's longer sequence (prompt + chosen or prompt + rejected), as DPO trains on them."""
    texts: list[str] = []
    for pair in pairs:
        prompt, chosen, rejected = rendered(tokenizer, pair)
        texts += (prompt + chosen, prompt + rejected)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [max(len(a), len(b)) for a, b in zip(ids[::2], ids[1::2], strict=True)]


def prepare_preferences(path: Path, name: str, dataset: Dataset, training: Training, tokenizer,
                        validation: DataFile | None = None) -> PreparedPreferences:
    """Checked pairs split into training and hold-out, or held out in a file of their own
    (validation: the local copy of dataset.validationUri, of the training data's layout). Preference
    sets are small next to SFT corpora (thousands of pairs), so they are read whole and handed to
    `datasets` in memory; DPOTrainer tokenizes them with its own `map`."""
    import datasets

    digest = verified_digest(path, name, dataset.sha256)
    layout, pairs = read_pairs(path, name)
    if layout == CONVERSATIONAL and not tokenizer.chat_template:
        raise DatasetError(name, "conversations need a tokenizer with a chat template")
    train_idx, val_idx = split_for_training(len(pairs), name, dataset, training)
    held: list[dict] = []
    held_name, held_digest = name, None
    if validation is not None:
        held_name, held_digest = validation.name, verified_digest(validation.path, validation.name,
                                                                  dataset.validation_sha256)
        held_layout, held = read_pairs(validation.path, validation.name)
        same_format(held_layout, layout, validation, name)
        val_idx = list(range(len(pairs), len(pairs) + len(held)))  # after the training file's, in record order
    everything = pairs + held

    def file_of(i: int) -> str:
        return name if i < len(pairs) else held_name

    def where(i: int) -> str:  # a hold-out file's pair names its file, as SFT's examples do
        if i < len(pairs):
            return everything[i]["where"]
        return f"{held_name.rstrip('/').rpartition('/')[2]} {everything[i]['where']}"

    lengths = pair_lengths(tokenizer, everything)
    overlong = [i for i, n in enumerate(lengths) if n > training.max_seq_length]
    if overlong and dataset.on_overlong == "refuse":
        first = overlong[0]
        raise DatasetError(file_of(first), f"{lengths[first]} tokens exceed maxSeqLength {training.max_seq_length} "
                           "(onOverlong: refuse)", everything[first]["where"])
    report = DataReport(name, digest, layout, len(pairs), len(train_idx), len(val_idx), truncated=len(overlong),
                        truncated_where=[where(i) for i in overlong[:20]],
                        tokens=sum(lengths[i] for i in train_idx), rows=len(train_idx),
                        validation_file=validation.name if validation else None, validation_sha256=held_digest)
    table = datasets.Dataset.from_list(everything)
    return PreparedPreferences(numbered_rows(table.select(train_idx)), table.select(val_idx), report,
                               [lengths[i] for i in train_idx])
