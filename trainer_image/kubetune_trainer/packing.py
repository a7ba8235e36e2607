"""The collator that batches training rows: several examples back to back (packed by TRL's
`pack_dataset`) or one example each.

Position ids restart at 0 for each example; with no attention mask, transformers turns restarting
position ids into a block-diagonal causal mask for sdpa, so no token sees another example. On GPU
the collator's cumulative example lengths drive variable-length flash attention instead
(kubetune_trainer.attention). The first token of each example gets no label: it would otherwise be
predicted from the previous example's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from kubetune_trainer.data import IGNORE


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def example_rows(batch: dict[str, list]) -> list[Row]:
    """One row per example of a batch of examples (hold-out evaluation)."""
    return [Row(ids, labels, list(range(len(ids))))
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)]


def _row(row: dict) -> Row:
    """A prepared row: its examples' lengths (TRL's packing writes seq_lengths) give the positions."""
    positions = [p for length in row["seq_lengths"] for p in range(length)]
    return Row(row["input_ids"], row["labels"], positions)


class RowCollator:
    """Pads rows to the longest in the batch. Padding is its own segment (positions from 0, no labels).

    Also hands the model every segment's boundaries in the flattened batch (cu_seq_lens_q, int32,
    with max_length_q), computed here on the CPU so the model never waits for them.
    """

    def __init__(self, pad_id: int, multiple_of: int = 8):
        self.pad_id, self.multiple_of = pad_id, multiple_of

    def __call__(self, batch: Sequence[Row | dict]) -> dict[str, Any]:  # tensors, and max_length_q an int
        rows = [r if isinstance(r, Row) else _row(r) for r in batch]
        width = max(len(r) for r in rows)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids, labels, positions = [], [], []
        for r in rows:
            pad = width - len(r)
            ids.append(list(r.input_ids) + [self.pad_id] * pad)
            labels.append([IGNORE if p == 0 else t for t, p in zip(r.labels, r.position_ids, strict=True)]
                          + [IGNORE] * pad)
            positions.append(list(r.position_ids) + list(range(pad)))
        starts = [r * width + j for r, row in enumerate(positions) for j, p in enumerate(row) if p == 0]
        bounds = starts + [len(rows) * width]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions),
                "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32),
                "max_length_q": max(b - a for a, b in pairwise(bounds))}
