"""Hold-out evaluation: token-weighted loss and perplexity, and generation metrics for structured tasks."""

from __future__ import annotations

import contextlib
import json
import math

import torch
from peft import PeftModel
from torch.distributed.fsdp import FullyShardedDataParallel
from trl.trainer.utils import add_fused_lm_head

from kubetune_trainer import distributed
from kubetune_trainer.packing import RowCollator, example_rows


@contextlib.contextmanager
def _fused_lm_head(model):
    """The model's forward with TRL's fused LM head (the one SFTTrainer trains through), which scores
    next tokens in vocabulary tiles: the (tokens x vocabulary) logits are never held, where a plain
    forward holds them in bf16 and cross-entropy again in fp32 (10 GB for 8 rows of 2,048 tokens
    on a 152k vocabulary). Added for the evaluation and taken off after, so a model that has the
    trainer's head keeps it, and one without (the base before training) is left as it was."""
    inner = model.module if isinstance(model, FullyShardedDataParallel) else model
    causal_lm = inner.get_base_model() if isinstance(inner, PeftModel) else inner
    before = vars(causal_lm).get("forward")
    add_fused_lm_head(causal_lm, outputs=("log_probs",))
    try:
        yield
    finally:
        if before is None:
            del causal_lm.forward  # the class's forward again
        else:
            causal_lm.forward = before


def holdout_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Hold-out example indices in batches of batch_size rows at most, examples of similar length
    together (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def holdout_loss(model, examples, pad_id: int, batch_size: int = 8,
                 ranks: distributed.Ranks | None = None) -> dict[str, float]:
    """Mean loss over every loss-bearing hold-out token (not a mean of per-batch means), the
    batches dealt out to the ranks in turn: every rank must call it, and every rank gets the result.
    examples: a `datasets.Dataset` of examples (input_ids, labels); batch_size: rows per forward
    (the plan's micro-batch, which the planner sized for this too)."""
    ranks = ranks or distributed.Ranks()
    if not len(examples):
        return {}
    was_training = model.training
    model.eval()
    collate = RowCollator(pad_id)
    device = next(model.parameters()).device
    columns = examples.select_columns(["input_ids", "labels"])
    everyone = holdout_batches([len(ids) for ids in columns["input_ids"]], batch_size)
    mine = everyone[ranks.rank::ranks.world_size]
    # Sharded (FSDP), each forward gathers every layer from all ranks: all of them run as many
    # forwards, a rank with a batch fewer repeating one it does not count.
    rounds = -(-len(everyone) // ranks.world_size) if isinstance(model, FullyShardedDataParallel) else len(mine)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with _fused_lm_head(model):
        for i in range(rounds):
            batch = collate(example_rows(columns[mine[i] if i < len(mine) else everyone[-1]]))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = model(**batch, fused_lm_head=True)
            if i < len(mine):
                total -= out.log_probs.sum(dtype=torch.float64)
                count += int(out.label_mask.sum())
    model.train(was_training)
    loss_sum, tokens = distributed.sums(ranks, [total.item(), count])
    mean = loss_sum / max(tokens, 1)
    return {"evalLoss": round(mean, 6), "perplexity": round(math.exp(min(mean, 50)), 4), "evalTokens": int(tokens)}


def _clean(tokenizer, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


@torch.no_grad()
def generation_metrics(model, tokenizer, examples, *, max_samples: int, max_new_tokens: int,
                       batch_size: int = 8) -> dict[str, float]:
    """Greedy answers to the hold-out prompts: exact match, JSON validity and JSON equality.
    examples: a `datasets.Dataset` of examples (prompt_text, reference)."""
    chosen: list[tuple[str, str]] = []
    for prompt, reference in zip(examples["prompt_text"], examples["reference"], strict=True):
        if reference and len(chosen) < max_samples:
            chosen.append((prompt, reference))
    if not chosen:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    exact = valid = json_equal = json_refs = 0
    # Sharded (FSDP), the root unit (embeddings, LM head) is gathered for the whole generation, the
    # layers gather themselves in each forward, and every rank keeps stepping until all have finished.
    sharded = isinstance(model, FullyShardedDataParallel)
    gathered = (FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=False) if sharded
                else contextlib.nullcontext())
    try:
        with gathered:
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start:start + batch_size]
                enc = tokenizer([prompt for prompt, _ in batch], add_special_tokens=False, return_tensors="pt",
                                padding=True).to(device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, use_cache=True, synced_gpus=sharded)
                answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for (_, reference), answer in zip(batch, answers, strict=True):
                    answer, reference = answer.strip(), _clean(tokenizer, reference)
                    exact += answer == reference
                    parsed, expected = _json_or_none(answer), _json_or_none(reference)
                    valid += parsed is not None
                    if expected is not None:
                        json_refs += 1
                        json_equal += parsed == expected
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    n = len(chosen)
    metrics = {"exactMatch": round(exact / n, 4), "jsonValid": round(valid / n, 4), "generationSamples": n}
    if json_refs:
        metrics["jsonMatch"] = round(json_equal / json_refs, 4)
    return metrics
