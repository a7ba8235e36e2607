"""The prepared splits are written once each, tokenized straight into their own Arrow files: the
report still reads as if the records were one table, and each split loads as a table of its own."""

from __future__ import annotations

import json

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.data import prepare, split_indices

SHORT = {"prompt": "2+2=", "completion": "4"}
LONG = {"prompt": "word " * 100, "completion": "x"}


def test_report_reads_across_the_splits_in_record_order(tmp_path, tokenizer):
    records = [LONG if i % 3 == 0 else SHORT for i in range(24)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = prepare(path, "pvc://data/d.jsonl", Dataset(uri="pvc://data/d.jsonl", validationSplit=0.25),
                   Training(maxSeqLength=64), tokenizer, cache_dir=tmp_path / "cache")
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
