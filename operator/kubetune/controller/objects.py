"""Creating the objects the operator owns, idempotently."""

from __future__ import annotations

import kopf

from kubetune.controller.kube import ApiError, KubeClient


async def create_or_adopt(client: KubeClient, collection: str, obj: dict) -> tuple[dict, bool]:
    """Create obj, or return the existing one of the same name (a restart, or a lost response)."""
    try:
        return await client.create(collection, obj), True
    except ApiError as exc:
        if exc.status != 409:
            raise
    existing = await client.get(f"{collection}/{obj['metadata']['name']}")
    if existing is None:
        raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} conflicts but is gone; retrying", delay=1)
    return existing, False
