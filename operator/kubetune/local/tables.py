"""Server-side printing (meta.k8s.io/v1 Table), which `kubectl get` asks for: the CRD's printer
columns for custom resources, Name and Age for the rest. Pure functions."""

from __future__ import annotations

import datetime
from typing import Any

from kubetune.api.meta import parse_rfc3339

NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace."}
AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp", "priority": 0,
              "description": "CreationTimestamp is the time the object was created."}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _at(obj: Any, json_path: str) -> Any:
    for part in json_path.lstrip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def human_age(timestamp: str, now: datetime.datetime) -> str:
    """As the API server renders date columns: 45s, 12m, 3h, 2d."""
    then = parse_rfc3339(timestamp)
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _cell(obj: dict, column: dict, now: datetime.datetime) -> Any:
    value = _at(obj, column["jsonPath"])
    if value is None:
        return None
    if column["type"] == "date":
        return human_age(str(value), now)
    return value


def to_table(objects: list[dict], printer_columns: list[dict] | None, resource_version: str,
             now: datetime.datetime | None = None) -> dict:
    now = now or datetime.datetime.now(datetime.UTC)
    columns = list(printer_columns) if printer_columns else [AGE_COLUMN]
    definitions = [NAME_COLUMN] + [{k: c.get(k, "" if k != "priority" else 0) for k in
                                    ("name", "type", "format", "description", "priority")} for c in columns]
    rows = [{"cells": [obj["metadata"]["name"]] + [_cell(obj, c, now) for c in columns],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": obj["metadata"]}} for obj in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": definitions, "rows": rows}
