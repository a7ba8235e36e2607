"""DPO on the CPU with a real pretrained model (SmolLM2-135M-Instruct): preference pairs on the
invoice task, LoRA, TRL's DPOTrainer with the base (adapter disabled) as the reference."""

from __future__ import annotations

import json
import time

import pytest

from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest, verify
from kubetune_trainer.recipe import FineTuneRecipe
from kubetune_trainer.runspec import RunSpec
from kubetune_trainer.samples import invoice_preference_records, write_jsonl
from tests.trainer.recipe_support import make_volume, run_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("dpo")
    volumes = make_volume(root, smollm2_dir, records=10)
    write_jsonl(volumes / "data" / "pairs.jsonl", invoice_preference_records(40))
    body = run_spec(root, volumes, dataset_uri="pvc://data/pairs.jsonl", objective={"type": "dpo",
                    "dpo": {"beta": 0.1}}, training={"maxSteps": 6, "learningRate": 0.002, "batchSize": 2},
                    dataset={"validationSplit": 0.2}, checkpointEverySteps=3)
    started = time.monotonic()
    result = FineTuneRecipe(RunSpec.model_validate(body)).run()
    return root, volumes, result, time.monotonic() - started


def test_dpo_raises_holdout_preference_over_the_base(dpo_run):
    _, _, result, seconds = dpo_run
    baseline, final = result.metrics["baseline"], result.metrics["final"]
    print(f"DPO hold-out: baseline {baseline}, final {final}, {seconds:.0f} s")
    assert baseline["evalPairs"] == final["evalPairs"] == 8
    # The untrained adapter is the reference itself: every implicit reward is 0.
    assert baseline["rewardAccuracy"] == 0 and baseline["rewardMargin"] == 0
    assert final["rewardAccuracy"] > 0.5 and final["rewardMargin"] > 0
    assert final["preferenceAccuracy"] > baseline["preferenceAccuracy"]
    assert result.metrics["train"]["steps"] == 6


def test_dpo_manifest_has_the_objective_in_its_lineage(dpo_run):
    root, volumes, result, _ = dpo_run
    output = LocalLocation(volumes / "runs" / "job")
    manifest = read_manifest(output)
    assert verify(output, manifest) == []
    assert manifest.metadata["lineage"]["objective"] == "dpo"
    assert manifest.metadata["data"]["format"] == "preference"
    assert manifest.metadata["spec"]["objective"] == {"type": "dpo", "dpo": {"beta": 0.1, "lossType": "sigmoid"}}
    paths = {f.path for f in manifest.files}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= paths
    # One adapter: no reference copy was saved beside it.
    assert not any(p.startswith("adapter/ref/") for p in paths)
    assert sorted({f.rel.split("/")[1] for f in output.list("checkpoints")}) == ["checkpoint-3", "checkpoint-6"]
    progress = json.loads((root / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["step"] == 6
