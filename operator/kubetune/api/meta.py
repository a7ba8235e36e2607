"""Shared API building blocks: group/version, the strict base model, conditions and cross-field rules.

A cross-field rule is written once as a `Rule`: its CEL expression goes into the CRD (so the
API server refuses a bad manifest at admission) and its Python predicate runs in the models (so
`kubetune validate` and the operator give the same message offline). The test suite evaluates
both on every example and every invalid spec it knows and fails where they disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SHA256_HEX = r"^[a-f0-9]{64}$"
# Kubernetes resource.Quantity, as the API server's own regular expression spells it.
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule of one model, expressed in CEL and in Python."""

    path: str  # field the message is about, relative to the model, e.g. "quantization.bits"
    message: str
    cel: str
    check: Callable[[Any], bool]

    def to_crd(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": "." + self.path,
                "reason": "FieldValueInvalid"}


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused, and no type coercion
    (`suspend: 0`, `r: "16"`): the API server's schema refuses those, so the operator must too."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              validate_default=True, strict=True)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if cls.rules:
            target["x-kubernetes-validations"] = [r.to_crd() for r in cls.rules]
        return schema

    @model_validator(mode="after")
    def _check_rules(self, info: ValidationInfo):
        if info.context and info.context.get("skip_rules"):
            return self  # lets the test suite compare the CEL and Python verdicts of a broken spec
        broken = [r for r in type(self).rules if not r.check(self)]
        if broken:
            # One error carrying every broken rule: the reporter expands them into one line each.
            raise PydanticCustomError("kubetune_rules", "; ".join(f"{r.path}: {r.message}" for r in broken),
                                      {"rules": [(r.path, r.message) for r in broken]})
        return self

    def to_wire(self) -> dict[str, Any]:
        """The manifest form: camelCase, only what was set (so YAML -> model -> YAML is lossless)."""
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")


class SecretRef(ApiModel):
    name: str = Field(pattern=DNS1123_SUBDOMAIN, max_length=253,
                      description="Name of a Secret in the resource's namespace.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int | None = Field(default=None, ge=0)


def now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_rfc3339(timestamp: str) -> datetime:
    """A Kubernetes timestamp (`2026-12-01T10:00:00Z`), timezone-aware."""
    return datetime.fromisoformat(timestamp)


CONDITIONS_SCHEMA_EXTRA = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
# A sub-object with defaults of its own: the API server fills it in when absent, so CEL rules
# may read its fields without has() guards.
DEFAULT_EMPTY: JsonDict = {"default": {}}
