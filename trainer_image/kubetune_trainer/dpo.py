"""DPO: TRL's DPOTrainer over kubetune's checked preference pairs, with the SFT path's batch plan,
checkpoint store, progress reporting and SIGTERM handling (kubetune_trainer.training's callback).

The reference model is the base with the adapter disabled. DPOTrainer is handed the base model and
the LoRA config, so TRL wraps the model itself and, with no `ref_model` and no pretrained adapter
to copy, computes the reference log-probabilities under `disable_adapter`: one copy of the base in
memory, and a second forward (without gradients) per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from kubetune.api.finetunejob import FineTuneJobSpec
from kubetune.planning import RunPlan
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.modeling import lora_config
from kubetune_trainer.preference import PreparedPreferences
from kubetune_trainer.training import CountingCollator, LoopCallback, trainer_arguments

EVAL_PAIRS_PER_BATCH = 4


class PairCounter(CountingCollator):
    """Counts completion tokens (chosen and rejected: both are trained on) and pairs seen."""

    @staticmethod
    def count_loss_tokens(batch) -> int:
        return int(batch["completion_mask"].sum())


def build_dpo_trainer(base_model, spec: FineTuneJobSpec, data: PreparedPreferences, *, tokenizer, plan: RunPlan,
                      work_dir: Path, callback_kwargs: dict) -> tuple[DPOTrainer, LoopCallback]:
    """base_model: without an adapter (TRL attaches the spec's LoRA). The micro-batch counts pairs."""
    if plan.sharded:
        raise ConfigError("objective dpo does not run sharded (FSDP) yet: use GPUs that hold the base model "
                          "(resources.gpuMemoryGiB) or method qlora")
    dpo = spec.objective.dpo_settings()
    args = DPOConfig(**trainer_arguments(spec, plan, work_dir, on_gpu=next(base_model.parameters()).is_cuda),
                     beta=dpo.beta, loss_type=[dpo.loss_type])
    counter = PairCounter(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length))
    callback = LoopCallback(counter=counter, **callback_kwargs)
    try:
        trainer = DPOTrainer(model=base_model, args=args, train_dataset=data.train,
                             eval_dataset=data.validation if len(data.validation) else None,
                             data_collator=counter, processing_class=tokenizer, callbacks=[callback],
                             peft_config=lora_config(spec))
    except ValueError as exc:  # TRL and peft refuse settings (e.g. target modules the model lacks) this way
        raise ConfigError(f"DPO setup: {exc}") from exc
    return trainer, callback


def _completion_logps(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of each sequence's completion tokens (DPO's sequence log-likelihood),
    through the fused LM head DPOTrainer added to the model, as its loss computes them: the
    (tokens x vocabulary) logits are never held whole."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    mask = batch["completion_mask"][:, 1:]
    return (out.log_probs[:, -mask.size(1):] * mask).sum(-1).float()


@torch.no_grad()
def preference_metrics(model, pairs, *, pad_id: int, beta: float, max_length: int) -> dict[str, float]:
    """Hold-out pairs as DPO scores them. The implicit reward of a completion is beta times its
    log-likelihood ratio to the reference (the base: the adapter disabled); rewardAccuracy is the
    share of pairs whose chosen reward is higher, rewardMargin the mean difference. Both are 0 for
    the untrained adapter by construction, so preferenceAccuracy (the model's own likelihood ranks
    chosen above rejected) is what compares the base with the trained model.
    model: the trainer's (DPOTrainer added its fused LM head); pairs: TRL's tokenized pairs
    (prompt_ids, chosen_ids, rejected_ids)."""
    if not len(pairs):
        return {}
    was_training = model.training
    model.eval()
    collate = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length)
    device = next(model.parameters()).device
    policy, reference = [], []
    for part in pairs.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).iter(EVAL_PAIRS_PER_BATCH):
        examples = [dict(zip(part, row, strict=True)) for row in zip(*part.values(), strict=True)]
        batch = {k: v.to(device) for k, v in collate(examples).items()}
        policy.append(torch.stack(_completion_logps(model, batch).chunk(2)))  # [chosen, rejected] x pairs
        with model.disable_adapter():
            reference.append(torch.stack(_completion_logps(model, batch).chunk(2)))
    model.train(was_training)
    logps, ref = torch.cat(policy, dim=1), torch.cat(reference, dim=1)
    rewards = beta * (logps - ref)
    margins = rewards[0] - rewards[1]
    return {"rewardAccuracy": round((margins > 0).float().mean().item(), 4),
            "rewardMargin": round(margins.mean().item(), 6),
            "preferenceAccuracy": round((logps[0] > logps[1]).float().mean().item(), 4),
            "evalPairs": int(margins.numel())}
