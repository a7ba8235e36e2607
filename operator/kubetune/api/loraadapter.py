"""LoraAdapter: a trained, versioned adapter artifact with lineage, verification, optional merge and promotion."""

from __future__ import annotations

import re
from typing import ClassVar, Literal, cast

from pydantic import Field
from pydantic.config import JsonDict

from kubetune.api.fields import Sha256, StorageUriStr
from kubetune.api.finetunejob import BaseModelSource, GgufType, Storage
from kubetune.api.meta import (
    CONDITIONS_SCHEMA_EXTRA,
    DEFAULT_EMPTY,
    DNS1123_SUBDOMAIN,
    QUANTITY,
    ApiModel,
    Condition,
    Rule,
)
from kubetune.api.resource import Resource, name_fits_label

Stage = Literal["candidate", "production", "archived"]
AdapterPhase = Literal["Pending", "Verifying", "Merging", "Ready", "Failed"]


class Artifact(ApiModel):
    uri: StorageUriStr = Field(description="Prefix holding manifest.json and the adapter/ files.")
    manifest_sha256: Sha256 | None = Field(default=None, description="Expected sha256 of manifest.json.")
    size_bytes: int | None = Field(default=None, ge=0, description="Total size of the files the manifest lists.")
    rules: ClassVar = (
        # A bucket or claim root is never one run's artifact: verifying or deleting "it" would
        # reach every run stored there.
        Rule("uri", "must name a prefix inside the bucket or claim, not its root",
             "self.uri.startsWith('hf://') || self.uri.matches('^[a-z0-9]+://[^/]+/[^/]')",
             lambda s: s.uri.startswith("hf://") or re.match(r"^[a-z0-9]+://[^/]+/[^/]", s.uri) is not None),
    )


class Merge(ApiModel):
    enabled: bool = Field(default=False, description="Produce a merged (base + adapter) model if none exists.")
    gpus: int = Field(default=0, ge=0, le=8, description="GPUs for the merge Job; 0 merges on the CPU.")
    memory: str | None = Field(default=None, pattern=QUANTITY, description="Memory for the merge Job.")
    dtype: Literal["bfloat16", "float32"] | None = Field(
        default=None, description="Precision of the merged model; unset: bfloat16 with merge.gpus, else float32. "
        "A FineTuneJob's adapter gets what its training pods would have used.")
    gguf: list[GgufType] = Field(default_factory=list, max_length=3,
                                 description="The merge Job also writes ARTIFACT/merged/gguf/: the merged model as "
                                 "GGUF in these types, the adapter as a GGUF LoRA and an Ollama Modelfile.")
    rules: ClassVar = (
        Rule("gguf", "merge.gguf is written by the merge Job: it needs merge.enabled",
             "!has(self.gguf) || size(self.gguf) == 0 || (has(self.enabled) && self.enabled)",
             lambda s: not s.gguf or s.enabled),
    )


class Threshold(ApiModel):
    metric: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.]{0,62}$",
                        description="A metric of the run manifest, e.g. evalLoss.")
    min: float | None = Field(default=None, description="Promotion needs metric >= min.")
    max: float | None = Field(default=None, description="Promotion needs metric <= max.")
    rules: ClassVar = (
        Rule("min", "a threshold needs min or max", "has(self.min) || has(self.max)",
             lambda s: s.min is not None or s.max is not None),
        Rule("max", "max must not be below min", "!has(self.min) || !has(self.max) || self.min <= self.max",
             lambda s: s.min is None or s.max is None or s.min <= s.max),
    )


class LoraAdapterSpec(ApiModel):
    adapter_name: str | None = Field(default=None, pattern=DNS1123_SUBDOMAIN, max_length=63,
                                     description="Logical adapter name shared by its versions; metadata.name if unset.")
    version: int = Field(default=1, ge=1, description="Version of this adapter name.")
    base_model: BaseModelSource
    artifact: Artifact
    storage: Storage | None = Field(default=None, description="Object-store access, required for s3:// artifacts.")
    merge: Merge = Field(default_factory=Merge, json_schema_extra=DEFAULT_EMPTY)
    stage: Stage = Field(default="candidate", description="Requested stage; promotion passes the gate first.")
    evaluation_gate: list[Threshold] = Field(default_factory=list, max_length=32,
                                             description="Metric thresholds a promotion to production must meet.")
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain", description="Delete removes the artifact objects when the resource is deleted.")
    rules: ClassVar = (
        Rule("storage.secretRef", "s3:// URIs need storage.secretRef",
             "!(self.artifact.uri.startsWith('s3://') || self.baseModel.uri.startsWith('s3://')) || has(self.storage)",
             lambda s: s.storage is not None or not (s.artifact.uri.startswith("s3://")
                                                     or s.base_model.uri.startswith("s3://"))),
        Rule("artifact.uri", "artifacts live on s3:// or pvc://, not on the hub",
             "!self.artifact.uri.startsWith('hf://')", lambda s: not s.artifact.uri.startswith("hf://")),
    )


