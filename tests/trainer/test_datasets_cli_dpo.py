"""`kubetune datasets check --method dpo`: the trainer's preference reader on the laptop, with its
messages, exit 1 on bad data, and the report."""

from __future__ import annotations

import hashlib
import json

from kubetune.cli import main
from kubetune_trainer.samples import invoice_preference_records, write_jsonl


def test_check_dpo_reports_pairs(tmp_path, smollm2_dir, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", invoice_preference_records(20) + [
        {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}])
    assert main(["datasets", "check", str(path), "--method", "dpo", "--tokenizer", str(smollm2_dir),
                 "--max-seq-length", "128", "--validation-split", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (report["records"], report["format"], report["holdout"], report["train"]) == (21, "preference", 2, 19)
    assert report["truncated"] == 1 and report["truncatedWhere"] == ["line 21"]
    assert report["tokenLengths"]["p50"] < 128 <= report["tokenLengths"]["max"]


def test_check_dpo_fails_bad_pairs_with_the_trainers_message(tmp_path, smollm2_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n{"prompt": "x", "chosen": "y"}\n')
    assert main(["datasets", "check", str(path), "--method", "dpo", "--tokenizer", str(smollm2_dir)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"kubetune datasets check: {path}: line 2: field 'rejected': is required")
    # The SFT check of the same file does not know preference pairs: the method decides the reader.
    good = write_jsonl(tmp_path / "pairs.jsonl", invoice_preference_records(3))
    assert main(["datasets", "check", str(good), "--tokenizer", str(smollm2_dir)]) == 1
    assert "cannot detect the format" in capsys.readouterr().err
