"""Invalid specs: each names the exact field path and message a user sees."""

from __future__ import annotations

import pytest

from kubetune.api.validation import Problem, validate_object
from tests.support import DELETE, minimal_job, patched

S3 = {"storage": {"secretRef": {"name": "minio"}}}
CASES = [
    # (id, spec patch, path, message)
    ("r-zero", {"lora": {"r": 0}}, "spec.lora.r", "input should be greater than or equal to 1"),
    ("r-too-big", {"lora": {"r": 513}}, "spec.lora.r", "input should be less than or equal to 512"),
    ("r-not-int", {"lora": {"r": "sixteen"}}, "spec.lora.r",
     "input should be a valid integer"),
    ("alpha-zero", {"lora": {"alpha": 0}}, "spec.lora.alpha", "input should be greater than 0"),
    ("dropout-one", {"lora": {"dropout": 1}}, "spec.lora.dropout", "input should be less than 1"),
    ("all-linear-mixed", {"lora": {"targetModules": ["all-linear", "q_proj"]}}, "spec.lora.targetModules",
     "all-linear cannot be combined with module names"),
    ("no-target-modules", {"lora": {"targetModules": []}}, "spec.lora.targetModules",
     "list should have at least 1 item after validation, not 0"),
    ("bad-module-name", {"lora": {"targetModules": ["q proj"]}}, "spec.lora.targetModules[0]",
     "string should match pattern '^[A-Za-z0-9_.-]{1,128}$'"),
    ("split-negative", {"dataset": {"validationSplit": -0.1}}, "spec.dataset.validationSplit",
     "input should be greater than or equal to 0"),
    ("split-half", {"dataset": {"validationSplit": 0.5}}, "spec.dataset.validationSplit",
     "input should be less than 0.5"),
    ("unknown-format", {"dataset": {"format": "sharegpt"}}, "spec.dataset.format",
     "input should be 'auto', 'alpaca', 'chat', 'prompt-completion' or 'text'"),
    ("bad-sha", {"dataset": {"sha256": "abc"}}, "spec.dataset.sha256",
     "string should match pattern '^[a-f0-9]{64}$'"),
    ("validation-uri-with-split", {"dataset": {"validationUri": "pvc://data/val.jsonl"}},
     "spec.dataset.validationSplit", "validationUri is the hold-out: set validationSplit to 0 (uri is then not split)"),
    ("bad-validation-sha", {"dataset": {"validationUri": "pvc://data/val.jsonl", "validationSplit": 0,
                                        "validationSha256": "abc"}},
     "spec.dataset.validationSha256", "string should match pattern '^[a-f0-9]{64}$'"),
    ("validation-sha-without-uri", {"dataset": {"validationSha256": "a" * 64}}, "spec.dataset.validationSha256",
     "validationSha256 pins the data of validationUri: it needs validationUri"),
    ("validation-uri-traversal", {"dataset": {"validationUri": "pvc://data/../x.jsonl", "validationSplit": 0}},
     "spec.dataset.validationUri", "URI must not contain '.' or '..' path segments"),
    ("hf-validation-not-allowed", {"dataset": {"validationUri": "hf://org/val", "validationSplit": 0}},
     "spec.dataset.validationUri", "hf:// sources are refused unless allowHubDownloads is true"),
    ("s3-validation-without-secret", {"dataset": {"validationUri": "s3://datasets/val.jsonl", "validationSplit": 0}},
     "spec.storage.secretRef", "s3:// URIs need storage.secretRef"),
    ("http-uri", {"dataset": {"uri": "https://example.com/d.jsonl"}}, "spec.dataset.uri",
     "URI must start with one of s3://, pvc://, hf://"),
    ("s3-traversal", {"baseModel": {"uri": "s3://bucket/../x"}, **S3}, "spec.baseModel.uri",
     "URI must not contain '.' or '..' path segments"),
    ("pvc-traversal", {"dataset": {"uri": "pvc://claim/../../etc/passwd"}}, "spec.dataset.uri",
     "URI must not contain '.' or '..' path segments"),
    ("dot-segment", {"output": {"uri": "pvc://claim/./x"}}, "spec.output.uri",
     "URI must not contain '.' or '..' path segments"),
    ("empty-segment", {"output": {"uri": "pvc://claim/a//b"}}, "spec.output.uri",
     "URI must not contain empty path segments ('//')"),
    ("bad-bucket", {"dataset": {"uri": "s3://Bad_Bucket/x"}, **S3}, "spec.dataset.uri",
     "URI is not of the form s3://bucket/key with a valid bucket name "
     "(allowed characters in paths: letters, digits, ._~+=@,-)"),
    ("uri-too-long", {"dataset": {"uri": "pvc://claim/" + "a" * 1100}}, "spec.dataset.uri",
     "URI is 1112 characters long; the limit is 1024"),
    ("hf-not-allowed", {"baseModel": {"uri": "hf://HuggingFaceTB/SmolLM2-135M"}}, "spec.baseModel.uri",
     "hf:// sources are refused unless allowHubDownloads is true"),
    ("hf-dataset-not-allowed", {"dataset": {"uri": "hf://org/data"}}, "spec.dataset.uri",
     "hf:// sources are refused unless allowHubDownloads is true"),
    ("hf-output", {"output": {"uri": "hf://org/out"}, "allowHubDownloads": True}, "spec.output.uri",
     "output cannot be written to the hub: use s3:// or pvc://"),
    ("s3-without-secret", {"dataset": {"uri": "s3://datasets/a.jsonl"}}, "spec.storage.secretRef",
     "s3:// URIs need storage.secretRef"),
    ("secret-bad-name", {"storage": {"secretRef": {"name": "Minio_Creds"}}}, "spec.storage.secretRef.name",
     "string should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"),
    ("qlora-8bit", {"method": "qlora", "quantization": {"bits": 8}}, "spec.quantization.bits",
     "method qlora needs 4-bit quantization"),
    ("lora-quantized", {"quantization": {"bits": 4}}, "spec.quantization",
     "method lora trains an unquantized base: remove quantization or use method qlora"),
    ("qlora-cpu", {"method": "qlora", "resources": {"gpus": 0}}, "spec.resources.gpus",
     "method qlora needs at least one GPU (4-bit kernels are CUDA-only)"),
    ("unknown-method", {"method": "full"}, "spec.method", "input should be 'qlora' or 'lora'"),
    ("negative-gpus", {"resources": {"gpus": -1}}, "spec.resources.gpus",
     "input should be greater than or equal to 0"),
    ("multinode-cpu", {"resources": {"gpus": 0, "nodes": 2}}, "spec.resources.gpus",
     "multi-node training needs at least one GPU per node"),
    ("bad-memory", {"resources": {"memory": "lots"}}, "spec.resources.memory",
     "string should match pattern '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"),
    ("bad-toleration-effect", {"resources": {"tolerations": [{"key": "gpu", "effect": "Never"}]}},
     "spec.resources.tolerations[0].effect", "input should be 'NoSchedule', 'PreferNoSchedule' or 'NoExecute'"),
    ("bad-priority-class", {"resources": {"priorityClassName": "High Priority"}}, "spec.resources.priorityClassName",
     "string should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"),
    ("micro-over-batch", {"training": {"batchSize": 8, "microBatchSize": 16}}, "spec.training.microBatchSize",
     "must not exceed batchSize"),
    ("lr-zero", {"training": {"learningRate": 0}}, "spec.training.learningRate", "input should be greater than 0"),
    ("seq-too-short", {"training": {"maxSeqLength": 8}}, "spec.training.maxSeqLength",
     "input should be greater than or equal to 32"),
    ("max-steps-zero", {"training": {"maxSteps": 0}}, "spec.training.maxSteps",
     "input should be greater than or equal to 1"),
    ("unknown-scheduler", {"training": {"lrScheduler": "step"}}, "spec.training.lrScheduler",
     "input should be 'cosine', 'linear' or 'constant'"),
    ("exact-match-no-split", {"evaluation": {"exactMatch": True}, "dataset": {"validationSplit": 0}},
     "spec.dataset.validationSplit", "evaluation.exactMatch needs a hold-out (validationSplit > 0, or validationUri)"),
    ("dpo-settings-for-sft", {"objective": {"dpo": {"beta": 0.5}}}, "spec.objective.dpo",
     "objective.dpo needs objective.type dpo"),
    ("dpo-beta-zero", {"objective": {"type": "dpo", "dpo": {"beta": 0}}}, "spec.objective.dpo.beta",
     "input should be greater than 0"),
    ("dpo-unknown-loss", {"objective": {"type": "dpo", "dpo": {"lossType": "kto"}}}, "spec.objective.dpo.lossType",
     "input should be 'sigmoid', 'hinge', 'ipo' or 'sigmoid_norm'"),
    ("unknown-objective", {"objective": {"type": "ppo"}}, "spec.objective.type", "input should be 'sft' or 'dpo'"),
    ("dpo-with-format", {"objective": {"type": "dpo"}, "dataset": {"format": "chat"}}, "spec.dataset.format",
     "objective dpo reads prompt/chosen/rejected records: dataset.format must be auto"),
    ("dpo-with-exact-match", {"objective": {"type": "dpo"}, "evaluation": {"exactMatch": True}},
     "spec.evaluation.exactMatch", "evaluation.exactMatch is for objective sft; dpo reports reward accuracy"),
    ("bad-queue", {"queueName": "GPU Queue"}, "spec.queueName",
     "string should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"),
    ("priority-without-queue", {"workloadPriorityClassName": "low"}, "spec.workloadPriorityClassName",
     "workloadPriorityClassName is a Kueue priority: it needs queueName"),
    ("bad-workload-priority", {"queueName": "q", "workloadPriorityClassName": "Low Priority"},
     "spec.workloadPriorityClassName",
     "string should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"),
    ("negative-backoff", {"backoffLimit": -1}, "spec.backoffLimit", "input should be greater than or equal to 0"),
    ("checkpoint-zero", {"checkpointEverySteps": 0}, "spec.checkpointEverySteps",
     "input should be greater than or equal to 1"),
    ("unknown-field", {"learningRate": 0.1}, "spec.learningRate", "unknown field"),
    ("missing-dataset", {"dataset": DELETE}, "spec.dataset", "is required"),
    ("missing-output", {"output": DELETE}, "spec.output", "is required"),
    ("suspend-not-bool", {"suspend": "maybe"}, "spec.suspend", "input should be a valid boolean"),
    # Coercions the API server's schema refuses (found by the property test): refused here too.
    ("suspend-as-number", {"suspend": 0}, "spec.suspend", "input should be a valid boolean"),
    ("r-as-string", {"lora": {"r": "16"}}, "spec.lora.r", "input should be a valid integer"),
    ("adapter-name", {"output": {"adapterName": "My Adapter"}}, "spec.output.adapterName",
     "string should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"),
]


