"""The README's field reference, generated from the same models as the CRDs."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kubetune.api.crd import KINDS

BEGIN = "<!-- BEGIN GENERATED REFERENCE (kubetune crds generate) -->"
END = "<!-- END GENERATED REFERENCE -->"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is list:
            inner = _submodel(typing.get_args(arg)[0])
            if inner:
                return inner
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "map"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, "object")
    return "string"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{field.alias or name}"
        if field.default is not PydanticUndefined:
            default = "" if field.default is None else f"`{json.dumps(field.default)}`"
        else:
            default = "*(object)*" if field.default_factory else "**required**"
        desc = (field.description or "").replace("|", "\\|")
        sub = _submodel(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        type_name = _type_name(field.annotation) if sub is None else ("list of object" if is_list else "object")
        rows.append(f"| `{path}` | {type_name} | {default} | {desc} |")
        if sub is not None:
            rows += _rows(sub, path + ("[]" if is_list else ""))
    return rows


def reference_markdown() -> str:
    parts = [BEGIN]
    for kind in KINDS:
        spec = kind.model_fields["spec"].annotation
        assert isinstance(spec, type) and issubclass(spec, BaseModel), spec
        parts += [f"\n#### {kind.model_fields['kind'].default} spec\n", "| field | type | default | meaning |",
                  "|---|---|---|---|", *_rows(spec, "spec")]
    parts.append(END)
    return "\n".join(parts)


def splice(readme: str) -> str:
    head, sep, rest = readme.partition(BEGIN)
    if not sep:
        raise ValueError(f"README has no {BEGIN} marker")
    _, sep, tail = rest.partition(END)
    if not sep:
        raise ValueError(f"README has no {END} marker")
    return head + reference_markdown() + tail
