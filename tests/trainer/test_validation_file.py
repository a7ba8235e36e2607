"""A hold-out file of its own (dataset.validationUri): the training data is trained on whole, the
evaluation reads exactly the validation file's records, checked by the same readers, with errors
that name the validation file and its line."""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune.api.finetunejob import Dataset, Training
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest
from kubetune_trainer.data import DataFile, prepare
from kubetune_trainer.preference import prepare_preferences
from kubetune_trainer.recipe import FineTuneRecipe
from kubetune_trainer.records import DatasetError
from kubetune_trainer.runspec import RunSpec
from kubetune_trainer.samples import invoice_records, write_jsonl
from tests.trainer.recipe_support import make_volume, run_spec
from tests.trainer.test_datasets import _lines, _write

SHORT = {"prompt": "2+2=", "completion": "4"}
LONG = {"prompt": "word " * 100, "completion": "x"}
PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
TRAIN, HELD = "pvc://data/train.jsonl", "pvc://data/val.jsonl"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _prepare(train, held, tokenizer, **dataset):
    spec = Dataset(uri=TRAIN, validationUri=HELD, validationSplit=0.0, **dataset)
    return prepare(train, TRAIN, spec, Training(maxSeqLength=64), tokenizer, validation=DataFile(held, HELD),
                   cache_dir=train.parent / "cache")


def test_the_hold_out_is_the_validation_file_and_the_training_file_is_whole(tmp_path, tokenizer):
    train = _write(tmp_path, "train.jsonl", _lines(*[LONG if i == 4 else SHORT for i in range(10)]))
    held = _write(tmp_path, "val.jsonl", _lines(SHORT, LONG, SHORT, {"prompt": "3+3=", "completion": "6"}))
    data = _prepare(train, held, tokenizer)
    report = data.report
    assert (report.records, report.train, len(data.train)) == (10, 9, 9)  # all but the one truncated away
    assert (report.validation, len(data.validation)) == (4, 4)
    assert data.validation["where"] == [f"val.jsonl line {i}" for i in (1, 2, 3, 4)]
    assert data.validation["reference"][3] == "6" + tokenizer.eos_token
    # In record order: the training file's first, then the validation file's, each naming its file.
    assert report.truncated_where == ["line 5", "val.jsonl line 2"]
    assert (report.validation_file, report.validation_sha256, report.sha256) == (HELD, _sha(held), _sha(train))


def test_the_cache_entry_is_the_validation_file_s(tmp_path, tokenizer):
    train = _write(tmp_path, "train.jsonl", _lines(*[SHORT] * 6))
    held = _write(tmp_path, "val.jsonl", _lines(SHORT, SHORT))
    assert _prepare(train, held, tokenizer).report.validation == 2
    held.write_text(_lines(*[SHORT] * 3))
    again = _prepare(train, held, tokenizer)
    assert (again.report.validation, again.report.validation_sha256) == (3, _sha(held))
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 2


