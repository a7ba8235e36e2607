"""The prepared splits are written once each, tokenized straight into their own Arrow files: the
report still reads as if the records were one table, and each split loads as a table of its own."""

from __future__ import annotations

from kubetune.api.finetunejob import Training
from kubetune_trainer.data import split_indices
from tests.trainer.test_datasets import _lines, _prepare, _write

SHORT = {"prompt": "2+2=", "completion": "4"}
LONG = {"prompt": "word " * 100, "completion": "x"}


def test_report_reads_across_the_splits_in_record_order(tmp_path, tokenizer):
    records = [LONG if i % 3 == 0 else SHORT for i in range(24)]
    data = _prepare(_write(tmp_path, "d.jsonl", _lines(*records)), tokenizer, validationSplit=0.25)
    train_idx, val_idx = split_indices(24, 0.25, Training().seed)
    assert {records[i] is LONG for i in val_idx} == {True, False}  # the overlong ones fall in both splits
    assert data.report.truncated == data.report.no_loss_tokens == 8
    assert data.report.truncated_where == [f"line {i + 1}" for i in range(0, 24, 3)]
    assert data.report.train == len(data.train) == sum(records[i] is SHORT for i in train_idx)
    assert data.report.validation == len(data.validation) == len(val_idx)
    assert data.validation["where"] == [f"line {i + 1}" for i in val_idx]
    # No row selection over a shared table: a split's Arrow data is exactly its rows.
    for split in (data.train, data.validation, data.rows):
        assert split.data.num_rows == len(split)
    assert data.rows["row"] == list(range(len(data.rows)))
    assert sum(map(sum, data.rows["seq_lengths"])) == data.report.tokens
