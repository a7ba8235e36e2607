"""The ecosystem's programs the chart tests run, built from their Go modules by scripts/ecosystem-tools."""

from __future__ import annotations

import functools
import subprocess

from tests.support import REPO


@functools.cache
def ecosystem_tool(name: str) -> str:
    """The path of `name` (helm, argocd-health, kueue), built first if the cache lacks it: minutes
    cold (see docs/argocd.md for measured times), nothing warm."""
    done = subprocess.run([str(REPO / "scripts" / "ecosystem-tools"), "build", name], capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, f"scripts/ecosystem-tools build {name} failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip()
