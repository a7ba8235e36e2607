"""Packing (TRL's best-fit decreasing over our examples): every example placed once, rows within
bounds, and no attention across examples through the collator."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets import Dataset

from kubetune_trainer.data import IGNORE, training_rows
from kubetune_trainer.packing import RowCollator


def _examples(lengths):
    ids, token = [], 10
    for n in lengths:
        ids.append(list(range(token, token + n)))
        token += n
    return ids


def pack(examples: list[list[int]], max_len: int) -> list[dict]:
    """Rows as the trainer gets them, from examples whose labels are their tokens."""
    data = Dataset.from_dict({"input_ids": examples, "labels": [e[:] for e in examples]})
    return list(training_rows(data, max_len, packing=True))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 200))
def test_pack_places_every_example_once_within_bounds(lengths, max_len):
    rows = pack(_examples(lengths), max_len)
    assert all(len(r["input_ids"]) <= max_len for r in rows)
    seen = sorted(t for r in rows for t in r["input_ids"])
    assert seen == sorted(t for e in _examples(lengths) for t in e)
    assert sorted(r["row"] for r in rows) == list(range(len(rows)))
    batch = RowCollator(pad_id=0)(rows)
    starts = batch["position_ids"] == 0
    assert batch["labels"][starts].eq(IGNORE).all()  # never predicted from the previous example
    # Best fit never leaves two rows at most half full (their contents would have fitted in one),
    # so all rows but one hold more than max_len / 2 tokens.
    assert (len(rows) - 1) * max_len / 2 < sum(lengths)


def test_collator_pads_as_a_separate_segment():
    rows = pack(_examples([5, 3]), 8) + pack(_examples([2]), 8)
    assert [r["seq_lengths"] for r in rows] == [[5, 3], [2]]
    batch = RowCollator(pad_id=0, multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    assert batch["labels"][1, 2:].eq(IGNORE).all()
    # Segments of the flattened batch, for variable-length attention: [5, 3 | 2, 6 of padding].
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 10, 16]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 6


def _token_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE,
                                             reduction="none")


@torch.no_grad()
def test_packed_row_loss_equals_separate_losses(smollm2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = ["The invoice INV-1234 totals 99.50 EUR.", "Globex billed 12.00 USD.", "Hello there, how are you today?"]
    examples = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    collate = RowCollator(tokenizer.pad_token_id, multiple_of=1)
    packed_rows = pack(examples, 256)
    assert len(packed_rows) == 1
    packed = _token_losses(model, collate(packed_rows))
    separate = torch.cat([_token_losses(model, collate(pack([e], 256))) for e in examples])
    # The same tokens scored (a packed row's order is the packer's; compare as multisets).
    packed_valid = packed[packed != 0].sort().values
    separate_valid = separate[separate != 0].sort().values
    assert packed_valid.shape == separate_valid.shape
    torch.testing.assert_close(packed_valid, separate_valid, rtol=1e-4, atol=1e-4)
    # Without restarting positions, the later examples would see the earlier ones: the losses differ.
    row = collate(packed_rows)
    leaky = model(input_ids=row["input_ids"], use_cache=False).logits.float()
    leaky_losses = torch.nn.functional.cross_entropy(leaky[0, :-1], row["labels"][0, 1:], ignore_index=IGNORE,
                                                     reduction="none")
    assert not torch.allclose(leaky_losses[leaky_losses != 0].sort().values, separate_valid, atol=1e-2)