BAD = [
    ("broken", _lines(SHORT, '{"prompt": "x", "completion": }'), {},
     f"{HELD}: line 2: invalid JSON (Expecting value at column 31)"),
    ("missing-field", _lines(SHORT, {"prompt": "x"}), {}, f"{HELD}: line 2: field 'completion': is required"),
    ("other-format", _lines({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
     {}, f"{HELD}: is chat but the training data {TRAIN} is prompt-completion; a validation file must have the "
     "training data's format"),
    ("empty", "", {}, f"{HELD}: contains no records"),
    ("pinned", _lines(SHORT), {"validationSha256": "0" * 64}, f"{HELD}: sha256 {{sha}} does not match the pinned "
     f"{'0' * 64}"),
]


@pytest.mark.parametrize("content, dataset, message", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_validation_data_is_refused_naming_the_validation_file(tmp_path, tokenizer, content, dataset, message):
    train = _write(tmp_path, "train.jsonl", _lines(*[SHORT] * 4))
    held = _write(tmp_path, "val.jsonl", content)
    with pytest.raises(DatasetError) as caught:
        _prepare(train, held, tokenizer, **dataset)
    assert str(caught.value) == message.format(sha=_sha(held))


def test_an_overlong_validation_record_is_refused_where_the_spec_says_so(tmp_path, tokenizer):
    train = _write(tmp_path, "train.jsonl", _lines(*[SHORT] * 4))
    held = _write(tmp_path, "val.jsonl", _lines(SHORT, LONG))
    with pytest.raises(DatasetError) as caught:
        _prepare(train, held, tokenizer, onOverlong="refuse")
    assert (caught.value.file, caught.value.where) == (HELD, "line 2")
    count, rest = caught.value.message.split(" ", 1)
    assert int(count) > 64 and rest == "tokens exceed maxSeqLength 64 (onOverlong: refuse)"


def _prepare_pairs(train, held, tokenizer):
    spec = Dataset(uri=TRAIN, validationUri=HELD, validationSplit=0.0)
    return prepare_preferences(train, TRAIN, spec, Training(maxSeqLength=64), tokenizer, DataFile(held, HELD))


def test_dpo_holds_out_the_validation_file_s_pairs(tmp_path, tokenizer):
    train = _write(tmp_path, "train.jsonl", _lines(*[PAIR] * 5))
    held = _write(tmp_path, "val.jsonl", _lines({**PAIR, "chosen": "four"}, PAIR, PAIR))
    data = _prepare_pairs(train, held, tokenizer)
    assert (data.report.records, data.report.train, len(data.train), len(data.train_lengths)) == (5, 5, 5, 5)
    assert (data.report.validation, data.validation["chosen"]) == (3, ["four", "4", "4"])
    assert (data.report.validation_file, data.report.validation_sha256) == (HELD, _sha(held))


@pytest.mark.parametrize("content, message", [
    (_lines(PAIR, {"prompt": "x", "chosen": "y"}), f"{HELD}: line 2: field 'rejected': is required"),
    (_lines({"prompt": [{"role": "user", "content": "2+2="}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}),
     f"{HELD}: is preference-conversational but the training data {TRAIN} is preference; a validation file must "
     "have the training data's format"),
], ids=["bad-pair", "other-layout"])
def test_bad_validation_pairs_are_refused_naming_the_validation_file(tmp_path, tokenizer, content, message):
    train = _write(tmp_path, "train.jsonl", _lines(*[PAIR] * 3))
    with pytest.raises(DatasetError) as caught:
        _prepare_pairs(train, _write(tmp_path, "val.jsonl", content), tokenizer)
    assert str(caught.value) == message


@pytest.mark.slow
def test_a_run_evaluates_on_the_validation_file(tmp_path, smollm2_dir):
    volumes = make_volume(tmp_path, smollm2_dir, records=40)
    held = volumes / "data" / "holdout.jsonl"
    write_jsonl(held, invoice_records(7, seed=5))
    body = run_spec(tmp_path, volumes, dataset={"validationUri": "pvc://data/holdout.jsonl", "validationSplit": 0.0},
                    training={"maxSteps": 4})
    result = FineTuneRecipe(RunSpec.model_validate(body)).run()
    manifest = read_manifest(LocalLocation(volumes / "runs" / "job")).metadata
    data, lineage = manifest["data"], manifest["lineage"]
    # Trained on the whole training file, evaluated on exactly the validation file's records.
    assert (data["records"], data["train"], data["validation"]) == (40, 40, 7)
    assert lineage["validationDatasetUri"] == "pvc://data/holdout.jsonl"
    assert lineage["validationDatasetSha256"] == _sha(held)
    assert lineage["datasetSha256"] == _sha(volumes / "data" / "invoices.jsonl")
    assert manifest["spec"]["dataset"]["validationUri"] == "pvc://data/holdout.jsonl"
    assert result.metrics["final"]["evalLoss"] < result.metrics["baseline"]["evalLoss"]
    history = [json.loads(line) for line in (volumes / "runs" / "job" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 4 and "evalLoss" in history[-1]
