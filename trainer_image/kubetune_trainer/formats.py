"""Dataset formats: detect them, check each record, and render it into text spans with loss masks.

Every format becomes a list of `Span`s (text, trainable). Conversations go through the
tokenizer's chat template; plain prompt/completion pairs are concatenated (TRL's convention for
non-conversational data) and end with the EOS token so the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

from kubetune_trainer.records import DatasetError, Record

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Span:
    text: str
    trainable: bool


def detect_format(record: Record, file: str) -> str:
    keys = set(record.data)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    raise DatasetError(file, f"cannot detect the format from fields {sorted(keys)}: expected messages (chat), "
                       "instruction+output (alpaca), prompt+completion, or text", record.where)


@overload
def string_field(record: Record, file: str, field: str, *, required: Literal[True] = ...,
                 allow_empty: bool = ...) -> str: ...
@overload
def string_field(record: Record, file: str, field: str, *, required: bool,
                 allow_empty: bool = ...) -> str | None: ...
def string_field(record: Record, file: str, field: str, *, required: bool = True,
                 allow_empty: bool = False) -> str | None:
    """The field's string; None only where it is not required and absent."""
    value = record.data.get(field)
    if value is None:
        if required:
            raise DatasetError(file, "is required", record.where, field)
        return None
    if not isinstance(value, str):
        raise DatasetError(file, f"must be a string, got {type(value).__name__}", record.where, field)
    if not allow_empty and required and not value.strip():
        raise DatasetError(file, "must not be empty", record.where, field)
    return value


def messages_field(value: Any, record: Record, file: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DatasetError(file, "must be a non-empty list of messages", record.where, field)
    out = []
    for i, message in enumerate(value):
        path = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DatasetError(file, f"must be an object, got {type(message).__name__}", record.where, path)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(file, f"unknown role {role!r} (expected one of {', '.join(ROLES)})", record.where,
                               f"{path}.role")
        if not isinstance(content, str):
            raise DatasetError(file, f"must be a string, got {type(content).__name__}", record.where,
                               f"{path}.content")
        out.append({"role": role, "content": content})
    return out


class Renderer:
    """Turns checked records of one format into spans, using the tokenizer's chat template."""

    def __init__(self, tokenizer, file: str, completion_only: bool):
        self.tok, self.file, self.completion_only = tokenizer, file, completion_only
        self.eos = tokenizer.eos_token or ""

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def conversation(self, messages: list[dict[str, str]], record: Record) -> list[Span]:
        if not any(m["role"] == "assistant" for m in messages):
            raise DatasetError(self.file, "has no assistant message to learn from", record.where, "messages")
        if not self.tok.chat_template:
            raise DatasetError(self.file, "conversations need a tokenizer with a chat template", record.where)
        spans, done = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._template(messages[:i], generation_prompt=True)
            full = self._template(messages[: i + 1], generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DatasetError(self.file, "the tokenizer's chat template does not render conversations "
                                   "incrementally; cannot locate assistant turns", record.where)
            spans += [Span(prompt[len(done):], False), Span(full[len(prompt):], True)]
            done = full
        rest = self._template(messages, generation_prompt=False)[len(done):]
        if rest:
            spans.append(Span(rest, False))
        return self._apply_mask_policy(spans)

    def plain(self, prompt: str, completion: str) -> list[Span]:
        return self._apply_mask_policy([Span(prompt, False), Span(completion + self.eos, True)])

    def _apply_mask_policy(self, spans: list[Span]) -> list[Span]:
        return spans if self.completion_only else [Span(s.text, True) for s in spans]

    def render(self, fmt: str, record: Record) -> list[Span]:
        self.file = record.file or self.file  # a directory's part names itself in errors
        return _RENDER[fmt](self, record)


def _alpaca(r: Renderer, record: Record) -> list[Span]:
    instruction = string_field(record, r.file, "instruction")
    extra = string_field(record, r.file, "input", required=False)
    output = string_field(record, r.file, "output")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    if r.tok.chat_template:
        return r.conversation([{"role": "user", "content": user}, {"role": "assistant", "content": output}], record)
    return r.plain(f"### Instruction:\n{user}\n\n### Response:\n", output)


def _chat(r: Renderer, record: Record) -> list[Span]:
    return r.conversation(messages_field(record.data.get("messages"), record, r.file, "messages"), record)


def _prompt_completion(r: Renderer, record: Record) -> list[Span]:
    prompt, completion = record.data.get("prompt"), record.data.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        messages = (messages_field(prompt, record, r.file, "prompt")
                    + messages_field(completion, record, r.file, "completion"))
        return r.conversation(messages, record)
    return r.plain(string_field(record, r.file, "prompt", allow_empty=True) or "",
                   string_field(record, r.file, "completion"))


def _text(r: Renderer, record: Record) -> list[Span]:
    return [Span(string_field(record, r.file, "text") + r.eos, True)]


_RENDER: dict[str, Callable[[Renderer, Record], list[Span]]] = {
    "alpaca": _alpaca, "chat": _chat, "prompt-completion": _prompt_completion, "text": _text,
}
