"""Loss parity: the kubetune trainer's loss curve against the plain TRL SFTTrainer script's, on the
same examples, in the same order, with the same hyperparameters and seed.

Both train QLoRA (NF4 double quantization, r=16 on q/k/v/o, dropout 0.05) on a random-initialised
architecture (no hub on the GPU machine) for the invoice-extraction task (learnable, so the loss
falls from ~log(vocab)), batch 4 x accumulation 4, gradient checkpointing, lr 2e-4 linear, no
packing, so a step sees the same 16 examples in both. What differs is what kubetune changes:
fused kernels, variable-length attention, no fp32 copies of norms and embeddings, fused AdamW
instead of paged AdamW, its own data path.

Usage: python bench/loss_parity.py --case baseline|kubetune --steps 200 --tokenizer DIR
Under torchrun the kubetune case splits the same 16 examples per step over the GPUs (parity of
one GPU against several). Prints one JSON line with the per-step losses (rank 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_bench import loop_without_side_effects, shared_model_dir  # noqa: E402

from kubetune_trainer import distributed  # noqa: E402
from kubetune_trainer.data import training_rows  # noqa: E402
from kubetune_trainer.modeling import load_tokenizer  # noqa: E402
from kubetune_trainer.samples import invoice_records  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
HYPER = {"lr": 2e-4, "micro": 4, "accum": 4, "r": 16, "alpha": 32, "dropout": 0.05, "seed": 0}


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 5))


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
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=["baseline", "kubetune"])
    ap.add_argument("--arch", default="qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokenizer", required=True)
    a = ap.parse_args()
    tokenizer = load_tokenizer(Path(a.tokenizer))
    ids = token_ids(tokenizer, a.steps * HYPER["micro"] * HYPER["accum"])
    log = LossLog()
    ranks = distributed.init_from_env()  # a group of one, unless under torchrun
    path = shared_model_dir(a.arch, ranks)
    if a.case == "baseline":
        run_baseline(path, ids, tokenizer, a.steps, log)
    else:
        run_kubetune(path, ids, tokenizer, a.steps, log, ranks)
    if ranks.is_main:
        print(json.dumps({"case": a.case, "arch": a.arch, "steps": a.steps, "hyper": HYPER,
                          "gpus": ranks.world_size, "losses": log.losses,
                          "gpu": torch.cuda.get_device_name(0)}), flush=True)


if __name__ == "__main__":
    main()
