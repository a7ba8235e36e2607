"""The adapter of a model sharded over two processes (FSDP1 on the CPU, gloo), wrapped as
transformers wraps a PEFT model: gathered unit by unit, it is the adapter the unsharded model
saves, key for key and bit for bit. (The whole sharded run, bitsandbytes included, needs GPUs:
tests/trainer/test_gpu_sharded.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kubetune_trainer.sharding import save_adapter

pytestmark = pytest.mark.slow
WORLD = 2


def _lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # as attach_lora
    model = get_peft_model(LlamaForCausalLM(config), lora)
    with torch.no_grad():  # as after training: B no longer zero, every tensor distinct
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param))
    return model


def _worker(rank: int, rendezvous: str, out: Path) -> None:
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    try:
        model = _lora_model()
        if rank == 0:
            model.save_pretrained(out / "unsharded")
        bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
        sharded = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                       device_id=torch.device("cpu"), mixed_precision=bf16)
        tokens = torch.randint(0, 128, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sharded(input_ids=tokens, labels=tokens).loss.backward()  # the root is initialised, as in training
        save_adapter(sharded, out / "sharded", is_main=rank == 0)
    finally:
        dist.destroy_process_group()


def test_gathered_adapter_is_the_unsharded_adapter(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", tmp_path), nprocs=WORLD)
    unsharded = load_file(tmp_path / "unsharded" / "adapter_model.safetensors")
    sharded = load_file(tmp_path / "sharded" / "adapter_model.safetensors")
    assert len(unsharded) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    assert sharded.keys() == unsharded.keys()
    for key, tensor in unsharded.items():
        assert sharded[key].dtype == tensor.dtype and torch.equal(sharded[key], tensor), key
    config = {name: json.loads((tmp_path / name / "adapter_config.json").read_text())
              for name in ("unsharded", "sharded")}
    assert config["sharded"] == config["unsharded"]
    assert not any((tmp_path / "sharded").glob("rank*"))  # written by the main rank alone
