"""Packing examples into rows without attention across them, and the collator that batches rows.

A row is several examples back to back. Position ids restart at 0 for each example; with no
attention mask, transformers turns restarting position ids into a block-diagonal causal mask
for sdpa, so no token sees another example. On GPU the collator's cumulative example lengths
drive variable-length flash attention instead (kubetune_trainer.attention). The first token of
each example gets no label: it would otherwise be predicted from the previous example's last token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from kubetune_trainer.data import IGNORE, Example


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _row(examples: list[Example]) -> Row:
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]
        positions += list(range(len(ex.input_ids)))
    return Row(ids, labels, positions)


def pack(examples: list[Example], max_len: int) -> list[Row]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        size = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_len - size, len(bins) - 1))
    # Rows keep dataset order inside (stable, reproducible); the sampler shuffles rows.
    return [_row([examples[i] for i in sorted(b)]) for b in bins]


def unpacked(examples: list[Example]) -> list[Row]:
    return [_row([ex]) for ex in examples]


class RowCollator:
    """Pads rows to the longest in the batch. Padding is its own segment (positions from 0, no labels).

    Also hands the model every segment's boundaries in the flattened batch (cu_seq_lens_q, int32,
    with max_length_q), computed here on the CPU so the model never waits for them.
    """

    def __init__(self, pad_id: int, multiple_of: int = 8):
        self.pad_id, self.multiple_of = pad_id, multiple_of

    def __call__(self, rows: list[Row | dict]) -> dict[str, torch.Tensor]:
        rows = [r if isinstance(r, Row) else Row(**r) for r in rows]
        width = max(len(r) for r in rows)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids, labels, positions = [], [], []
        for r in rows:
            pad = width - len(r)
            ids.append(r.input_ids + [self.pad_id] * pad)
            labels.append(r.labels + [IGNORE] * pad)
            positions.append(r.position_ids + list(range(pad)))
        starts = [r * width + j for r, row in enumerate(positions) for j, p in enumerate(row) if p == 0]
        bounds = starts + [len(rows) * width]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions),
                "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32),
                "max_length_q": max(b - a for a, b in zip(bounds, bounds[1:]))}