@pytest.mark.parametrize("patch,path,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_spec_names_field_and_reason(patch, path, message):
    resource, problems = validate_object(minimal_job(**patch))
    assert resource is None
    assert problems == [Problem(path, message)]


def test_several_broken_rules_are_all_reported():
    doc = minimal_job(quantization={"bits": 4}, dataset={"uri": "s3://datasets/a.jsonl"})
    _, problems = validate_object(doc)
    assert {p.path for p in problems} == {"spec.quantization", "spec.storage.secretRef"}


ENVELOPE_CASES = [
    ({"apiVersion": "kubetune.dev/v1"}, "apiVersion", "must be kubetune.dev/v1alpha1"),
    ({"kind": "FineTuneRun"}, "kind", "must be one of FineTuneJob, LoraAdapter"),
    ({"metadata": {"name": "Bad_Name"}}, "metadata.name",
     "string should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"),
]


@pytest.mark.parametrize("patch,path,message", ENVELOPE_CASES)
def test_envelope_errors(patch, path, message):
    _, problems = validate_object(patched(minimal_job(), patch))
    assert problems == [Problem(path, message)]


ADAPTER = {
    "apiVersion": "kubetune.dev/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": "a"},
    "spec": {"baseModel": {"uri": "pvc://models/m"}, "artifact": {"uri": "pvc://runs/r"}},
}
ADAPTER_CASES = [
    ({"evaluationGate": [{"metric": "evalLoss"}]}, "spec.evaluationGate[0].min", "a threshold needs min or max"),
    ({"evaluationGate": [{"metric": "evalLoss", "min": 2, "max": 1}]}, "spec.evaluationGate[0].max",
     "max must not be below min"),
    ({"stage": "staging"}, "spec.stage", "input should be 'candidate', 'production' or 'archived'"),
    ({"deletionPolicy": "Orphan"}, "spec.deletionPolicy", "input should be 'Retain' or 'Delete'"),
    ({"artifact": {"uri": "s3://adapters/x"}}, "spec.storage.secretRef", "s3:// URIs need storage.secretRef"),
    ({"artifact": {"uri": "hf://org/x"}}, "spec.artifact.uri", "artifacts live on s3:// or pvc://, not on the hub"),
    ({"artifact": {"uri": "pvc://runs"}}, "spec.artifact.uri", "must name a prefix inside the bucket or claim, not its root"),
    ({"version": 0}, "spec.version", "input should be greater than or equal to 1"),
    ({"merge": {"gpus": 9}}, "spec.merge.gpus", "input should be less than or equal to 8"),
    ({"merge": {"gguf": ["q8_0"]}}, "spec.merge.gguf", "merge.gguf is written by the merge Job: it needs merge.enabled"),
]


@pytest.mark.parametrize("patch,path,message", ADAPTER_CASES)
def test_invalid_adapter(patch, path, message):
    _, problems = validate_object(patched(ADAPTER, {"spec": patch}))
    assert problems == [Problem(path, message)]
