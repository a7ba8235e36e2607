"""Label and field selectors as the Kubernetes API parses them: pure functions."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Match = Callable[[dict], bool]
_SET = re.compile(r"^\s*([^\s!=,()]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses: `a in (x,y),b=c` is two requirements."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def _requirement(text: str, get: Callable[[dict, str], Any]) -> Match:
    if m := _SET.match(text):
        key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
        return (lambda o: get(o, key) in values) if op == "in" else (lambda o: get(o, key) not in values)
    if op := next((op for op in ("!=", "==", "=") if op in text), None):
        key, _, value = (s.strip() for s in text.partition(op))
        return (lambda o: get(o, key) != value) if op == "!=" else (lambda o: get(o, key) == value)
    if text.startswith("!"):
        return lambda o: get(o, text[1:].strip()) is None
    return lambda o: get(o, text) is not None


def _label(obj: dict, key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(key)


def _field(obj: dict, path: str) -> str | None:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value)


def label_selector(selector: str | None) -> Match:
    requirements = [_requirement(r, _label) for r in _split(selector or "")]
    return lambda obj: all(r(obj) for r in requirements)


def field_selector(selector: str | None) -> Match:
    requirements = [_requirement(r, _field) for r in _split(selector or "")]
    return lambda obj: all(r(obj) for r in requirements)