class Lineage(ApiModel):
    fine_tune_job: str | None = None
    dataset_uri: str | None = None
    dataset_sha256: str | None = None
    validation_dataset_uri: str | None = Field(default=None, description="The run's hold-out file "
                                               "(dataset.validationUri), if it had one.")
    validation_dataset_sha256: str | None = None
    base_model_uri: str | None = None
    base_model_revision: str | None = None
    trainer_image: str | None = None
    objective: str | None = Field(default=None, description="What the adapter was trained for: sft or dpo.")


class VllmServing(ApiModel):
    adapter_name: str = Field(description="The name requests select the adapter by (--lora-modules NAME=...).")
    rank: int | None = Field(default=None, description="The adapter's LoRA rank (adapter_config.json r).")
    max_lora_rank: int | None = Field(default=None, description="The --max-lora-rank it needs: the rank rounded "
                                      "up to a value vLLM accepts.")
    base_model_uri: str
    adapter_uri: str
    base_dir: str = Field(description="Where the base is copied to (or the hub id vLLM fetches).")
    adapter_dir: str = Field(description="Where the adapter is copied to.")
    copy_commands: list[str] = Field(default_factory=list, alias="copy",
                                     description="The copies to make before `command`.")
    command: str | None = Field(default=None, description="The vllm serve line; absent if the rank is unknown.")
    rules_version: str = Field(description="The vLLM release whose rules ServingCompatible applied.")


class OllamaServing(ApiModel):
    modelfile: str = Field(description="Where the copy puts the run's Modelfile (beside its GGUF files).")
    copy_commands: list[str] = Field(default_factory=list, alias="copy",
                                     description="The copies to make before `command`.")
    command: str = Field(description="The ollama create line.")


class Serving(ApiModel):
    vllm: VllmServing | None = None
    peft: str | None = Field(default=None, description="Loading it with transformers and peft.")
    ollama: OllamaServing | None = Field(default=None, description="Creating the Ollama model from the run's "
                                         "GGUF files, when it exported them (output.gguf).")


class LoraAdapterStatus(ApiModel):
    phase: AdapterPhase = "Pending"
    stage: Stage | None = Field(default=None, description="The stage in force (spec.stage once the gate passed).")
    message: str = Field(default="", max_length=32768)
    observed_generation: int | None = None
    # meta's constant is typed by inference (dict[str, Sequence[str]]), not as pydantic's JsonDict
    conditions: list[Condition] = Field(default_factory=list,
                                        json_schema_extra=cast(JsonDict, CONDITIONS_SCHEMA_EXTRA))
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: Lineage | None = None
    adapter_uri: str | None = None
    merged_model_uri: str | None = None
    serving: Serving | None = Field(default=None, description="How to serve it (vLLM, Ollama, peft); whether "
                                    "vLLM can is the ServingCompatible condition.")
    verified_manifest_sha256: str | None = Field(
        default=None, description="sha256 of the run manifest last verified: deletionPolicy Delete removes what "
        "that manifest lists, and nothing if the manifest changed since.")
    artifact_fingerprint: str | None = Field(
        default=None, description="sha256 over the manifest's sha256 and the listed objects' sizes and ETags at "
        "verification; the periodic re-verification compares it with a fresh listing.")


class LoraAdapter(Resource[LoraAdapterSpec, LoraAdapterStatus]):
    kind: Literal["LoraAdapter"] = "LoraAdapter"
    crd_plural: ClassVar[str] = "loraadapters"
    crd_singular: ClassVar[str] = "loraadapter"
    crd_short_names: ClassVar[tuple[str, ...]] = ("lora",)
    crd_printer_columns: ClassVar[tuple[dict, ...]] = (
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Version", "type": "integer", "jsonPath": ".spec.version"},
        {"name": "Artifact", "type": "string", "jsonPath": ".spec.artifact.uri"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
    # Its name labels its merge Job's pods (kubetune.dev/loraadapter).
    rules: ClassVar = (name_fits_label("kubetune.dev/loraadapter"),)
