"""Loss parity: the kubetune trainer's loss curve against the plain TRL SFTTrainer script's, on the
same examples, in the same order, with the same hyperparameters and seed.

Both train QLoRA (NF4 double quantization, r=16 on q/k/v/o, dropout 0.05) on a random-initialised
architecture (no hub on the GPU machine) for the invoice-extraction task (learnable, so the loss
falls from ~log(vocab)), batch 4 x accumulation 4, gradient checkpointing, lr 2e-4 linear, no
packing, so a step sees the same 16 examples in both. What differs is what kubetune changes:
fused kernels, variable-length attention, no fp32 copies of norms and embeddings, fused AdamW
instead of paged AdamW, its own data path.

Usage: python bench/loss_parity.py --case baseline|kubetune --steps 200 --tokenizer DIR
           [--layers N] [--log FILE]
Under torchrun the kubetune case splits the same 16 examples per step over the GPUs (parity of
one GPU against several). Prints one JSON line with the per-step losses (rank 0).

--layers N keeps the architecture's width, heads and vocabulary with N decoder layers (its own
model directory): the step time of this 0.5B run is launch-bound, so it scales with the layers.
--log FILE appends {"step", "loss", "t"} per optimizer step as it is logged, then the final line:
a run stopped by a time limit still leaves its curve (bench/plot_parity.py reads either).
--build-model-only builds the random-init model directory and exits (run it once before two
cases start side by side, so they do not build the same directory at once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from archs import ARCHS  # noqa: E402
from trainer_bench import loop_without_side_effects, shared_model_dir  # noqa: E402

from kubetune_trainer import distributed  # noqa: E402
from kubetune_trainer.data import training_rows  # noqa: E402
from kubetune_trainer.modeling import load_tokenizer  # noqa: E402
from kubetune_trainer.recipe import library_versions  # noqa: E402
from kubetune_trainer.samples import invoice_records  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
HYPER = {"lr": 2e-4, "micro": 4, "accum": 4, "r": 16, "alpha": 32, "dropout": 0.05, "seed": 0}


class LossLog(TrainerCallback):
    def __init__(self, path: str | None = None):
        self.losses = []
        self.path, self.t0 = path, time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 5))
            if self.path:
                self.write({"step": state.global_step, "loss": self.losses[-1],
                            "t": round(time.perf_counter() - self.t0, 2)})

    def write(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def model_dir(arch: str, layers: int | None, ranks) -> str:
    """The random-init model directory: the named architecture, or its first `layers` layers'
    shape. Built by rank 0 in a process of its own (as bench/archs.py does), written beside its
    final name and renamed, so a reader never sees half a directory."""
    if not layers or layers == ARCHS[arch][2]:
        return shared_model_dir(arch, ranks)
    path = f"/tmp/bench-models/{arch}-{layers}l"
    if ranks.is_main and not os.path.exists(os.path.join(path, "config.json")):
        subprocess.run([sys.executable, __file__, "--_build", arch, str(layers), path], check=True)
    distributed.barrier(ranks)
    return path


def _build(arch: str, layers: int, path: str) -> None:
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    mt, h, _, nh, kv, inter, vocab = ARCHS[arch]
    cfg = AutoConfig.for_model(mt, hidden_size=h, num_hidden_layers=layers, num_attention_heads=nh,
                               num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                               max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def token_ids(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(r["prompt"] + r["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            for r in invoice_records(n, seed=7)]


def run_baseline(path: str, ids: list[list[int]], tokenizer, steps: int, log: LossLog) -> None:
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map={"": 0},
                                                 dtype=torch.bfloat16, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"], lora_dropout=HYPER["dropout"], bias="none",
                      task_type="CAUSAL_LM", target_modules=ATTN)
    cfg = SFTConfig(output_dir="/tmp/parity-baseline", per_device_train_batch_size=HYPER["micro"],
                    gradient_accumulation_steps=HYPER["accum"], optim="paged_adamw_32bit", packing=False,
                    gradient_checkpointing=True, max_steps=steps, learning_rate=HYPER["lr"],
                    lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=True,
                    logging_steps=1, save_strategy="no", report_to=[], max_length=2048, seed=HYPER["seed"],
                    data_seed=HYPER["seed"], dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list([{"input_ids": x} for x in ids]),
                         processing_class=tokenizer, peft_config=lora, callbacks=[log])
    trainer.train()


def run_kubetune(path: str, ids: list[list[int]], tokenizer, steps: int, log: LossLog, ranks) -> None:
    from transformers import set_seed

    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune_trainer.modeling import Placement, attach_lora, load_base
    from kubetune_trainer.training import build_trainer, plan_batches

    spec = FineTuneJobSpec.model_validate({
        "baseModel": {"uri": "pvc://models/bench"}, "dataset": {"uri": "pvc://data/parity.jsonl"},
        "method": "qlora", "lora": {"r": HYPER["r"], "alpha": HYPER["alpha"], "dropout": HYPER["dropout"],
                                    "targetModules": ATTN},
        "training": {"maxSteps": steps, "maxSeqLength": 2048, "packing": False, "learningRate": HYPER["lr"],
                     "microBatchSize": HYPER["micro"],
                     "lrScheduler": "linear", "warmupRatio": 0.0, "weightDecay": 0.0, "maxGradNorm": 1.0,
                     "batchSize": HYPER["micro"] * HYPER["accum"],
                     "gradientCheckpointing": "on", "seed": HYPER["seed"]},
        "output": {"uri": "pvc://runs/parity"}, "checkpointEverySteps": 1_000_000,
    })
    plan = plan_batches(spec, Path(path), on_gpu=True, world_size=ranks.world_size)
    set_seed(HYPER["seed"])
    model = attach_lora(load_base(Path(path), spec, Placement.detect(), gradient_checkpointing=True), spec)
    from datasets import Dataset

    rows = training_rows(Dataset.from_dict({"input_ids": ids, "labels": ids}), 2048, packing=False)
    trainer, _ = build_trainer(model, spec, rows, tokenizer=tokenizer, plan=plan, work_dir=Path("/tmp/parity-kubetune"),
                               callback_kwargs=loop_without_side_effects(ranks))
    trainer.add_callback(log)
    trainer.train()


def main() -> None:
    if sys.argv[1:2] == ["--_build"]:
        _build(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["baseline", "kubetune"])
    ap.add_argument("--arch", default="qwen2.5-0.5b", choices=sorted(ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokenizer")
    ap.add_argument("--log", help="append each step's loss here as a JSON line, then the final line")
    ap.add_argument("--build-model-only", action="store_true")
    a = ap.parse_args()
    ranks = distributed.init_from_env()  # a group of one, unless under torchrun
    path = model_dir(a.arch, a.layers, ranks)
    if a.build_model_only:
        print(path)
        return
    if not (a.case and a.tokenizer):
        ap.error("--case and --tokenizer are required")
    started = time.perf_counter()
    tokenizer = load_tokenizer(Path(a.tokenizer))
    ids = token_ids(tokenizer, a.steps * HYPER["micro"] * HYPER["accum"])
    log = LossLog(a.log if ranks.is_main else None)
    layers = a.layers or ARCHS[a.arch][2]
    if a.case == "baseline":
        run_baseline(path, ids, tokenizer, a.steps, log)
    else:
        run_kubetune(path, ids, tokenizer, a.steps, log, ranks)
    if ranks.is_main:
        result = {"case": a.case, "arch": a.arch, "layers": layers, "steps": a.steps, "hyper": HYPER,
                  "gpus": ranks.world_size, "losses": log.losses,
                  "train_s": round(time.perf_counter() - log.t0, 1), "wall_s": round(time.perf_counter() - started, 1),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "versions": _versions()}
        if a.log:
            log.write(result)
        print(json.dumps(result), flush=True)


def _versions() -> dict:
    """Each library's version, None where it is not installed."""
    names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel")
    return {**dict.fromkeys(names), **library_versions(names)}


if __name__ == "__main__":
    main()
