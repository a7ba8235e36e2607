"""`kubetune datasets check` and `push`: the trainer's readers and formatting on the laptop, the same
messages, exit 1 on bad data, a report with the sha256 to pin; push uploads what it checked."""

from __future__ import annotations

import hashlib
import json

from kubetune.cli import main
from kubetune_trainer.samples import invoice_records, write_jsonl


def test_check_reports_what_the_trainer_would_do(tmp_path, smollm2_dir, capsys):
    path = write_jsonl(tmp_path / "invoices.jsonl", invoice_records(40) + [{"prompt": "word " * 200,
                                                                            "completion": "x"}])
    assert main(["datasets", "check", str(path), "--tokenizer", str(smollm2_dir), "--max-seq-length", "128",
                 "--validation-split", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (report["records"], report["format"], report["holdout"]) == (41, "prompt-completion", 4)
    assert report["truncated"] == 1 and report["truncatedWhere"] == ["line 41"]
    assert report["tokenLengths"]["p50"] < 128 and report["maxSeqLength"] == 128


def test_check_fails_bad_data_with_the_trainers_message(tmp_path, smollm2_dir, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "2+2=", "completion": "4"}\n{"prompt": "x", "completion": 4}\n')
    assert main(["datasets", "check", str(path), "--tokenizer", str(smollm2_dir)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"kubetune datasets check: {path}: line 2: field 'completion': must be a string, got int")


def test_push_checks_uploads_and_prints_the_sha256(tmp_path, smollm2_dir, store_env, s3_bucket, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", invoice_records(10))
    uri = f"s3://{s3_bucket.bucket}/data/train.jsonl"
    assert main(["datasets", "push", str(path), uri, "--tokenizer", str(smollm2_dir)]) == 0
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"dataset.sha256: {digest}" in capsys.readouterr().out
    assert s3_bucket.get_bytes("data/train.jsonl") == path.read_bytes()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": null}\n')
    assert main(["datasets", "push", str(bad), f"s3://{s3_bucket.bucket}/data/bad.jsonl",
                 "--tokenizer", str(smollm2_dir)]) == 1
    assert "line 1: field 'completion': is required" in capsys.readouterr().err
    assert [o.rel for o in s3_bucket.list("data")] == ["data/train.jsonl"]  # nothing bad was uploaded
