"""status.serving and the ServingCompatible condition of a LoraAdapter, decided when its run
manifest verifies: concrete paths (where `kubetune adapters pull` puts each copy) and commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kubetune.contract import GGUF_DIR, MERGED_DIR
from kubetune.serving.vllm import VLLM_VERSION, Compatibility, check
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import ObjectMissing, open_location
from kubetune.storage.manifest import Manifest

MODELS_DIR = "/models"  # where the serving manifests copy the base and the adapter
BASE_DIR = f"{MODELS_DIR}/base"


def adapter_dir(name: str, layout: dict[str, Any]) -> str:
    """Where `kubetune adapters pull ARTIFACT /models/NAME --only adapter` leaves the adapter."""
    return f"{MODELS_DIR}/{name}/{layout.get('adapter') or 'adapter'}"


def base_dir(base_uri: str) -> str:
    """The base as vLLM names it: a hub id is fetched by vLLM itself, a stored copy is pulled."""
    return base_uri.removeprefix("hf://") if base_uri.startswith("hf://") else BASE_DIR


def serving_status(name: str, artifact_uri: str, base_uri: str, layout: dict[str, Any],
                   compat: Compatibility) -> dict[str, Any]:
    """status.serving: for vLLM the real rank, the --max-lora-rank it needs and the copies to make;
    for Ollama (when the run exported GGUF files) the `ollama create` line; for PEFT the load call."""
    adapter_uri = f"{artifact_uri}/{layout.get('adapter') or 'adapter'}"
    local_adapter, local_base = adapter_dir(name, layout), base_dir(base_uri)
    copies = [f"kubetune adapters pull {artifact_uri} {MODELS_DIR}/{name} --only adapter"]
    if not base_uri.startswith("hf://"):
        copies.insert(0, f"kubetune adapters pull {base_uri} {BASE_DIR}")
    vllm: dict[str, Any] = {"adapterName": name, "rank": compat.rank, "maxLoraRank": compat.max_lora_rank,
                            "baseModelUri": base_uri, "adapterUri": adapter_uri, "baseDir": local_base,
                            "adapterDir": local_adapter, "copy": copies, "rulesVersion": VLLM_VERSION}
    if compat.max_lora_rank is not None:
        vllm["command"] = (f"vllm serve {local_base} --enable-lora --max-lora-rank {compat.max_lora_rank} "
                           f"--lora-modules {name}={local_adapter}")
    serving: dict[str, Any] = {
        "vllm": vllm,
        "peft": f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({local_base!r}), "
                f"{local_adapter!r})",
    }
    if layout.get("gguf"):
        serving["ollama"] = _ollama(name, artifact_uri, layout["gguf"], "gguf")
    return serving


def merged_ollama(name: str, artifact_uri: str, gguf: dict[str, Any] | None) -> dict[str, Any] | None:
    """status.serving.ollama for the GGUF files a merge Job wrote (ARTIFACT/merged/gguf/), if it did."""
    if not gguf or "error" in gguf:
        return None
    return _ollama(name, artifact_uri, f"{MERGED_DIR}/{GGUF_DIR}", "merged")


def _ollama(name: str, artifact_uri: str, folder: str, part: str) -> dict[str, Any]:
    """Where `kubetune adapters pull --only part` leaves the Modelfile, and the command that reads it."""
    modelfile = f"{MODELS_DIR}/{name}/{folder}/Modelfile"
    return {"modelfile": modelfile,
            "copy": [f"kubetune adapters pull {artifact_uri} {MODELS_DIR}/{name} --only {part}"],
            "command": f"ollama create {name} -f {modelfile}"}


def condition(compat: Compatibility) -> tuple[str, str, str]:
    """ServingCompatible's status, reason and message."""
    status = {True: "True", False: "False", None: "Unknown"}[compat.compatible]
    if compat.problems:
        return status, compat.reason, "; ".join(compat.problems)
    return status, compat.reason, (f"vLLM {VLLM_VERSION} rules: rank {compat.rank} serves with --max-lora-rank "
                                   f"{compat.max_lora_rank}")


def read_adapter_config(location, manifest: Manifest, adapter_prefix: str) -> tuple[dict | None, str]:
    """The adapter_config.json the manifest lists, checked against its sha256; or why not."""
    rel = f"{adapter_prefix}/adapter_config.json"
    entry = next((f for f in manifest.files if f.path == rel), None)
    if entry is None:
        return None, f"{rel} is not in the run manifest"
    try:
        data = location.get_bytes(rel)
    except (ObjectMissing, StorageUnavailable) as exc:
        return None, f"{rel}: {exc}"
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        return None, f"{rel}: sha256 differs from the manifest's"
    try:
        config = json.loads(data)
    except ValueError as exc:
        return None, f"{rel}: not JSON ({exc})"
    return (config, "") if isinstance(config, dict) else (None, f"{rel}: not a JSON object")


def at_publication(name: str, artifact_uri: str, base_uri: str, manifest: Manifest,
                   storage: StorageConfig | None) -> tuple[dict[str, Any], Compatibility]:
    """status.serving and the vLLM verdict for a verified run: reads adapter_config.json (one small
    GET); the base model's architecture and dtype are what the trainer recorded in the manifest."""
    layout = manifest.metadata.get("layout") or {}
    model = manifest.metadata.get("model") or {}
    location = open_location(artifact_uri, storage=storage, volume_root=Path("/nonexistent"), retry_budget_s=30)
    config, unread = read_adapter_config(location, manifest, (layout.get("adapter") or "adapter").rstrip("/"))
    if config is None:
        compat = Compatibility(None, [unread])
    elif not model.get("architectures"):
        compat = check(config, [], model.get("torchDtype"))
        compat.problems.insert(0, "the run manifest records no base model architecture (an older trainer)")
    else:
        compat = check(config, list(model["architectures"]), model.get("torchDtype"))
    return serving_status(name, artifact_uri, base_uri, layout, compat), compat
