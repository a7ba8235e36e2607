"""The hold-out loss through the fused LM head, in the plan's micro-batches and shared out to the
ranks, is the loss the full logits give: every loss-bearing token weighted once."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kubetune_trainer import distributed
from kubetune_trainer.evaluation import holdout_batches, holdout_loss

pytestmark = pytest.mark.slow

PROMPTS = ["Invoice INV-{n} from Hooli, total {n}.50 USD.\nJSON: ", "Summarise: the meeting moved to day {n}.\n",
           "Translate to French: good morning number {n}\n"]


def _examples(tokenizer, n: int = 11):
    """Examples of uneven lengths, the prompt without labels (completion-only loss)."""
    from datasets import Dataset

    ids, labels = [], []
    for i in range(n):
        prompt = tokenizer(PROMPTS[i % 3].format(n=i * 37), add_special_tokens=False)["input_ids"]
        answer = tokenizer(json.dumps({"id": i, "words": ["total"] * (i % 5)}), add_special_tokens=False)["input_ids"]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def _model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _reference(model, examples) -> tuple[float, int]:
    """The summed cross-entropy of each example's full fp32 logits, one example at a time, and its token count."""
    total, count = 0.0, 0
    for ids, labels in zip(examples["input_ids"], examples["labels"], strict=True):
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        target = torch.tensor(labels[1:])
        total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total, count


def test_holdout_loss_matches_the_full_logits_and_leaves_the_forward_as_it_was(smollm2_dir, tokenizer):
    model, examples = _model(smollm2_dir), _examples(tokenizer)
    total, count = _reference(model, examples)
    for batch_size in (1, 4):
        metrics = holdout_loss(model, examples, tokenizer.pad_token_id, batch_size)
        assert metrics["evalTokens"] == count
        assert metrics["evalLoss"] == pytest.approx(total / count, abs=1e-4)
    assert "forward" not in vars(model)  # the fused head is taken off again
    assert holdout_loss(model, examples.select([]), tokenizer.pad_token_id) == {}


def test_batches_hold_similar_lengths_and_every_example_once():
    lengths = [5, 300, 7, 290, 6, 310, 8]
    batches = holdout_batches(lengths, 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert max(lengths[i] for i in batches[0]) < min(lengths[i] for i in batches[1])


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    from kubetune_trainer.modeling import load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokenizer = load_tokenizer(__import__("pathlib").Path(model_dir))
        metrics = holdout_loss(_model(model_dir), _examples(tokenizer), tokenizer.pad_token_id, 2,
                               distributed.Ranks(rank, rank, world))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(metrics, f)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_share_the_holdout_and_agree_with_one(smollm2_dir, tokenizer, tmp_path):
    """11 examples in batches of 2: six batches, rank 0 takes three and rank 1 three (one of a single row)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(smollm2_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    alone = holdout_loss(_model(smollm2_dir), _examples(tokenizer), tokenizer.pad_token_id, 2)
    assert ranks[0] == ranks[1]  # every rank gets the whole figure
    assert ranks[0]["evalTokens"] == alone["evalTokens"]
    assert ranks[0]["evalLoss"] == pytest.approx(alone["evalLoss"], abs=1e-5)
