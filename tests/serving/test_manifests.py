"""The serving manifests `kubetune adapters serve-manifest` prints: the Kubernetes types checked
against their published schemas (kubernetes-validate, offline), and every target against a
reviewed golden file (tests/serving/golden/; KUBETUNE_UPDATE_GOLDEN=1 rewrites them, by hand)."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kubetune.cli import main
from kubetune.serving.manifests import NotServable, serve_manifests, to_yaml
from kubetune.serving.publication import merged_ollama, serving_status
from kubetune.serving.vllm import check

GOLDEN = Path(__file__).parent / "golden"
ARTIFACT = "s3://runs/invoices/run-7"
LAYOUT = {"adapter": "adapter", "merged": "merged", "gguf": "gguf"}
CONFIG = {"peft_type": "LORA", "r": 12, "lora_alpha": 24, "target_modules": ["q_proj", "v_proj"], "bias": "none"}


def adapter(base_uri: str = "s3://models/smollm2-135m", layout: dict = LAYOUT) -> dict:
    """A verified LoraAdapter as the operator leaves it: status.serving from the published run."""
    serving = serving_status("invoices", ARTIFACT, base_uri, layout, check(CONFIG, ["LlamaForCausalLM"], "bfloat16"))
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": "invoices-v3", "namespace": "ml"},
            "spec": {"adapterName": "invoices", "version": 3, "baseModel": {"uri": base_uri},
                     "artifact": {"uri": ARTIFACT}, "storage": {"secretRef": {"name": "s3"}}},
            "status": {"phase": "Ready", "serving": serving}}


@pytest.mark.parametrize("target", ["vllm", "kserve", "aibrix", "ollama"])
def test_each_target_matches_its_reviewed_golden_file(target):
    built = to_yaml(serve_manifests(adapter(), target))
    golden = GOLDEN / f"{target}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.write_text(built)
    assert golden.exists(), f"no golden file {golden.name}: run with KUBETUNE_UPDATE_GOLDEN=1 and review it"
    assert built == golden.read_text()


@pytest.mark.parametrize("target", ["vllm", "ollama"])
def test_the_kubernetes_objects_are_valid_against_the_published_schemas(target):
    for doc in serve_manifests(adapter(), target):
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_the_vllm_deployment_serves_the_adapter_at_the_rank_rounded_up():
    deployment, service = serve_manifests(adapter(), "vllm")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:6] == ["/models/base", "--enable-lora", "--max-lora-rank", "16", "--lora-modules",
                        "invoices=/models/invoices/adapter"]
    pull = pod["initContainers"][0]
    assert pull["command"][2] == ("kubetune adapters pull s3://models/smollm2-135m /models/base && "
                                  f"kubetune adapters pull {ARTIFACT} /models/invoices --only adapter")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pull["env"]}
    assert refs["KUBETUNE_S3_ENDPOINT"] == {"name": "s3", "key": "endpoint", "optional": False}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_a_hub_base_is_fetched_by_vllm_not_copied():
    deployment, _ = serve_manifests(adapter(base_uri="hf://HuggingFaceTB/SmolLM2-135M-Instruct"), "vllm")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["args"][0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pull = pod["initContainers"][0]["command"][2]
    assert pull == f"kubetune adapters pull {ARTIFACT} /models/invoices --only adapter"


def test_aibrix_loads_the_adapter_from_its_s3_location():
    (doc,) = serve_manifests(adapter(), "aibrix")
    assert doc["spec"]["artifactURL"] == f"{ARTIFACT}/adapter"
    assert doc["spec"]["credentialsSecretRef"] == {"name": "s3-aibrix"}  # the keys AIBrix reads: aibrix_secret_note
    assert doc["spec"]["podSelector"] == {"matchLabels": {"model.aibrix.ai/name": "smollm2-135m"}}


def test_ollama_needs_the_runs_gguf_files():
    with pytest.raises(NotServable, match="no GGUF files"):
        serve_manifests(adapter(layout={"adapter": "adapter"}), "ollama")


def test_ollama_pulls_gguf_files_a_merge_job_wrote_from_the_merged_model():
    merged = adapter(layout={"adapter": "adapter"})
    merged["status"]["serving"]["ollama"] = merged_ollama("invoices", ARTIFACT, {"models": {"q8_0": "model-q8_0.gguf"}})
    job = serve_manifests(merged, "ollama")[0]["spec"]["template"]["spec"]
    assert job["initContainers"][0]["command"][-1] == f"kubetune adapters pull {ARTIFACT} /models/invoices --only merged"
    assert job["containers"][0]["command"][-1].endswith("ollama create invoices -f /models/invoices/merged/gguf/Modelfile")


@pytest.mark.parametrize("target", ["vllm", "kserve", "ollama"])
def test_no_container_can_gain_privileges_and_the_pull_runs_as_non_root(target):
    doc = serve_manifests(adapter(), target)[0]
    pod = doc["spec"]["predictor"] if target == "kserve" else doc["spec"]["template"]["spec"]
    containers = pod["initContainers"] + (pod["containers"] if target != "kserve" else [pod["model"]])
    for container in containers:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    pull = pod["initContainers"][0]["securityContext"]
    assert pull["runAsNonRoot"] and pull["readOnlyRootFilesystem"]


def test_an_adapter_not_verified_yet_is_refused_by_name():
    unverified = {**adapter(), "status": {"phase": "Verifying"}}
    with pytest.raises(NotServable, match="LoraAdapter ml/invoices-v3 has no status.serving.vllm"):
        serve_manifests(unverified, "vllm")


def test_the_cli_prints_the_manifests_of_a_saved_adapter(tmp_path, capsys):
    saved = tmp_path / "lora.yaml"
    saved.write_text(yaml.safe_dump(adapter()))
    assert main(["adapters", "serve-manifest", "--file", str(saved), "--for", "kserve", "--gpus", "2"]) == 0
    (doc,) = yaml.safe_load_all(capsys.readouterr().out)
    assert doc["kind"] == "InferenceService"
    assert doc["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == 2
    saved.write_text(yaml.safe_dump({**adapter(), "status": {}}))
    assert main(["adapters", "serve-manifest", "--file", str(saved), "--for", "vllm"]) == 1
    assert "no status.serving.vllm yet" in capsys.readouterr().err
