"""Object-store access for the operator: the referenced Secret, read through the API."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.finetunejob import Storage
from kubetune.controller.kube import KubeClient, path_for
from kubetune.storage.config import StorageConfig, StorageConfigError


@dataclass
class NotReady(Exception):
    """Something outside the spec is missing or unreachable; it may appear later, so the job waits."""
    reason: str
    message: str


async def storage_config(client: KubeClient, namespace: str, storage: Storage | None) -> StorageConfig | None:
    if storage is None:
        return None
    name = storage.secret_ref.name
    secret = await client.get(path_for("v1", "secrets", namespace, name))
    if secret is None:
        raise NotReady("SecretNotFound", f"Secret {name} (storage.secretRef) does not exist in namespace {namespace}")
    try:
        return StorageConfig.from_secret(secret, name)
    except (StorageConfigError, ValueError) as exc:  # ValueError: data that is not base64
        raise NotReady("SecretInvalid", str(exc)) from exc
