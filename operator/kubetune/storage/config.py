"""Where the object store is and how to authenticate: from a Secret's data or from the environment.

The trainer pod gets the Secret's keys as environment variables through `secretKeyRef`; the
operator reads the same Secret through the API. Both end up with a `StorageConfig`.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

# Secret keys, and the environment variables the trainer Job maps them to.
SECRET_KEYS = {
    "endpoint": "KUBETUNE_S3_ENDPOINT",
    "accessKey": "KUBETUNE_S3_ACCESS_KEY",
    "secretKey": "KUBETUNE_S3_SECRET_KEY",
    "region": "KUBETUNE_S3_REGION",
    "secure": "KUBETUNE_S3_SECURE",
    "caBundle": "KUBETUNE_S3_CA_BUNDLE",
}
REQUIRED_KEYS = ("endpoint", "accessKey", "secretKey")


class StorageConfigError(ValueError):
    pass


@dataclass(frozen=True)
class StorageConfig:
    endpoint: str  # host:port, no scheme
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)  # never printed: repr=False keeps it out of logs and tracebacks
    region: str | None = None
    secure: bool = True
    ca_bundle_pem: str | None = field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, data: Mapping[str, str], source: str) -> StorageConfig:
        missing = [k for k in REQUIRED_KEYS if not data.get(k)]
        if missing:
            raise StorageConfigError(f"{source} lacks {', '.join(missing)}")
        endpoint = data["endpoint"]
        secure = data.get("secure", "").lower() not in ("false", "0", "no")
        if "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
            secure = scheme == "https"
        return cls(endpoint=endpoint.rstrip("/"), access_key=data["accessKey"], secret_key=data["secretKey"],
                   region=data.get("region") or None, secure=secure, ca_bundle_pem=data.get("caBundle") or None)

    @classmethod
    def from_secret(cls, secret: Mapping, name: str) -> StorageConfig:
        """From a v1 Secret object as the API returns it (base64 `data`, or `stringData`)."""
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        data.update(secret.get("stringData") or {})
        return cls.from_mapping(data, f"Secret {name}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageConfig:
        env = os.environ if env is None else env
        return cls.from_mapping({k: env.get(v, "") for k, v in SECRET_KEYS.items()}, "the environment")
