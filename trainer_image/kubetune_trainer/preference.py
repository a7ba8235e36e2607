"""Preference data for DPO: checked pairs (kubetune_trainer.pairs) held as `datasets.Dataset`s in
TRL's preference format, which DPOTrainer tokenizes itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.data import DataReport, numbered_rows, split_for_training, verified_digest
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


def prepare_preferences(path: Path, name: str, dataset: Dataset, training: Training, tokenizer) -> PreparedPreferences:
    """Checked pairs split into training and hold-out. Preference sets are small next to SFT corpora
    (thousands of pairs), so they are read whole and handed to `datasets` in memory; DPOTrainer
    tokenizes them with its own `map`."""
    import datasets

    digest = verified_digest(path, name, dataset)
    layout, pairs = read_pairs(path, name)
    if layout == CONVERSATIONAL and not tokenizer.chat_template:
        raise DatasetError(name, "conversations need a tokenizer with a chat template")
    train_idx, val_idx = split_for_training(len(pairs), name, dataset, training)
    lengths = pair_lengths(tokenizer, pairs)
    overlong = [i for i, n in enumerate(lengths) if n > training.max_seq_length]
    if overlong and dataset.on_overlong == "refuse":
        first = overlong[0]
        raise DatasetError(name, f"{lengths[first]} tokens exceed maxSeqLength {training.max_seq_length} "
                           "(onOverlong: refuse)", pairs[first]["where"])
    report = DataReport(name, digest, layout, len(pairs), len(train_idx), len(val_idx), truncated=len(overlong),
                        truncated_where=[pairs[i]["where"] for i in overlong[:20]],
                        tokens=sum(lengths[i] for i in train_idx), rows=len(train_idx))
    table = datasets.Dataset.from_list(pairs)
    train = table.select(train_idx)
    return PreparedPreferences(numbered_rows(train), table.select(val_idx), report,
                               [lengths[i] for i in train_idx])
