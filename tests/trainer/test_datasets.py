"""Bad data gets a message naming the file, the line or row, and the field; good data is checked too."""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.data import IGNORE, prepare, split_indices
from kubetune_trainer.records import DatasetError

GOOD = {"prompt": "2+2=", "completion": "4"}


def _write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _prepare(path, tokenizer, **dataset):
    training = Training(maxSeqLength=dataset.pop("max_len", 64))
    return prepare(path, f"pvc://data/{path.name}", Dataset(uri=f"pvc://data/{path.name}", **dataset), training,
                   tokenizer, cache_dir=path.parent / "cache")


def _lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


BAD = [
    ("empty.jsonl", "", {}, "pvc://data/empty.jsonl: contains no records"),
    ("blank.jsonl", "\n\n", {}, "pvc://data/blank.jsonl: contains no records"),
    ("broken.jsonl", _lines(GOOD, '{"prompt": "x", "completion": }'), {},
     "pvc://data/broken.jsonl: line 2: invalid JSON (Expecting value at column 31)"),
    ("array.jsonl", _lines(GOOD, [1, 2]), {}, "pvc://data/array.jsonl: line 2: expected a JSON object, got list"),
    ("missing.jsonl", _lines(GOOD, {"prompt": "x", "completion": None}), {},
     "pvc://data/missing.jsonl: line 2: field 'completion': is required"),
    ("mistyped.jsonl", _lines(GOOD, {"prompt": "x", "completion": 4}), {},
     "pvc://data/mistyped.jsonl: line 2: field 'completion': must be a string, got int"),
    ("alpaca.jsonl", _lines({"instruction": "", "output": "y"}), {},
     "pvc://data/alpaca.jsonl: line 1: field 'instruction': must not be empty"),
    ("role.jsonl", _lines({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}), {},
     "pvc://data/role.jsonl: line 1: field 'messages[1].role': unknown role 'bot' "
     "(expected one of system, user, assistant, tool)"),
    ("content.jsonl", _lines({"messages": [{"role": "user", "content": ["hi"]}]}), {},
     "pvc://data/content.jsonl: line 1: field 'messages[0].content': must be a string, got list"),
    ("noassistant.jsonl", _lines({"messages": [{"role": "user", "content": "hi"}]}), {},
     "pvc://data/noassistant.jsonl: line 1: field 'messages': has no assistant message to learn from"),
    ("nomessages.jsonl", _lines({"messages": []}), {},
     "pvc://data/nomessages.jsonl: line 1: field 'messages': must be a non-empty list of messages"),
    ("unknown.jsonl", _lines({"question": "q", "answer": "a"}), {},
     "pvc://data/unknown.jsonl: line 1: cannot detect the format from fields ['answer', 'question']: expected "
     "messages (chat), instruction+output (alpaca), prompt+completion, or text"),
    ("wrongformat.jsonl", _lines(GOOD), {"format": "alpaca"},
     "pvc://data/wrongformat.jsonl: line 1: field 'instruction': is required"),
    ("long.jsonl", _lines(GOOD, {"prompt": "word " * 100, "completion": "x"}), {"on_overlong": "refuse"},
     "pvc://data/long.jsonl: line 2: 103 tokens exceed maxSeqLength 64 (onOverlong: refuse)"),
    ("rows.csv", "prompt,completion\na,b\nc,d,e\n", {}, "pvc://data/rows.csv: line 3: more values than header columns"),
    ("data.txt", "hello", {}, "pvc://data/data.txt: unsupported file type '.txt'; use one of .jsonl, .json, .parquet, .csv"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', {}, "pvc://data/latin1.jsonl: not UTF-8 text (byte 13)"),
    ("notlist.json", json.dumps({"data": []}), {}, "pvc://data/notlist.json: expected a JSON array of objects, got dict"),
    ("items.json", json.dumps([GOOD, "x"]), {}, "pvc://data/items.json: record 2: expected a JSON object, got str"),
    ("textfield.jsonl", _lines({"text": 3}), {}, "pvc://data/textfield.jsonl: line 1: field 'text': must be a string, got int"),
]


@pytest.mark.parametrize("name,content,options,message", BAD, ids=[b[0] for b in BAD])
def test_bad_dataset_message(tmp_path, tokenizer, name, content, options, message):
    path = _write(tmp_path, name, content)
    with pytest.raises(DatasetError) as info:
        _prepare(path, tokenizer, **options)
    assert str(info.value) == message


def test_sha256_pin(tmp_path, tokenizer):
    path = _write(tmp_path, "pinned.jsonl", _lines(GOOD, GOOD))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DatasetError, match=f"sha256 {digest} does not match the pinned 0000"):
        _prepare(path, tokenizer, sha256="0" * 64)
    assert _prepare(path, tokenizer, sha256=digest).report.sha256 == digest


def test_broken_parquet_is_named(tmp_path, tokenizer):
    path = _write(tmp_path, "bad.parquet", b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"^pvc://data/bad.parquet: not a readable Parquet file"):
        _prepare(path, tokenizer)


def test_overlong_truncated_and_counted(tmp_path, tokenizer):
    path = _write(tmp_path, "long.jsonl", _lines(GOOD, {"prompt": "word " * 100, "completion": "x"}, GOOD))
    data = _prepare(path, tokenizer, validation_split=0)
    assert data.report.truncated == 1 and data.report.truncated_where == ["line 2"]
    assert data.report.no_loss_tokens == 1  # its completion was cut away, and the report says so
    assert data.report.train == 2 and max(len(ids) for ids in data.train["input_ids"]) <= 64


