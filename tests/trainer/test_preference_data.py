"""Preference pairs for DPO: bad records get a message naming the file, the line and the field,
as the SFT readers' do; good ones, in either of TRL's layouts, come out as TRL's preference format."""

from __future__ import annotations

import pytest

from kubetune.api.finetunejob import Dataset, Training
from kubetune_trainer.pairs import CONVERSATIONAL, STANDARD
from kubetune_trainer.preference import prepare_preferences
from kubetune_trainer.records import DatasetError
from tests.trainer.test_datasets import _lines, _write

GOOD = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
USER = [{"role": "user", "content": "2+2="}]
CHAT = {"prompt": USER, "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}


def _prepare(tmp_path, name: str, content: str, tokenizer, **dataset):
    path = _write(tmp_path, name, content)
    training = Training(maxSeqLength=dataset.pop("max_len", 64))
    return prepare_preferences(path, f"pvc://data/{name}", Dataset(uri=f"pvc://data/{name}", **dataset), training,
                               tokenizer)


BAD = [
    ("no-rejected", _lines(GOOD, {"prompt": "x", "chosen": "y"}), {},
     "pvc://data/no-rejected.jsonl: line 2: field 'rejected': is required"),
    ("no-chosen", _lines({"prompt": "x", "rejected": "y"}), {},
     "pvc://data/no-chosen.jsonl: line 1: field 'chosen': is required"),
    ("no-prompt", _lines({"chosen": "x", "rejected": "y"}), {},
     "pvc://data/no-prompt.jsonl: line 1: field 'prompt': is required"),
    ("identical", _lines(GOOD, {"prompt": "x", "chosen": "same", "rejected": "same"}), {},
     "pvc://data/identical.jsonl: line 2: field 'rejected': is identical to chosen: a preference pair must differ"),
    ("identical-chat", _lines({**CHAT, "rejected": CHAT["chosen"]}), {},
     "pvc://data/identical-chat.jsonl: line 1: field 'rejected': is identical to chosen: a preference pair must "
     "differ"),
    ("mistyped", _lines({**GOOD, "chosen": 4}), {},
     "pvc://data/mistyped.jsonl: line 1: field 'chosen': must be a string, got int"),
    ("empty-rejected", _lines({**GOOD, "rejected": " "}), {},
     "pvc://data/empty-rejected.jsonl: line 1: field 'rejected': must not be empty"),
    ("empty-prompt", _lines({**GOOD, "prompt": ""}), {},
     "pvc://data/empty-prompt.jsonl: line 1: field 'prompt': must not be empty"),
    ("chat-string-completion", _lines({**CHAT, "chosen": "4"}), {},
     "pvc://data/chat-string-completion.jsonl: line 1: field 'chosen': must be a list of messages as prompt is "
     "(a conversation), got str"),
    ("string-prompt-chat-completion", _lines({**GOOD, "rejected": CHAT["rejected"]}), {},
     "pvc://data/string-prompt-chat-completion.jsonl: line 1: field 'rejected': must be a string, got list"),
    ("chat-role", _lines({**CHAT, "chosen": [{"role": "bot", "content": "4"}]}), {},
     "pvc://data/chat-role.jsonl: line 1: field 'chosen[0].role': unknown role 'bot' "
     "(expected one of system, user, assistant, tool)"),
    ("chat-content", _lines({**CHAT, "prompt": [{"role": "user", "content": 2}]}), {},
     "pvc://data/chat-content.jsonl: line 1: field 'prompt[0].content': must be a string, got int"),
    ("chat-empty", _lines({**CHAT, "rejected": []}), {},
     "pvc://data/chat-empty.jsonl: line 1: field 'rejected': must be a non-empty list of messages"),
    ("chat-not-assistant", _lines({**CHAT, "chosen": [{"role": "user", "content": "4"}]}), {},
     "pvc://data/chat-not-assistant.jsonl: line 1: field 'chosen': must end with an assistant message"),
    ("mixed-layouts", _lines(GOOD, CHAT), {},
     "pvc://data/mixed-layouts.jsonl: line 2: is preference-conversational but the first record (line 1) is "
     "preference; use one layout for the whole dataset"),
    ("overlong", _lines(GOOD, {**GOOD, "chosen": "word " * 100}), {"on_overlong": "refuse"},
     "pvc://data/overlong.jsonl: line 2: 106 tokens exceed maxSeqLength 64 (onOverlong: refuse)"),
]


@pytest.mark.parametrize("name,content,options,message", BAD, ids=[b[0] for b in BAD])
def test_bad_preference_message(tmp_path, tokenizer, name, content, options, message):
    with pytest.raises(DatasetError) as info:
        _prepare(tmp_path, f"{name}.jsonl", content, tokenizer, **options)
    assert str(info.value) == message


def test_sha256_pin(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match=r"^pvc://data/pinned.jsonl: sha256 [0-9a-f]{64} does not match"):
        _prepare(tmp_path, "pinned.jsonl", _lines(GOOD, GOOD), tokenizer, sha256="0" * 64)


def test_standard_pairs_split_and_report(tmp_path, tokenizer):
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(20)]
    data = _prepare(tmp_path, "pairs.jsonl", _lines(*pairs), tokenizer, validation_split=0.25)
    assert (data.report.format, data.report.records, data.report.train, data.report.validation) == (STANDARD, 20,
                                                                                                     15, 5)
    assert set(data.train.column_names) == {"prompt", "chosen", "rejected", "where", "row"}
    where = list(data.train["where"]) + list(data.validation["where"])
    assert sorted(where) == sorted(f"line {i}" for i in range(1, 21))


def test_conversational_pairs_keep_their_messages(tmp_path, tokenizer):
    other = {**CHAT, "chosen": [{"role": "assistant", "content": "four"}]}
    data = _prepare(tmp_path, "chat.jsonl", _lines(CHAT, other), tokenizer, validation_split=0.0)
    assert data.report.format == CONVERSATIONAL and data.report.train == 2
    assert data.train[0]["prompt"] == USER and data.train[0]["rejected"] == CHAT["rejected"]
