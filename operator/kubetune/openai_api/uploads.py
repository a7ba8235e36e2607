"""Checking an uploaded dataset with the trainer's own readers, so an upload the trainer would refuse
is refused at once, with the trainer's message (file, line or row, field)."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

from kubetune_trainer.formats import Renderer, detect_format
from kubetune_trainer.pairs import is_preference, iter_pairs
from kubetune_trainer.records import SUFFIXES, DatasetError, iter_records


class _StructureTemplate:
    """Stands in for a tokenizer so the trainer's Renderer runs its record checks (types, required
    fields, roles, an assistant turn) without a model. The catalog model is not known at upload time,
    and its real chat template is applied when the job runs."""

    eos_token = ""
    chat_template = "structure-only"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def check_dataset(path: Path, filename: str) -> tuple[str, int]:
    """The detected format and record count; raises the trainer's DatasetError naming `filename`.
    Records stream through, so a large upload is never all in memory. Preference pairs (for method
    dpo) are checked as the trainer's DPO reader checks them; the job's method is not known yet."""
    records = iter_records(path, filename)
    first = next(records)  # iter_records raises on a dataset without records
    if is_preference(first):  # the trainer's `format: auto`: the first record decides
        checked = iter_pairs(chain([first], records), filename)
        layout, _ = next(checked)
        return layout, 1 + sum(1 for _ in checked)
    fmt = detect_format(first, filename)
    renderer = Renderer(_StructureTemplate(), filename, completion_only=True)
    count = 0
    for record in chain([first], records):
        renderer.render(fmt, record)
        count += 1
    return fmt, count


def suffix_of(filename: str) -> str:
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(filename, f"unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    return suffix
