"""The envelope shared by both kinds: apiVersion, kind, metadata, spec, status."""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import ConfigDict, Field

from kubetune.api.meta import DNS1123_SUBDOMAIN, ApiModel, Rule

SpecT = TypeVar("SpecT", bound=ApiModel)
StatusT = TypeVar("StatusT", bound=ApiModel)


LABEL_VALUE_MAX = 63


def name_fits_label(label: str) -> Rule:
    """A root rule: the resource's name becomes the value of `label`, which Kubernetes limits to 63
    characters. Refused at admission rather than shortened, so that `-l label=NAME` finds what NAME runs."""
    return Rule("metadata.name", f"must be at most {LABEL_VALUE_MAX} characters (it is the value of the {label} label)",
                f"size(self.metadata.name) <= {LABEL_VALUE_MAX}", lambda r: len(r.metadata.name) <= LABEL_VALUE_MAX)


class ObjectMeta(ApiModel):
    # The API server owns most of metadata (uid, resourceVersion, managedFields, ...): keep it all.
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=DNS1123_SUBDOMAIN, max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resource(ApiModel, Generic[SpecT, StatusT]):
    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: StatusT | None = None

    crd_plural: ClassVar[str]
    crd_singular: ClassVar[str]
    crd_short_names: ClassVar[tuple[str, ...]]
    crd_printer_columns: ClassVar[tuple[dict[str, Any], ...]]
    crd_root_rules: ClassVar[tuple[dict[str, Any], ...]] = ()
