"""What the real trainer publishes passes vLLM's rules: PEFT's own adapter_config.json for a
SmolLM2 (Llama) fine-tune, and the base model's architecture and dtype the run manifest records."""

from __future__ import annotations

import json

import pytest

from kubetune.serving.vllm import check
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest
from tests.trainer.test_recipe import finished_run  # noqa: F401  (the module's CPU run, shared)

pytestmark = pytest.mark.slow


def test_the_trainers_adapter_is_one_vllm_serves(finished_run, smollm2_dir):  # noqa: F811
    _, volumes, _ = finished_run
    output = LocalLocation(volumes / "runs" / "job")
    manifest = read_manifest(output)
    base = json.loads((smollm2_dir / "config.json").read_text())
    model = manifest.metadata["model"]
    assert model["architectures"] == base["architectures"] == ["LlamaForCausalLM"]
    assert model["torchDtype"] == (base.get("dtype") or base.get("torch_dtype"))
    config = json.loads(output.get_bytes("adapter/adapter_config.json"))
    verdict = check(config, model["architectures"], model["torchDtype"])
    assert verdict.compatible is True, verdict.problems
    assert verdict.rank == config["r"] and verdict.max_lora_rank >= config["r"]
