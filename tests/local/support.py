"""Waiting on the local stack: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import asyncio
import time


async def eventually(predicate, timeout: float, what: str, interval: float = 0.3):
    """The first truthy value of `await predicate()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
