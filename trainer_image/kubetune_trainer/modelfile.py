"""The Ollama Modelfile published beside a run's GGUF files.

Ollama's TEMPLATE is a Go template, not the tokenizer's Jinja one: the tokenizer's template is
rendered on a probe conversation to learn its turn markers and default system prompt, and the same
turns are written in Go template syntax for the chat families kubetune knows (ChatML, Llama 3,
Mistral [INST]). An unknown template gets no TEMPLATE: Ollama then passes the prompt as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

_USER, _SYSTEM = "\x00user\x00", "\x00system\x00"


@dataclass(frozen=True)
class ChatFamily:
    name: str
    marker: str  # text in a rendered conversation that identifies the family
    template: str  # Ollama's Go template
    stops: tuple[str, ...]


FAMILIES = (
    ChatFamily("chatml", "<|im_start|>user\n", (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"), ("<|im_start|>", "<|im_end|>")),
    ChatFamily("llama3", "<|start_header_id|>user<|end_header_id|>", (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"), ("<|start_header_id|>", "<|eot_id|>")),
    ChatFamily("mistral", "[INST]", (
        "{{- range $i, $_ := .Messages }}{{- if eq .Role \"user\" }}[INST] {{ if and $.System (eq $i 0) }}"
        "{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>"
        "{{- end }}{{- end }}"), ("[INST]", "[/INST]")),
)


@dataclass(frozen=True)
class ChatTemplate:
    family: ChatFamily | None
    default_system: str | None


def read_chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def classify(template: str | None) -> ChatTemplate:
    """The family of a tokenizer's chat template and the system prompt it adds when none is given."""
    if not template:
        return ChatTemplate(None, None)
    render = ImmutableSandboxedEnvironment().from_string(template).render
    plain = render(messages=[{"role": "user", "content": _USER}], add_generation_prompt=True,
                   bos_token="", eos_token="")
    family = next((f for f in FAMILIES if f.marker in plain), None)
    if family is None or family.name == "mistral":
        return ChatTemplate(family, None)
    with_system = render(messages=[{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}],
                         add_generation_prompt=True, bos_token="", eos_token="")
    # What the template puts where an explicit system message would go, when there is none.
    before, after = with_system.split(_SYSTEM, 1)
    head = plain.split(family.marker, 1)[0]
    default = head[len(before):len(head) - len(after.split(family.marker, 1)[0])] if head.startswith(before) else ""
    return ChatTemplate(family, default or None)


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(model_file: str, chat: ChatTemplate, eos_token: str | None, *, adapter: str | None = None,
              base_file: str = "BASE.gguf") -> str:
    """A Modelfile for `ollama create NAME -f Modelfile` in the folder holding the GGUF files.
    model_file: the merged GGUF; adapter: the GGUF LoRA, offered as the other way in a comment."""
    lines = [
        "# Ollama: `ollama create NAME -f Modelfile` in this folder, then `ollama run NAME`.",
        "# Prompts trained without a chat template (plain prompt-completion, text) are sent as they are",
        "# through the API's raw mode: `ollama generate` with \"raw\": true.",
    ]
    if adapter:
        lines += ["# The same model as the base plus the LoRA, for a base you already serve as GGUF:",
                  f"#   FROM ./{base_file}", f"#   ADAPTER ./{adapter}"]
    lines += [f"FROM ./{model_file}", ""]
    if chat.family:
        lines += [f"TEMPLATE {_quoted(chat.family.template)}"]
        if chat.default_system:
            lines += [f"SYSTEM {_quoted(chat.default_system)}"]
    stops = dict.fromkeys([*(chat.family.stops if chat.family else ()), *([eos_token] if eos_token else [])])
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    # kubetune's evaluation decodes greedily: the answers Ollama gives match the run's figures.
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)
