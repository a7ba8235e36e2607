"""The Argo CD health checks shipped in charts/kubetune/argocd/, run by a real Lua interpreter (Debian's
lua5.4, as Argo CD runs them with gopher-lua) over status samples of both resources."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ARGOCD = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "argocd"
LUA = shutil.which("lua5.4") or shutil.which("lua")


def lua_literal(value) -> str:
    """A Python value as a Lua table constructor (what Argo CD hands the script as `obj`)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    return json.dumps(value)


def health(script: str, obj: dict) -> tuple[str, str]:
    assert LUA, "a Lua interpreter is needed: apt-get install lua5.4 (scripts/test does)"
    program = (f"obj = {lua_literal(obj)}\nlocal function check()\n{(ARGOCD / script).read_text()}\nend\n"
               "local hs = check()\nio.write(hs.status, '\\t', hs.message or '')\n")
    out = subprocess.run([LUA, "-"], input=program, capture_output=True, text=True, timeout=30, check=True).stdout
    status, _, message = out.partition("\t")
    return status, message


def ftj(status: dict | None, generation: int = 1) -> dict:
    return {"metadata": {"name": "job", "generation": generation}, **({"status": status} if status else {})}


@pytest.mark.parametrize("status,generation,expected", [
    (None, 1, ("Progressing", "Waiting for the kubetune operator")),
    ({"phase": "Pending", "observedGeneration": 1, "message": ""}, 1, ("Progressing", "Pending")),
    ({"phase": "Queued", "observedGeneration": 1, "message": "1 job(s) already run in team-a"}, 1,
     ("Progressing", "Queued: 1 job(s) already run in team-a")),
    ({"phase": "Running", "observedGeneration": 1, "progress": {"step": 30, "totalSteps": 120}}, 1,
     ("Progressing", "Running: step 30/120")),
    ({"phase": "Running", "observedGeneration": 1}, 2, ("Progressing", "Waiting for the operator to observe generation 2")),
    ({"phase": "Suspended", "observedGeneration": 2}, 2, ("Suspended", "Suspended (spec.suspend)")),
    ({"phase": "Succeeded", "observedGeneration": 1, "adapterRef": {"name": "invoices"}}, 1,
     ("Healthy", "Succeeded: LoraAdapter invoices")),
    ({"phase": "Failed", "observedGeneration": 1, "message": "does not fit its GPUs: short by 7.1 GiB"}, 1,
     ("Degraded", "does not fit its GPUs: short by 7.1 GiB")),
])
def test_finetunejob_health(status, generation, expected):
    assert health("finetunejob-health.lua", ftj(status, generation)) == expected


@pytest.mark.parametrize("status,expected", [
    (None, ("Progressing", "Waiting for the kubetune operator")),
    ({"phase": "Verifying", "observedGeneration": 1}, ("Progressing", "Verifying")),
    ({"phase": "Merging", "observedGeneration": 1}, ("Progressing", "Merging")),
    ({"phase": "Ready", "observedGeneration": 1, "stage": "production",
      "conditions": [{"type": "Promoted", "status": "True"}]}, ("Healthy", "Ready (stage production)")),
    ({"phase": "Ready", "observedGeneration": 1, "stage": "candidate",
      "conditions": [{"type": "Promoted", "status": "False", "message": "evalLoss 0.4 > max 0.25"}]},
     ("Degraded", "evalLoss 0.4 > max 0.25")),
    ({"phase": "Failed", "observedGeneration": 1, "message": "adapter/adapter_model.safetensors: sha256 mismatch"},
     ("Degraded", "adapter/adapter_model.safetensors: sha256 mismatch")),
])
def test_loraadapter_health(status, expected):
    obj = {"metadata": {"name": "a", "generation": 1}, **({"status": status} if status else {})}
    assert health("loraadapter-health.lua", obj) == expected
