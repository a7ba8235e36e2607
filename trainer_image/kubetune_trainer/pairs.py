"""Checking preference records (DPO's prompt, chosen and rejected) with errors that name the file,
the line or row, and the field. Plain Python, no torch: the OpenAI API server checks uploads with it.

Two layouts, TRL's: standard (three strings, the completions appended to the prompt) and
conversational (three lists of {role, content} messages: the prompt's turns, then the chosen and
the rejected assistant turns). A dataset uses one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kubetune_trainer.formats import messages_field, string_field
from kubetune_trainer.records import DatasetError, Record, iter_records

STANDARD, CONVERSATIONAL = "preference", "preference-conversational"
FIELDS = ("prompt", "chosen", "rejected")


def _completion(record: Record, file: str, field: str) -> list[dict[str, str]]:
    value = record.data[field]
    if not isinstance(value, list):
        raise DatasetError(file, f"must be a list of messages as prompt is (a conversation), got "
                           f"{type(value).__name__}", record.where, field)
    messages = messages_field(value, record, file, field)
    if messages[-1]["role"] != "assistant":
        raise DatasetError(file, "must end with an assistant message", record.where, field)
    return messages


def check_pair(record: Record, file: str) -> tuple[str, dict]:
    """The record's layout and its (prompt, chosen, rejected); raises DatasetError on a bad record."""
    for field in FIELDS:
        if record.data.get(field) is None:
            raise DatasetError(file, "is required", record.where, field)
    pair: dict[str, Any]
    if isinstance(record.data["prompt"], list):
        layout = CONVERSATIONAL
        pair = {"prompt": messages_field(record.data["prompt"], record, file, "prompt"),
                "chosen": _completion(record, file, "chosen"), "rejected": _completion(record, file, "rejected")}
    else:
        layout = STANDARD
        pair = {field: string_field(record, file, field) for field in FIELDS}
    if pair["chosen"] == pair["rejected"]:
        raise DatasetError(file, "is identical to chosen: a preference pair must differ", record.where, "rejected")
    return layout, pair


def iter_pairs(records: Iterable[Record], name: str) -> Iterator[tuple[str, dict]]:
    """Each checked pair with the dataset's one layout (the first record's); a record of another
    layout is refused. Streams: the API's upload check counts a large upload through it."""
    layout, first_where = None, None
    for record in records:
        file = record.file or name
        this, pair = check_pair(record, file)
        if layout is None:
            layout, first_where = this, record.where
        elif this != layout:
            raise DatasetError(file, f"is {this} but the first record ({first_where}) is {layout}; "
                               "use one layout for the whole dataset", record.where)
        where = record.where if file == name else f"{file.rpartition('/')[2]} {record.where}"
        yield layout, {**pair, "where": where}


def read_pairs(path: Path, name: str) -> tuple[str, list[dict]]:
    """Every checked pair of a dataset file or directory of parts, and their one layout."""
    checked = list(iter_pairs(iter_records(path, name), name))  # iter_records raises on no records
    return checked[0][0], [pair for _, pair in checked]


def is_preference(record: Record) -> bool:
    """Whether a record is a preference pair rather than one of the SFT formats."""
    return "chosen" in record.data or "rejected" in record.data
