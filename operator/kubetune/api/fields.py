"""Field types used by both resources."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field, WithJsonSchema

from kubetune.api.uris import MAX_URI_LENGTH, TRAVERSAL_CEL, URI_PATTERN, uri_problem


def _valid_uri(value: str) -> str:
    problem = uri_problem(value)
    if problem:
        raise ValueError(f"URI {problem}")
    return value


StorageUriStr = Annotated[
    str,
    AfterValidator(_valid_uri),
    WithJsonSchema({
        "type": "string", "maxLength": MAX_URI_LENGTH, "pattern": URI_PATTERN,
        "x-kubernetes-validations": [{"rule": TRAVERSAL_CEL, "message": "must not contain '.' or '..' path segments"}],
    }),
]
"""s3://bucket/key, pvc://claim/path or hf://org/name; never with '.' or '..' segments."""

Sha256 = Annotated[str, Field(pattern=r"^[a-f0-9]{64}$")]
