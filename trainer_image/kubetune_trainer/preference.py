"""Preference data for DPO: checked pairs (kubetune_trainer.pairs) held as `datasets.Dataset`s in
TRL's preference format, which DPOTrainer tokenizes itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.data import DataReport, sha256_of, split_indices
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
    lengths = []
    for pair in pairs:
        prompt, chosen, rejected = rendered(tokenizer, pair)
        ids = tokenizer([prompt + chosen, prompt + rejected], add_special_tokens=False)["input_ids"]
        lengths.append(max(len(x) for x in ids))
    return lengths


def prepare_preferences(path: Path, name: str, dataset: Dataset, training: Training, tokenizer) -> PreparedPreferences:
    """Checked pairs split into training and hold-out. Preference sets are small next to SFT corpora
    (thousands of pairs), so they are read whole and handed to `datasets` in memory; DPOTrainer
    tokenizes them with its own `map`."""
    import datasets

    digest = sha256_of(path, name)
    if dataset.sha256 and digest != dataset.sha256:
        raise DatasetError(name, f"sha256 {digest} does not match the pinned {dataset.sha256}")
    layout, pairs = read_pairs(path, name)
    if layout == CONVERSATIONAL and not tokenizer.chat_template:
        raise DatasetError(name, "conversations need a tokenizer with a chat template")
    train_idx, val_idx = split_indices(len(pairs), dataset.validation_split, training.seed)
    if not train_idx:
        raise DatasetError(name, f"{len(pairs)} record(s) leave nothing to train on after a "
                           f"{dataset.validation_split} hold-out split")
    lengths = pair_lengths(tokenizer, pairs)
    truncated = [p["where"] for p, n in zip(pairs, lengths, strict=True) if n > training.max_seq_length]
    if truncated and dataset.on_overlong == "refuse":
        first = next(i for i, n in enumerate(lengths) if n > training.max_seq_length)
        raise DatasetError(name, f"{lengths[first]} tokens exceed maxSeqLength {training.max_seq_length} "
                           "(onOverlong: refuse)", pairs[first]["where"])
    report = DataReport(name, digest, layout, len(pairs), len(train_idx), len(val_idx), truncated=len(truncated),
                        truncated_where=truncated[:20], tokens=sum(lengths[i] for i in train_idx),
                        rows=len(train_idx))
    table = datasets.Dataset.from_list(pairs)
    train = table.select(train_idx)
    return PreparedPreferences(train.add_column("row", list(range(len(train)))), table.select(val_idx), report,
                               [lengths[i] for i in train_idx])
