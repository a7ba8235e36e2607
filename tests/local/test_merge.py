"""A LoraAdapter that asks for a merged model gets one from a merge Job: the local stack runs the
trainer image's `merge-job` on SmolLM2-135M, and the published merged model's logits equal the base
model's with the adapter applied. Its GGUF files (merge.gguf) load in llama.cpp, which predicts the
merged model's next tokens."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.controller.adapters import adapter_path
from kubetune.local.stack import S3_SECRET, LocalStack
from kubetune.storage.location import open_location
from kubetune.storage.manifest import Manifest, describe_dir, publish, read_manifest
from kubetune.storage.models import import_model
from tests.support import eventually

pytestmark = pytest.mark.slow
PROMPTS = ["Invoice INV-4242 from Hooli, total 12.50 USD.\nJSON: ", "Hello"]


def _adapter(base_dir, out_dir):
    """A LoRA adapter with non-zero B matrices (a fresh one is a no-op, which would make parity trivial)."""
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.modeling import attach_lora

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "s3://models/smollm2"}, "dataset": {"uri": "s3://datasets/x.jsonl"},
        "output": {"uri": "s3://adapters/x"}, "method": "lora", "resources": {"gpus": 0},
        "storage": {"secretRef": {"name": S3_SECRET}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}})
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(out_dir / "adapter", safe_serialization=True)


async def test_merge_job_output_matches_base_plus_adapter(tmp_path, smollm2_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _adapter(smollm2_dir, tmp_path / "run")
    async with LocalStack(tmp_path / "stack") as stack:
        await asyncio.to_thread(import_model, smollm2_dir, "s3://models/smollm2", stack.storage)
        run = open_location("s3://adapters/run-1", storage=stack.storage, volume_root=tmp_path)
        run.ensure_ready()
        publish(run, Manifest("RunManifest", describe_dir(tmp_path / "run"), {"layout": {"adapter": "adapter"}}),
                tmp_path / "run")
        await stack.apply({
            "apiVersion": "kubetune.dev/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": "merged-1", "namespace": "default"},
            "spec": {"baseModel": {"uri": "s3://models/smollm2"}, "artifact": {"uri": "s3://adapters/run-1"},
                     "storage": {"secretRef": {"name": S3_SECRET}}, "merge": {"enabled": True, "gguf": ["q8_0"]}}})
        deadline, status, phases = time.monotonic() + 600, {}, set()
        while time.monotonic() < deadline and status.get("phase") not in ("Ready", "Failed"):
            await asyncio.sleep(0.5)
            status = ((await stack.client.get(adapter_path("default", "merged-1"))) or {}).get("status") or {}
            phases.add(status.get("phase"))
        assert status.get("phase") == "Ready", status.get("message")
        assert "Merging" in phases
        merged_condition = next(c for c in status["conditions"] if c["type"] == "Merged")
        assert merged_condition["status"] == "True"

        async def content_verified():
            # The verification Job, run by the local stack like any Job, reports through its
            # termination message; the operator only listed the artifact.
            body = (await stack.client.get(adapter_path("default", "merged-1"))) or {}
            return next((c for c in (body.get("status") or {}).get("conditions") or []
                         if c["type"] == "Verified" and c["reason"] == "ContentVerified"), None)
        verified = await eventually(content_verified, 300, "the verification Job's report")
        assert verified["status"] == "True" and "match their sha256" in verified["message"]
        assert status["mergedModelUri"] == "s3://adapters/run-1/merged"
        assert status["serving"]["ollama"]["modelfile"] == "/models/merged-1/merged/gguf/Modelfile"
        merged = run.child("merged")
        manifest = read_manifest(merged)
        for entry in manifest.files:
            merged.get_file(entry.path, tmp_path / "merged" / entry.path, size=entry.size, sha256=entry.sha256)
    assert manifest.metadata["mergedFrom"]["dtype"] == "float32"
    assert {"gguf/model-q8_0.gguf", "gguf/adapter-lora-f32.gguf", "gguf/Modelfile"} <= {f.path for f in manifest.files}
    assert manifest.metadata["gguf"]["ollama"] == "ollama create merged-1 -f Modelfile"

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = with_adapter(**batch).logits
        actual = merged_model(**batch).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(**batch).logits
    assert (actual - expected).abs().max().item() < 1e-3
    assert (plain - expected).abs().max().item() > 0.05  # the adapter changes the output: parity is not trivial

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python: scripts/setup-env builds it for dev")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "merged" / "gguf" / "model-q8_0.gguf"), n_ctx=128, n_threads=2,
                          logits_all=True, verbose=False)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected_next = int(merged_model(ids).logits[0, -1].argmax())
        llm.reset()
        llm.eval(ids[0].tolist())
        assert int(torch.tensor(llm.scores[ids.shape[1] - 1]).argmax()) == expected_next, prompt
