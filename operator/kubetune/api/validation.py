"""Offline validation of manifests with the same models (and so the same rules) the operator uses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from kubetune.api.crd import KINDS
from kubetune.api.meta import API_VERSION, GROUP
from kubetune.api.resource import Resource

KIND_MODELS: dict[str, type[Resource]] = {k.model_fields["kind"].default: k for k in KINDS}


@dataclass(frozen=True)
class Problem:
    path: str  # e.g. spec.lora.r or spec.resources.tolerations[0].effect
    message: str


@dataclass(frozen=True)
class Finding:
    source: str
    kind: str
    name: str
    problem: Problem

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}/{self.name}: {self.problem.path}: {self.problem.message}"


def _join(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: ErrorDetails) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def problems_of(error: ValidationError) -> list[Problem]:
    """One Problem per broken field or rule, each with its full field path."""
    found: list[Problem] = []
    for err in error.errors():
        if err["type"] == "kubetune_rules":
            for rel, message in err["ctx"]["rules"]:
                found.append(Problem(_join([*err["loc"], *rel.split(".")]), message))
        else:
            found.append(Problem(_join(err["loc"]), _message(err)))
    return found


def validate_object(doc: Any) -> tuple[Resource | None, list[Problem]]:
    """Parse one manifest of ours; problems name field paths from the document's root."""
    if not isinstance(doc, dict):
        return None, [Problem("", "a manifest must be a mapping")]
    if doc.get("apiVersion") != API_VERSION:
        return None, [Problem("apiVersion", f"must be {API_VERSION}")]
    model = KIND_MODELS.get(doc.get("kind"))  # type: ignore[arg-type]
    if model is None:
        return None, [Problem("kind", f"must be one of {', '.join(KIND_MODELS)}")]
    try:
        return model.model_validate(doc), []
    except ValidationError as exc:
        return None, problems_of(exc)


def is_ours(doc: Any) -> bool:
    return isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith(GROUP + "/")


def validate_text(text: str, source: str) -> tuple[int, list[Finding]]:
    """Validate every kubetune document of a YAML stream; other kinds (Secrets, ...) are skipped."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        return 0, [Finding(source, "?", "?", Problem("", f"not valid YAML: {exc}"))]
    checked, findings = 0, []
    for index, doc in enumerate(docs):
        if not is_ours(doc):
            continue
        checked += 1
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = str(meta.get("name") or f"<document {index}>")
        _, problems = validate_object(doc)
        findings += [Finding(source, str(doc.get("kind")), name, p) for p in problems]
    return checked, findings


def validate_paths(paths: Iterable[Path]) -> tuple[int, list[Finding]]:
    checked, findings = 0, []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                findings.append(Finding(str(file), "?", "?", Problem("", f"cannot read: {exc}")))
                continue
            n, found = validate_text(text, str(file))
            checked, findings = checked + n, findings + found
    return checked, findings
