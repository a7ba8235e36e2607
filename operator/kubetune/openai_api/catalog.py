"""The base-model catalog: which `model` names callers may fine-tune, configured by the platform team
as a ConfigMap (key `models.yaml`: name -> baseModel URI and revision, plus FineTuneJob spec defaults
such as method, LoRA rank, GPUs, sequence length)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, ValidationError

from kubetune.api.finetunejob import BaseModelSource
from kubetune.api.meta import ApiModel
from kubetune.api.validation import problems_of
from kubetune.openai_api.errors import OpenAIError

CATALOG_KEY = "models.yaml"


class CatalogEntry(ApiModel):
    base_model: BaseModelSource
    description: str | None = Field(default=None, max_length=1024)
    # FineTuneJob spec fields (camelCase, as in a manifest) every job of this model starts from;
    # the whole spec is validated with the FineTuneJob model when a job is built.
    defaults: dict[str, Any] = Field(default_factory=dict)


def parse_catalog(configmap: dict | None, where: str) -> dict[str, CatalogEntry]:
    """The catalog from its ConfigMap. A broken catalog is the platform team's mistake, not the
    caller's: it answers 503 with what is wrong, rather than a job built from a guess."""
    if configmap is None:
        raise OpenAIError(503, f"the model catalog ConfigMap {where} does not exist", code="catalog_missing")
    text = (configmap.get("data") or {}).get(CATALOG_KEY)
    if text is None:
        raise OpenAIError(503, f"the model catalog ConfigMap {where} has no key {CATALOG_KEY}", code="catalog_invalid")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise OpenAIError(503, f"{where}: {CATALOG_KEY} is not valid YAML: {exc}", code="catalog_invalid") from exc
    if not isinstance(raw, dict):
        raise OpenAIError(503, f"{where}: {CATALOG_KEY} must map model names to entries", code="catalog_invalid")
    entries = {}
    for name, body in raw.items():
        try:
            entries[str(name)] = CatalogEntry.model_validate(body)
        except ValidationError as exc:
            detail = "; ".join(f"{p.path}: {p.message}" for p in problems_of(exc))
            raise OpenAIError(503, f"{where}: model {name}: {detail}", code="catalog_invalid") from exc
    return entries


def lookup(catalog: dict[str, CatalogEntry], model: str) -> CatalogEntry:
    if model not in catalog:
        known = ", ".join(sorted(catalog)) or "none"
        raise OpenAIError(400, f"model {model!r} is not in this cluster's catalog; known models: {known}",
                          param="model", code="model_not_available")
    return catalog[model]
