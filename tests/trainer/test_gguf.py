"""GGUF export proven by an independent engine: a LoRA run on SmolLM2, merged by its merge Job, which
publishes ARTIFACT/merged/gguf/ (the merged model as f16, q8_0 and q4_k_m, the adapter as a GGUF LoRA, a Modelfile); llama.cpp (llama-cpp-python,
built from source by scripts/setup-env) loads them and answers the invoice hold-out as transformers
does with the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.storage.location import LocalLocation
from kubetune.storage.manifest import read_manifest, verify
from kubetune_trainer.gguf_export import K_QUANTS, GGUFExportError, architecture, export_folder, export_model
from kubetune_trainer.recipe import FineTuneRecipe
from kubetune_trainer.runspec import RunSpec
from tests.trainer.recipe_support import make_volume, merge_run, run_spec

pytestmark = pytest.mark.slow
MAX_NEW_TOKENS = 48
# f16 weights against the fp32 model: each logit rounds through ~30 layers of f16 products. Measured
# on SmolLM2 after the run: a largest difference of about 0.1 on logits of magnitude ~20.
F16_LOGIT_TOLERANCE = 0.5
MIN_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_dir):
    """The quickstart's run (LoRA r16 on SmolLM2, 30 steps) on 200 invoice records (a hold-out of 30
    prompts), and its merge Job with the GGUF types output.gguf asks for."""
    root = tmp_path_factory.mktemp("gguf-run")
    volumes = make_volume(root, smollm2_dir, records=200)
    result = FineTuneRecipe(RunSpec.model_validate(run_spec(root, volumes))).run()
    merge_run(root, volumes, gguf=["f16", "q8_0", "q4_k_m"], name="local")
    return volumes / "runs" / "job", volumes, result


def _gguf(run) -> Path:
    return run[0] / "merged" / "gguf"


@pytest.fixture(scope="module")
def holdout(run, tokenizer) -> list[tuple[str, str]]:
    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune_trainer.data import prepare

    run_dir, volumes, _ = run
    spec = FineTuneJobSpec.model_validate(json.loads((run_dir / "manifest.json").read_text())["spec"])
    data = prepare(volumes / "data" / "invoices.jsonl", spec.dataset.uri, spec.dataset, spec.training, tokenizer)
    return list(zip(data.validation["prompt_text"], data.validation["reference"], strict=True))


@pytest.fixture(scope="module")
def transformers_answers(run, tokenizer, holdout) -> list[str]:
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run[0] / "merged", dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for prompt, _ in holdout:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = merged.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python: scripts/setup-env builds it for the dev extra")


def _load(path: Path, lora: Path | None = None):
    return _llama_cpp().Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2,
                           logits_all=True, verbose=False)


def _greedy(llm, prompt: str) -> str:
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    out = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        if _llama_cpp().llama_vocab_is_eog(llm._model.vocab, token) or len(out) == MAX_NEW_TOKENS:
            break
        out.append(token)
    return llm.detokenize(out, special=False).decode("utf-8", errors="replace").strip()


def _next_token_logits(llm, prompt: str) -> torch.Tensor:
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=False))
    return torch.tensor(llm.scores[llm.n_tokens - 1])


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def test_merge_job_publishes_gguf_files_in_its_manifest(run):
    output = LocalLocation(run[0] / "merged")
    manifest = read_manifest(output)
    listed = {f.path: f for f in manifest.files}
    gguf = manifest.metadata["gguf"]
    assert gguf["models"] == {t: f"model-{t}.gguf" for t in ("f16", "q8_0", "q4_k_m")}
    assert {"gguf/model-f16.gguf", "gguf/model-q8_0.gguf", "gguf/model-q4_k_m.gguf", "gguf/adapter-lora-f32.gguf",
            "gguf/Modelfile"} <= set(listed)
    assert gguf["ollama"] == "ollama create local -f Modelfile"
    assert verify(output, manifest) == []  # sizes and sha256 of every file, the GGUF ones included
    assert listed["gguf/model-q8_0.gguf"].size < 0.6 * listed["gguf/model-f16.gguf"].size
    assert listed["gguf/model-q4_k_m.gguf"].size < 0.8 * listed["gguf/model-q8_0.gguf"].size
    modelfile = (_gguf(run) / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and "#   ADAPTER ./adapter-lora-f32.gguf" in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    print(f"\nGGUF export of SmolLM2-135M: seconds {gguf['seconds']}, bytes "
          f"{ {p: f.size for p, f in listed.items() if p.startswith('gguf/')} }")


def test_llama_cpp_tokenizes_as_transformers(run, tokenizer, holdout):
    llm = _load(_gguf(run) / "model-f16.gguf")
    for prompt, reference in holdout:
        for text in (prompt, reference, "<|im_start|>user\nHi<|im_end|>"):
            expected = tokenizer(text, add_special_tokens=True)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0", "q4_k_m"])
def test_llama_cpp_answers_the_holdout_as_transformers(run, tokenizer, holdout, transformers_answers, gguf_type):
    llm = _load(_gguf(run) / f"model-{gguf_type}.gguf")
    answers = [_greedy(llm, prompt) for prompt, _ in holdout]
    agreement = _agreement(answers, transformers_answers)
    # The references end with the EOS token the completion was trained with; the answers stop before it.
    references = [tokenizer.decode(tokenizer(r, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
                  .strip() for _, r in holdout]
    correct = _agreement(answers, references)
    print(f"\n{gguf_type}: exact-match agreement with transformers {agreement:.3f} on {len(holdout)} prompts; "
          f"exact match with the references {correct:.3f}")
    if gguf_type in K_QUANTS:
        return  # 4-bit weights on a 135M model: the agreement is reported, not held to the f16/q8_0 bar
    assert agreement >= MIN_AGREEMENT
    assert correct >= 0.5  # the fine-tune shows in llama.cpp, so agreement is not agreement on noise


@torch.no_grad()
def test_f16_next_token_logits_match_transformers(run, tokenizer, holdout):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(run[0] / "merged", dtype=torch.float32).eval()
    llm = _load(_gguf(run) / "model-f16.gguf")
    worst = 0.0
    for prompt, _ in holdout[:10]:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        expected = merged(ids).logits[0, -1]
        actual = _next_token_logits(llm, prompt)
        worst = max(worst, (actual - expected).abs().max().item())
        assert actual.argmax() == expected.argmax()
    print(f"\nf16 next-token logits: largest difference {worst:.4f} over 10 prompts")
    assert worst <= F16_LOGIT_TOLERANCE


def test_base_gguf_with_gguf_lora_matches_merged_gguf(run, smollm2_dir, holdout, tmp_path):
    base = export_model(smollm2_dir, tmp_path / "base-f16.gguf", "f16")
    with_lora = _load(base, _gguf(run) / "adapter-lora-f32.gguf")
    merged = _load(_gguf(run) / "model-f16.gguf")
    answers = [_greedy(with_lora, prompt) for prompt, _ in holdout]
    expected = [_greedy(merged, prompt) for prompt, _ in holdout]
    agreement = _agreement(answers, expected)
    plain = _load(base)
    # Without the adapter the base answers differently, so the agreement above is the adapter's.
    assert _agreement([_greedy(plain, prompt) for prompt, _ in holdout[:5]], expected[:5]) < 0.5
    worst = max((_next_token_logits(with_lora, p) - _next_token_logits(merged, p)).abs().max().item()
                for p, _ in holdout[:10])
    print(f"\nbase f16 + GGUF LoRA vs merged f16: agreement {agreement:.3f}, largest logit difference {worst:.4f}")
    assert agreement >= MIN_AGREEMENT
    assert worst <= F16_LOGIT_TOLERANCE


def test_a_k_quant_alone_is_made_from_an_f16_file_that_is_not_kept(run, smollm2_dir, holdout, tmp_path):
    exported = export_folder(smollm2_dir, run[0] / "adapter", tmp_path / "gguf", ["q4_k_m"], "base")
    assert exported["models"] == {"q4_k_m": "model-q4_k_m.gguf"}
    assert sorted(p.name for p in tmp_path.rglob("*.gguf*")) == ["adapter-lora-f32.gguf", "model-q4_k_m.gguf"]
    assert "FROM ./model-q4_k_m.gguf" in (tmp_path / "gguf" / "Modelfile").read_text()
    assert _greedy(_load(tmp_path / "gguf" / "model-q4_k_m.gguf"), holdout[0][0])


def test_unsupported_architecture_is_named(tmp_path, smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_text((smollm2_dir / name).read_text())
    gpt2 = {**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(GGUFExportError, match=r"architecture GPT2LMHeadModel is not supported "
                       r"\(supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM\)"):
        export_folder(tmp_path, tmp_path, tmp_path / "gguf", ["f16"], "gpt2")
    assert not (tmp_path / "gguf").exists()  # refused before anything is written
    assert architecture(config).hf_name == "LlamaForCausalLM"


def test_merge_of_an_unsupported_architecture_publishes_without_gguf(tmp_path, smollm2_dir, tokenizer):
    """A small GPT-2 (random weights, SmolLM2's tokenizer): GGUF export refuses it by name, and the
    merged model is published all the same."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    volumes = make_volume(tmp_path, smollm2_dir, records=40)
    (volumes / "models" / "gpt2").symlink_to(model_dir, target_is_directory=True)
    body = run_spec(tmp_path, volumes, baseModel={"uri": "pvc://models/gpt2"}, training={"maxSteps": 2})
    FineTuneRecipe(RunSpec.model_validate(body)).run()
    output = LocalLocation(merge_run(tmp_path, volumes, baseModel={"uri": "pvc://models/gpt2"}, gguf=["f16"]))
    manifest = read_manifest(output)
    paths = {f.path for f in manifest.files}
    assert "model.safetensors" in paths and not any(p.startswith("gguf/") for p in paths)
    assert manifest.metadata["gguf"] == {"error": "architecture GPT2LMHeadModel is not supported (supported: "
                                                  "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"}
    assert verify(output, manifest) == []
