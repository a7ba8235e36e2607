"""Reading dataset files into records, with errors that name the file, the line or row, and the field.

Records stream: a reader yields one record at a time, so a million-row file is never a Python list
(the `datasets` Arrow table built from them holds the data). Text files may start with a UTF-8
byte-order mark and may end their lines with CRLF, as Windows tools write them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# "utf-8-sig" drops a leading byte-order mark and is plain UTF-8 otherwise.
TEXT_ENCODING = "utf-8-sig"


class DatasetError(ValueError):
    """Bad data. The message names the file, where in it, and the field."""

    def __init__(self, file: str, message: str, where: str | None = None, field: str | None = None):
        self.file, self.message, self.where, self.field = file, message, where, field
        parts = [file] + ([where] if where else []) + ([f"field '{field}'"] if field else [])
        super().__init__(": ".join(parts) + ": " + message)

    def __reduce__(self):
        # Raised inside `datasets` worker processes (map with num_proc) and re-raised in the parent.
        return DatasetError, (self.file, self.message, self.where, self.field)


@dataclass(frozen=True)
class Record:
    where: str  # "line 3", "row 7", "record 2"
    data: dict[str, Any]
    file: str = ""  # what errors call the file it came from (a directory's part: the part)


def _jsonl(path: Path, name: str) -> Iterator[Record]:
    with open(path, encoding=TEXT_ENCODING) as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # a blank line holds no record; nothing is dropped
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(name, f"invalid JSON ({exc.msg} at column {exc.colno})", f"line {number}") from exc
            if not isinstance(value, dict):
                raise DatasetError(name, f"expected a JSON object, got {type(value).__name__}", f"line {number}")
            yield Record(f"line {number}", value, name)


def _json(path: Path, name: str) -> Iterator[Record]:
    try:
        value = json.loads(path.read_text(encoding=TEXT_ENCODING))
    except json.JSONDecodeError as exc:
        raise DatasetError(name, f"invalid JSON ({exc.msg})", f"line {exc.lineno}") from exc
    if not isinstance(value, list):
        raise DatasetError(name, f"expected a JSON array of objects, got {type(value).__name__}")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DatasetError(name, f"expected a JSON object, got {type(item).__name__}", f"record {index}")
        yield Record(f"record {index}", item, name)


def _parquet(path: Path, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield Record(f"row {number}", row, name)
    except Exception as exc:
        raise DatasetError(name, f"not a readable Parquet file ({exc})") from exc


def _csv(path: Path, name: str) -> Iterator[Record]:
    with open(path, encoding=TEXT_ENCODING, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            return
        for row in reader:
            if None in row:
                raise DatasetError(name, "more values than header columns", f"line {reader.line_num}")
            yield Record(f"line {reader.line_num}", dict(row), name)


_READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _csv}


def dataset_parts(path: Path, name: str) -> list[tuple[Path, str]]:
    """The files of a dataset and what errors call each: the file itself, or a directory's parts
    (every supported file, in name order), each named `name/part`."""
    if not path.is_dir():
        return [(path, name)]
    parts = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not parts:
        raise DatasetError(name, f"a directory with no dataset parts ({', '.join('*' + s for s in SUFFIXES)})")
    suffixes = {p.suffix.lower() for p in parts}
    if len(suffixes) > 1:
        raise DatasetError(name, f"parts of several file types ({', '.join(sorted(suffixes))}); use one")
    return [(p, f"{name.rstrip('/')}/{p.name}") for p in parts]


def iter_records(path: Path, name: str | None = None) -> Iterator[Record]:
    """Every record of a dataset file or directory of parts, in order; `name` is what errors call it (its URI)."""
    name = name or str(path)
    empty = True
    for part, part_name in dataset_parts(path, name):
        reader = _READERS.get(part.suffix.lower())
        if reader is None:
            raise DatasetError(part_name, f"unsupported file type {part.suffix!r}; use one of {', '.join(SUFFIXES)}")
        try:
            for record in reader(part, part_name):
                empty = False
                yield record
        except UnicodeDecodeError as exc:
            raise DatasetError(part_name, f"not UTF-8 text (byte {exc.start})") from exc
    if empty:
        raise DatasetError(name, "contains no records")


def read_records(path: Path, name: str | None = None) -> list[Record]:
    """All records of a dataset file at once (small files: checks and tests)."""
    return list(iter_records(path, name))
