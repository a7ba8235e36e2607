"""Hold-out evaluation: token-weighted loss and perplexity, and generation metrics for structured tasks."""

from __future__ import annotations

import contextlib
import json
import math

import torch
from torch.distributed.fsdp import FullyShardedDataParallel

from kubetune_trainer.packing import RowCollator, example_rows


@torch.no_grad()
def holdout_loss(model, examples, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Mean loss over every loss-bearing hold-out token (not a mean of per-batch means).
    examples: a `datasets.Dataset` of examples (input_ids, labels)."""
    if not len(examples):
        return {}
    was_training = model.training
    model.eval()
    collate = RowCollator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for part in examples.select_columns(["input_ids", "labels"]).iter(batch_size):
        batch = collate(example_rows(part))
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits.float()
        shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((shift_labels != -100).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    return {"evalLoss": round(mean, 6), "perplexity": round(math.exp(min(mean, 50)), 4), "evalTokens": count}


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
