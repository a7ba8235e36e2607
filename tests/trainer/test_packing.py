"""Packing: every example placed once, rows within bounds, and no attention across examples."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kubetune_trainer.data import IGNORE, Example
from kubetune_trainer.packing import RowCollator, pack


def _examples(lengths):
    out, token = [], 10
    for n in lengths:
        ids = list(range(token, token + n))
        token += n
        out.append(Example(ids, ids[:], f"line {len(out) + 1}"))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 200))
def test_pack_places_every_example_once_within_bounds(lengths, max_len):
    rows = pack(_examples(lengths), max_len)
    assert all(len(r) <= max_len for r in rows)
    seen = sorted(t for r in rows for t in r.input_ids)
    assert seen == sorted(t for e in _examples(lengths) for t in e.input_ids)
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[i] == IGNORE for i in starts)  # never predicted from the previous example
    # Best fit never leaves two rows at most half full (their contents would have fitted in one),
    # so all rows but one hold more than max_len / 2 tokens.
    assert (len(rows) - 1) * max_len / 2 < sum(lengths)


def test_collator_pads_as_a_separate_segment():
    rows = pack(_examples([5, 3]), 8) + pack(_examples([2]), 8)
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
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append(Example(ids, ids[:], "t"))
    collate = RowCollator(tokenizer.pad_token_id, multiple_of=1)
    packed_rows = pack(examples, 256)
    assert len(packed_rows) == 1
    packed = _token_losses(model, collate(packed_rows))
    separate = torch.cat([_token_losses(model, collate(pack([e], 256))) for e in
                          sorted(examples, key=lambda e: -len(e.input_ids))])
    # Same tokens scored in the same order (pack() keeps dataset order in a row; compare as multisets).
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
