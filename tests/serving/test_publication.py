"""status.serving and ServingCompatible as the operator decides them when a run verifies: the
adapter_config.json read from the real S3 server through the run manifest, and the base model's
architecture as the trainer records it."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.serving.publication import at_publication, condition
from kubetune.storage.manifest import Manifest, describe_dir, publish

MODEL = {"architectures": ["Qwen2ForCausalLM"], "modelType": "qwen2", "torchDtype": "bfloat16"}


def publish_run(tmp_path: Path, location, config: dict, *, model: dict | None = MODEL, gguf: bool = False) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    layout = {"adapter": "adapter", "merged": None, "gguf": "gguf" if gguf else None}
    if gguf:
        (run / "gguf").mkdir()
        (run / "gguf" / "Modelfile").write_text("FROM ./m.gguf\n")
    publish(location, Manifest("RunManifest", describe_dir(run), {"layout": layout, **({"model": model} if model
                                                                                       else {})}), run)


def peft(**fields) -> dict:
    return {"peft_type": "LORA", "r": 24, "lora_alpha": 48, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "bias": "none", "use_dora": False, "modules_to_save": None, **fields}


def verdict(tmp_path, s3_bucket, s3_server, name="support", base="s3://models/qwen2-7b"):
    from kubetune.storage.manifest import read_manifest

    uri = f"s3://{s3_bucket.bucket}/run"
    return at_publication(name, uri, base, read_manifest(s3_bucket.child("run")), s3_server.config)


def test_a_compatible_adapter_gets_real_paths_and_its_rank_rounded_up(tmp_path, s3_bucket, s3_server):
    publish_run(tmp_path, s3_bucket.child("run"), peft(), gguf=True)
    serving, compat = verdict(tmp_path, s3_bucket, s3_server)
    uri = f"s3://{s3_bucket.bucket}/run"
    assert condition(compat) == ("True", "VllmCompatible",
                                 "vLLM v0.11.0 rules: rank 24 serves with --max-lora-rank 32")
    vllm = serving["vllm"]
    assert (vllm["rank"], vllm["maxLoraRank"], vllm["adapterUri"]) == (24, 32, f"{uri}/adapter")
    assert vllm["command"] == ("vllm serve /models/base --enable-lora --max-lora-rank 32 "
                               "--lora-modules support=/models/support/adapter")
    assert vllm["copy"] == ["kubetune adapters pull s3://models/qwen2-7b /models/base",
                            f"kubetune adapters pull {uri} /models/support --only adapter"]
    assert serving["ollama"]["command"] == "ollama create support -f /models/support/gguf/Modelfile"
    assert "BASE_DIR" not in json.dumps(serving) and " R " not in json.dumps(serving)


def test_an_incompatible_adapter_says_why(tmp_path, s3_bucket, s3_server):
    publish_run(tmp_path, s3_bucket.child("run"), peft(use_dora=True, modules_to_save=["lm_head"]))
    serving, compat = verdict(tmp_path, s3_bucket, s3_server)
    status, reason, message = condition(compat)
    assert (status, reason) == ("False", "VllmIncompatible")
    assert "DoRA" in message and "modules_to_save ['lm_head']" in message
    assert "ollama" not in serving  # the run exported no GGUF files


def test_an_adapter_config_that_differs_from_the_manifest_is_not_trusted(tmp_path, s3_bucket, s3_server):
    publish_run(tmp_path, s3_bucket.child("run"), peft())
    s3_bucket.put_bytes("run/adapter/adapter_config.json", json.dumps(peft(r=8)).encode())
    serving, compat = verdict(tmp_path, s3_bucket, s3_server)
    assert condition(compat)[:2] == ("Unknown", "VllmNotChecked")
    assert "adapter/adapter_config.json: sha256 differs from the manifest's" in condition(compat)[2]
    assert "command" not in serving["vllm"]  # no rank known, no command with a made-up one


def test_a_run_from_an_older_trainer_is_checked_except_for_its_modules(tmp_path, s3_bucket, s3_server):
    publish_run(tmp_path, s3_bucket.child("run"), peft(), model=None)
    serving, compat = verdict(tmp_path, s3_bucket, s3_server, base="hf://Qwen/Qwen2-7B")
    assert compat.compatible is None and "records no base model architecture" in compat.problems[0]
    assert serving["vllm"]["command"].startswith("vllm serve Qwen/Qwen2-7B --enable-lora --max-lora-rank 32")
    assert serving["vllm"]["copy"] == [f"kubetune adapters pull s3://{s3_bucket.bucket}/run /models/support "
                                       "--only adapter"]
