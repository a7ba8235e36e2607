"""The local API server in long-running mode: memory and per-request cost stay flat."""

from __future__ import annotations

import pytest

from kubetune.local.apiserver import ApiServer

pytestmark = pytest.mark.kmock(cls=ApiServer)
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


async def test_long_running_mode_bounds_object_history_and_request_log(kmock):
    kmock.history_limit, kmock.request_log_limit = 3, 16
    await kmock.post(CONFIGMAPS, json={"apiVersion": "v1", "kind": "ConfigMap",
                                       "metadata": {"name": "progress"}, "data": {"step": "0"}})
    versions = []
    for step in range(1, 60):
        patched = await (await kmock.patch(f"{CONFIGMAPS}/progress", json={"data": {"step": str(step)}})).json()
        versions.append(int(patched["metadata"]["resourceVersion"]))
    current = await (await kmock.get(f"{CONFIGMAPS}/progress")).json()
    assert current["data"] == {"step": "59"} and int(current["metadata"]["resourceVersion"]) == versions[-1]
    assert versions == sorted(set(versions))  # every write still gets a newer resourceVersion
    assert len(kmock.objects["v1/configmaps", "default", "progress"].history) == 3
    assert len(kmock._requests) <= 16
