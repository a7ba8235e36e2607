"""Error bodies that are not JSON (a size limit's text, a proxy's HTML page) reach the operator as
ApiError with their status, never as a JSON decoding error (Kopf would retry those blindly)."""

from __future__ import annotations

import pytest

from kubetune.controller.kube import ApiError, KubeClient, KubeConfig, path_for
from kubetune.local.apiserver import ApiServer

pytestmark = pytest.mark.kmock(cls=ApiServer)


async def test_a_413_answered_with_text_is_an_api_error(kmock):
    client = KubeClient(KubeConfig(server=str(kmock.url).rstrip("/")))
    try:
        with pytest.raises(ApiError) as raised:
            # More than the emulator's HTTP server takes in one request body (1 MiB).
            await client.patch(path_for("v1", "configmaps", "default", "big"), {"data": {"x": "a" * 2_000_000}})
    finally:
        await client.close()
    assert raised.value.status == 413
    assert isinstance(raised.value.body, str) and "HTTP 413: " in str(raised.value)
