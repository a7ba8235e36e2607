"""QLoRA and LoRA sharded over two GPUs (FSDP), through the product's entry point: the planner shards only
when a copy of the model per GPU does not fit, the sharded run learns as the unsharded one does,
evaluation and generation run on every rank, the adapter and checkpoints are written once, and a
checkpoint resumes sharded (and refuses, clearly, to resume unsharded)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.contract import EXIT_CONFIG, EXIT_OK
from kubetune.planning import ModelShape, estimate_memory
from kubetune.planning.plan import HEADROOM
from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest
from kubetune_trainer.checkpoints import CheckpointStore
from kubetune_trainer.samples import invoice_records
from tests.trainer.recipe_support import make_volume, run_spec, run_trainer, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs two CUDA GPUs and bitsandbytes")]


def _random_model(directory: Path) -> Path:
    """A random-init Llama with a BPE tokenizer trained on the task's text: nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [r["prompt"] + r["completion"] for r in invoice_records(400, seed=1)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=4, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def _memory_that_needs_sharding(spec: dict, model_dir: Path) -> float:
    """GPU memory (GiB) between what one copy per GPU needs and what two shards need, as the
    trainer's planner counts them (micro-batch 1, checkpointing: its smallest plan)."""
    s = FineTuneJobSpec.model_validate(spec)
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))

    def need(shards: int) -> float:
        return estimate_memory(shape, quantized=s.method == "qlora", lora_r=s.lora.r,
                               lora_targets=list(s.lora.target_modules), micro_batch=1,
                               seq_len=s.training.max_seq_length, checkpointing=True, fused_kernels=True,
                               shards=shards).total_gib
    assert need(2) < need(1)
    return round((need(1) + need(2)) / 2 / HEADROOM, 4)


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_sharded_run_learns_as_unsharded_writes_once_and_resumes_sharded(tmp_path, method):
    model_dir = _random_model(tmp_path / "model")
    volumes = make_volume(tmp_path, model_dir, records=160)
    common = {"method": method, "training": {"maxSteps": 6, "batchSize": 4, "learningRate": 0.001},
              "lora": {"targetModules": ["all-linear"]}, "checkpointEverySteps": 3,
              "evaluation": {"exactMatch": True, "maxSamples": 4, "maxNewTokens": 8}}

    def spec(name: str, **overrides) -> Path:
        body = run_spec(tmp_path / name, volumes, output_uri=f"pvc://runs/{name}", **common)
        for key, value in overrides.items():
            body["spec"][key] = {**body["spec"].get(key, {}), **value}
        return write_spec(tmp_path / f"{name}.json", body)

    tight = _memory_that_needs_sharding(run_spec(tmp_path, volumes, resources={"gpus": 2}, **common)["spec"], model_dir)
    runs = {"copies": spec("copies", resources={"gpus": 2}),
            "sharded": spec("sharded", resources={"gpus": 2, "gpuMemoryGiB": tight})}
    manifests = {}
    for name, path in runs.items():
        log = tmp_path / f"{name}.log"
        assert run_trainer(path, log) == EXIT_OK, log.read_text()[-4000:]
        text = log.read_text()
        assert ("base model sharded over 2 GPUs (FSDP)" in text) == (name == "sharded")
        assert text.count(f"published pvc://runs/{name}") == 1
        manifests[name] = read_manifest(LocalLocation(volumes / "runs" / name, f"pvc://runs/{name}")).metadata

    sharded, copies = manifests["sharded"]["metrics"], manifests["copies"]["metrics"]
    both = json.dumps({"sharded": sharded, "copies": copies})
    assert sharded["train"]["sharded"] and not copies["train"]["sharded"]
    # Same data, order and initial weights: the two layouts compute the same steps, up to bf16 rounding.
    assert sharded["train"]["trainLoss"] == pytest.approx(copies["train"]["trainLoss"], rel=0.02), both
    assert sharded["final"]["evalLoss"] == pytest.approx(copies["final"]["evalLoss"], rel=0.03), both
    assert sharded["final"]["generationSamples"] == 4  # generation ran on both ranks, in step

    output = LocalLocation(volumes / "runs" / "sharded", "pvc://runs/sharded")
    adapters = {name: load_file(volumes / "runs" / name / "adapter" / "adapter_model.safetensors") for name in runs}
    assert adapters["sharded"].keys() == adapters["copies"].keys() and adapters["sharded"]  # gathered whole
    for key, tensor in adapters["sharded"].items():
        assert tensor.dtype == adapters["copies"][key].dtype, key
        if "lora_B" in key:  # trained: B starts at zero
            assert tensor.abs().max() > 0, key
    assert CheckpointStore(output, keep=5).complete_steps() == [3, 6]
    checkpoint = volumes / "runs" / "sharded" / "checkpoints" / "checkpoint-6"
    assert load_file(checkpoint / "adapter_model.safetensors").keys() == adapters["sharded"].keys()
    # The model's part of the checkpoint is the adapter: no gathered base model beside it.
    assert (checkpoint / "optimizer.bin").exists() and not (checkpoint / "pytorch_model_fsdp.bin").exists()

    longer = spec("sharded", resources={"gpus": 2, "gpuMemoryGiB": tight}, training={"maxSteps": 8})
    assert run_trainer(longer, tmp_path / "resume.log") == EXIT_OK, (tmp_path / "resume.log").read_text()[-4000:]
    assert "resuming from pvc://runs/sharded/checkpoints/checkpoint-6" in (tmp_path / "resume.log").read_text()
    resumed = read_manifest(output).metadata["metrics"]
    assert resumed["train"]["steps"] == 8
    # It went on from the checkpoint's adapter: two more steps from a fresh one would stay near the baseline.
    assert resumed["final"]["evalLoss"] < (sharded["baseline"]["evalLoss"] + sharded["final"]["evalLoss"]) / 2, \
        json.dumps(resumed)

    unsharded = spec("sharded", resources={"gpus": 2}, training={"maxSteps": 10})
    assert run_trainer(unsharded, tmp_path / "mode.log") == EXIT_CONFIG
    assert "checkpoint-8 was written by a sharded (FSDP) run" in (tmp_path / "mode.log").read_text()
    assert CheckpointStore(output, keep=5).complete_steps()[-1] == 8  # nothing lost
    assert sharded["final"]["evalLoss"] < sharded["baseline"]["evalLoss"] - 0.1, both  # it learned
