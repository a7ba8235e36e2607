"""Storage URIs accepted in specs: s3://bucket/key, pvc://claim/path and hf://org/name.

Parsing is strict on purpose: a URI is the one place a user's string becomes a path on a
volume or a key in a bucket, so traversal and odd characters are refused here, once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEMES = ("s3", "pvc", "hf")
MAX_URI_LENGTH = 1024

# Bucket names follow S3's rules; claim names are DNS-1123 subdomains; hub ids are org/name.
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_SEGMENT = r"[A-Za-z0-9._~+=@,-]+"
_PATH = rf"{_SEGMENT}(/{_SEGMENT})*/?"
_HUB_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"

# One regular expression, shared by the Python check and the CRD's openAPI `pattern`.
URI_PATTERN = rf"^(s3://{_BUCKET}(/({_PATH})?)?|pvc://{_CLAIM}(/({_PATH})?)?|hf://{_HUB_ID})$"
_URI_RE = re.compile(URI_PATTERN)
_TRAVERSAL_RE = re.compile(r"(^|/)\.{1,2}(/|$)")
# CEL twin of _TRAVERSAL_RE for the CRD (RE2 syntax, no look-around).
TRAVERSAL_CEL = "!self.matches('(^|/)[.]{1,2}(/|$)')"


@dataclass(frozen=True)
class StorageUri:
    scheme: str
    authority: str  # bucket, claim or hub organisation
    path: str  # key prefix, path inside the claim, or hub repository name; no leading slash

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def join(self, *parts: str) -> StorageUri:
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        path = "/".join(p for p in (self.path.rstrip("/"), tail) if p)
        return StorageUri(self.scheme, self.authority, path)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}/{self.path}" if self.path else f"{self.scheme}://{self.authority}"


def uri_problem(value: str) -> str | None:
    """Why `value` is not an acceptable storage URI, or None when it is."""
    if len(value) > MAX_URI_LENGTH:
        return f"is {len(value)} characters long; the limit is {MAX_URI_LENGTH}"
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in SCHEMES:
        return f"must start with one of {', '.join(s + '://' for s in SCHEMES)}"
    if _TRAVERSAL_RE.search(rest):
        return "must not contain '.' or '..' path segments"
    if "//" in rest:
        return "must not contain empty path segments ('//')"
    if not _URI_RE.match(value):
        expected = {
            "s3": "s3://bucket/key with a valid bucket name",
            "pvc": "pvc://claim/path with a valid claim name",
            "hf": "hf://org/name",
        }[scheme]
        return f"is not of the form {expected} (allowed characters in paths: letters, digits, ._~+=@,-)"
    return None


def parse_uri(value: str) -> StorageUri:
    problem = uri_problem(value)
    if problem:
        raise ValueError(f"{value!r} {problem}")
    scheme, _, rest = value.partition("://")
    authority, _, path = rest.partition("/")
    return StorageUri(scheme, authority, path.rstrip("/"))