def test_completion_only_labels(tmp_path, tokenizer):
    data = _prepare(_write(tmp_path, "d.jsonl", _lines(GOOD)), tokenizer, validation_split=0)
    labels = data.train[0]["labels"]
    prompt_len = len(tokenizer("2+2=", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert tokenizer.decode(labels[prompt_len:]) == "4" + tokenizer.eos_token


def test_chat_trains_on_every_assistant_turn_only(tmp_path, tokenizer):
    conversation = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]}
    data = _prepare(_write(tmp_path, "c.jsonl", _lines(conversation)), tokenizer, validation_split=0, max_len=256)
    trained = tokenizer.decode([t for t in data.train[0]["labels"] if t != IGNORE])
    assert trained == "Hello!<|im_end|>\nSee you.<|im_end|>\n"
    assert data.report.format == "chat"


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_file_type_gives_the_same_examples(tmp_path, tokenizer, suffix):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        path.write_text(_lines(*records))
    elif suffix == "json":
        path.write_text(json.dumps(records))
    elif suffix == "csv":
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    data = _prepare(path, tokenizer, validation_split=0.2)
    reference = _prepare(_write(tmp_path, "ref.jsonl", _lines(*records)), tokenizer, validation_split=0.2)
    assert list(data.train["input_ids"]) + list(data.validation["input_ids"]) == (
        list(reference.train["input_ids"]) + list(reference.validation["input_ids"]))


def test_split_is_deterministic_and_disjoint():
    train, val = split_indices(100, 0.1, seed=7)
    assert (train, val) == split_indices(100, 0.1, seed=7)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.1, seed=8)[1] != val


BOM = "\ufeff"


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_byte_order_mark_and_crlf_are_accepted(tmp_path, tokenizer, suffix):
    """Files saved by Windows tools: a UTF-8 BOM before the first byte, CRLF line endings."""
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    if suffix == "jsonl":
        text = "".join(json.dumps(r) + "\r\n" for r in records)
    elif suffix == "json":
        text = json.dumps(records, indent=1).replace("\n", "\r\n")
    else:
        text = "prompt,completion\r\n" + "".join(f"{r['prompt']},{r['completion']}\r\n" for r in records)
    windows = _prepare(_write(tmp_path, f"win.{suffix}", (BOM + text).encode()), tokenizer, validation_split=0)
    plain = _prepare(_write(tmp_path, "ref.jsonl", _lines(*records)), tokenizer, validation_split=0)
    assert windows.report.records == 6 and windows.report.format == "prompt-completion"
    assert windows.train["input_ids"] == plain.train["input_ids"]


def test_directory_of_parts_is_read_in_name_order_and_errors_name_the_part(tmp_path, tokenizer):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-0002.jsonl").write_text(_lines({"prompt": "q3", "completion": "a3"}))
    (parts / "part-0001.jsonl").write_text(_lines({"prompt": "q1", "completion": "a1"},
                                                  {"prompt": "q2", "completion": "a2"}))
    (parts / "_SUCCESS").write_text("")  # what Spark leaves beside its parts: not data

    def prepare_parts():
        return prepare(parts, "pvc://data/parts", Dataset(uri="pvc://data/parts", validationSplit=0),
                       Training(maxSeqLength=64), tokenizer, cache_dir=tmp_path / "cache")

    data = prepare_parts()
    assert data.report.records == 3
    assert data.train["where"] == ["part-0001.jsonl line 1", "part-0001.jsonl line 2", "part-0002.jsonl line 1"]
    assert data.train["reference"] == ["a1" + tokenizer.eos_token, "a2" + tokenizer.eos_token,
                                       "a3" + tokenizer.eos_token]
    (parts / "part-0003.jsonl").write_text(_lines(GOOD, {"prompt": "x", "completion": 4}))
    with pytest.raises(DatasetError) as info:
        prepare_parts()
    assert str(info.value) == "pvc://data/parts/part-0003.jsonl: line 2: field 'completion': must be a string, got int"
    (parts / "part-0003.jsonl").unlink()
    (parts / "part-0004.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(DatasetError, match=r"^pvc://data/parts: parts of several file types \(.csv, .jsonl\)"):
        prepare_parts()


def test_prepared_data_is_cached_by_content_tokenizer_and_fields(tmp_path, tokenizer, monkeypatch):
    import kubetune_trainer.data as data_module

    path = _write(tmp_path, "d.jsonl", _lines(*[{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(8)]))
    first = _prepare(path, tokenizer, validation_split=0.25)
    cache = tmp_path / "cache" / "prepared"
    assert len(list(cache.iterdir())) == 1

    def must_not_build(*args, **kwargs):
        raise AssertionError("prepared again although cached")

    with monkeypatch.context() as patched:
        patched.setattr(data_module, "_build", must_not_build)
        again = _prepare(path, tokenizer, validation_split=0.25)
    assert again.rows["input_ids"] == first.rows["input_ids"] and again.report == first.report
    _prepare(path, tokenizer, validation_split=0.25, max_len=32)  # a field that changes the rows
    path.write_text(_lines(GOOD))  # other bytes
    _prepare(path, tokenizer, validation_split=0.25)
    assert len(list(cache.iterdir())) == 3


def test_errors_in_tokenizing_workers_are_reported_as_in_one_process(tmp_path, tokenizer, monkeypatch):
    import kubetune_trainer.data as data_module

    monkeypatch.setattr(data_module, "_MAP_BATCH", 2)
    monkeypatch.setattr(data_module, "_workers", lambda records: 2)
    path = _write(tmp_path, "w.jsonl", _lines(GOOD, GOOD, GOOD, {"prompt": "x", "completion": None}))
    with pytest.raises(DatasetError) as info:
        _prepare(path, tokenizer)
    assert str(info.value) == "pvc://data/w.jsonl: line 4: field 'completion': is required"
