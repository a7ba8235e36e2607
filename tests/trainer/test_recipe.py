"""The trainer on the CPU with a real pretrained model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest, verify
from kubetune_trainer.recipe import FineTuneRecipe
from kubetune_trainer.runspec import RunSpec
from tests.trainer.recipe_support import make_volume, merge_run, run_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("run")
    volumes = make_volume(root, smollm2_dir)
    body = run_spec(root, volumes, evaluation={"exactMatch": True, "maxSamples": 18, "maxNewTokens": 48},
                    output={"merge": True}, checkpointEverySteps=10)
    result = FineTuneRecipe(RunSpec.model_validate(body)).run()
    return root, volumes, result


def test_holdout_loss_falls_and_exact_match_rises(finished_run):
    _, _, result = finished_run
    baseline, final = result.metrics["baseline"], result.metrics["final"]
    assert final["evalLoss"] < 0.25 * baseline["evalLoss"], (baseline, final)
    assert baseline["exactMatch"] <= 0.1 and final["exactMatch"] >= 0.5, (baseline, final)
    assert final["jsonValid"] >= final["exactMatch"]
    assert result.metrics["train"]["steps"] == 30


def test_manifest_lists_verified_artifacts_with_lineage(finished_run):
    _, volumes, result = finished_run
    output = LocalLocation(volumes / "runs" / "job")
    manifest = read_manifest(output)
    paths = {f.path for f in manifest.files}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json"} <= paths
    # output.merge is the merge Job's (test_saved_adapter_reloads_and_merged_model_matches): the
    # training pod publishes the adapter and gives its GPUs back.
    assert not any(p.startswith("merged/") for p in paths) and manifest.metadata["layout"] == {"adapter": "adapter"}
    assert verify(output, manifest) == []
    lineage = manifest.metadata["lineage"]
    data_sha = hashlib.sha256((volumes / "data" / "invoices.jsonl").read_bytes()).hexdigest()
    assert lineage["datasetSha256"] == data_sha and lineage["baseModelUri"] == "pvc://models/smollm2"
    assert set(lineage["libraries"]) >= {"torch", "transformers", "peft"}
    assert manifest.metadata["metrics"] == json.loads(json.dumps(result.metrics))
    # checkpoints pushed during the run: steps 10, 20, 30, keeping the last 2
    assert sorted({f.rel.split("/")[1] for f in output.list("checkpoints")}) == ["checkpoint-20", "checkpoint-30"]
    progress = json.loads((finished_run[0] / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["step"] == 30


@torch.no_grad()
def test_saved_adapter_reloads_and_merged_model_matches(finished_run, smollm2_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.data import prepare
    from kubetune_trainer.evaluation import holdout_loss
    from kubetune.api.finetunejob import FineTuneJobSpec

    root, volumes, result = finished_run
    run_dir = volumes / "runs" / "job"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    spec = FineTuneJobSpec.model_validate(json.loads((run_dir / "manifest.json").read_text())["spec"])
    data = prepare(volumes / "data" / "invoices.jsonl", spec.dataset.uri, spec.dataset, spec.training, tokenizer)
    # The reloaded adapter reproduces the hold-out loss measured on the in-memory model after training.
    reloaded = holdout_loss(with_adapter, data.validation, tokenizer.pad_token_id)["evalLoss"]
    assert reloaded == pytest.approx(result.metrics["final"]["evalLoss"], abs=1e-5)

    merged_dir = merge_run(root, volumes)
    assert verify(LocalLocation(merged_dir), read_manifest(LocalLocation(merged_dir))) == []
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    batch = tokenizer(["Invoice INV-4242 from Hooli, total 12.50 USD.\nJSON: ", "Hello"], return_tensors="pt",
                      padding=True)
    expected = with_adapter(**batch).logits
    actual = merged(**batch).logits
    # fp32 merge: W + B@A*scale computed once vs. applied per token; differences are rounding only.
    assert (actual - expected).abs().max().item() < 1e-3
    with with_adapter.disable_adapter():
        plain = with_adapter(**batch).logits
    assert (plain - expected).abs().max().item() > 0.5  # the adapter matters, so the parity above is not trivial
