"""Reading dataset files into records, with errors that name the file, the line or row, and the field."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DatasetError(ValueError):
    """Bad data. The message names the file, where in it, and the field."""

    def __init__(self, file: str, message: str, where: str | None = None, field: str | None = None):
        self.file, self.where, self.field = file, where, field
        parts = [file] + ([where] if where else []) + ([f"field '{field}'"] if field else [])
        super().__init__(": ".join(parts) + ": " + message)


@dataclass(frozen=True)
class Record:
    where: str  # "line 3", "row 7", "record 2"
    data: dict[str, Any]


def _jsonl(path: Path, name: str) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # a blank line holds no record; nothing is dropped
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(name, f"invalid JSON ({exc.msg} at column {exc.colno})", f"line {number}") from exc
            if not isinstance(value, dict):
                raise DatasetError(name, f"expected a JSON object, got {type(value).__name__}", f"line {number}")
            records.append(Record(f"line {number}", value))
    return records


def _json(path: Path, name: str) -> list[Record]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(name, f"invalid JSON ({exc.msg})", f"line {exc.lineno}") from exc
    if not isinstance(value, list):
        raise DatasetError(name, f"expected a JSON array of objects, got {type(value).__name__}")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DatasetError(name, f"expected a JSON object, got {type(item).__name__}", f"record {index}")
    return [Record(f"record {i}", item) for i, item in enumerate(value, start=1)]


def _parquet(path: Path, name: str) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a broken file
        raise DatasetError(name, f"not a readable Parquet file ({exc})") from exc
    return [Record(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def _csv(path: Path, name: str) -> list[Record]:
    records = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            return []
        for row in reader:
            if None in row:
                raise DatasetError(name, "more values than header columns", f"line {reader.line_num}")
            records.append(Record(f"line {reader.line_num}", {k: v for k, v in row.items()}))
    return records


_READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _csv}


def read_records(path: Path, name: str | None = None) -> list[Record]:
    """All records of a dataset file; `name` is what errors call the file (its URI)."""
    name = name or str(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(name, f"unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        records = reader(path, name)
    except UnicodeDecodeError as exc:
        raise DatasetError(name, f"not UTF-8 text (byte {exc.start})") from exc
    if not records:
        raise DatasetError(name, "contains no records")
    return records
