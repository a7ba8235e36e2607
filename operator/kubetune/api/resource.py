"""The envelope shared by both kinds: apiVersion, kind, metadata, spec, status."""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import ConfigDict, Field

from kubetune.api.meta import API_VERSION, DNS1123_SUBDOMAIN, ApiModel

SpecT = TypeVar("SpecT", bound=ApiModel)
StatusT = TypeVar("StatusT", bound=ApiModel)


class ObjectMeta(ApiModel):
    # The API server owns most of metadata (uid, resourceVersion, managedFields, ...): keep it all.
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=DNS1123_SUBDOMAIN, max_length=253)
    namespace: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resource(ApiModel, Generic[SpecT, StatusT]):
    api_version: Literal["kubetune.dev/v1alpha1"] = API_VERSION
    kind: str
    metadata: ObjectMeta
    spec: SpecT
    status: StatusT | None = None

    crd_plural: ClassVar[str]
    crd_singular: ClassVar[str]
    crd_short_names: ClassVar[tuple[str, ...]]
    crd_printer_columns: ClassVar[tuple[dict[str, Any], ...]]
    crd_root_rules: ClassVar[tuple[dict[str, Any], ...]] = ()
