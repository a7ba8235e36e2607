"""FineTuneJob: one LoRA / QLoRA fine-tuning run (supervised or DPO), from base model and dataset to adapter."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import AfterValidator, Field
from pydantic.config import JsonDict

from kubetune.api.fields import Sha256, StorageUriStr
from kubetune.api.meta import (
    CONDITIONS_SCHEMA_EXTRA,
    DEFAULT_EMPTY,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    QUANTITY,
    ApiModel,
    Condition,
    Rule,
    SecretRef,
)
from kubetune.api.resource import Resource, name_fits_label

Method = Literal["qlora", "lora"]
DatasetFormat = Literal["auto", "alpaca", "chat", "prompt-completion", "text"]
Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]
MAX_NESTING = 32  # a core/v1 Affinity nests about 8 levels; deeper is no affinity, and breaks deep copies


def _nesting_depth(value: Any) -> int:
    """Depth of nested mappings and lists, counted without recursion: the point is to refuse
    documents too deep for recursive code (deep copies, JSON encoders) before any of it runs."""
    depth, level = 0, [v for v in [value] if isinstance(v, (dict, list))]
    while level and depth <= MAX_NESTING:  # past the limit, how much deeper does not matter
        depth += 1
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (dict, list))]
    return depth


def _shallow(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and _nesting_depth(value) > MAX_NESTING:
        raise ValueError(f"nested deeper than {MAX_NESTING} levels")
    return value


class BaseModelSource(ApiModel):
    uri: StorageUriStr = Field(description="Where the base model lives: s3://bucket/prefix, pvc://claim/path, or "
                               "hf://org/name (only with allowHubDownloads).")
    revision: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9._/-]+$",
                                 description="Pin: a hub revision, or the sha256 of the model's manifest.json "
                                 "for s3:// and pvc:// sources. Recorded in the adapter's lineage either way.")


class Dataset(ApiModel):
    uri: StorageUriStr = Field(description="A JSONL, JSON, Parquet or CSV file on s3:// or pvc://.")
    format: DatasetFormat = Field(default="auto", description="Record layout; auto detects it from the fields.")
    validation_split: float = Field(default=0.05, ge=0, lt=0.5,
                                    description="Fraction held out, seeded and deterministic, for evaluation; "
                                    "0 with validationUri.")
    sha256: Sha256 | None = Field(default=None, description="Refuse the dataset unless its bytes have this sha256.")
    on_overlong: Literal["truncate", "refuse"] = Field(
        default="truncate",
        description="Examples longer than maxSeqLength: truncate (counted in the report) or refuse.")
    completion_only_loss: bool = Field(default=True,
                                       description="Train on completions only (format text trains on everything).")
    validation_uri: StorageUriStr | None = Field(
        default=None, description="A hold-out file (or directory of parts) of uri's format, on s3:// or pvc://: "
        "evaluation reads it instead of a split of uri, which is then trained on whole (validationSplit 0).")
    validation_sha256: Sha256 | None = Field(default=None, description="Refuse the validationUri data unless its "
                                             "bytes have this sha256.")
    rules: ClassVar = (
        # Two hold-outs would make the evaluation's figures ambiguous; a split of 0 says in the spec
        # itself that the training file is not split.
        Rule("validationSplit", "validationUri is the hold-out: set validationSplit to 0 (uri is then not split)",
             "!has(self.validationUri) || self.validationSplit == 0.0",
             lambda s: s.validation_uri is None or s.validation_split == 0),
        Rule("validationSha256", "validationSha256 pins the data of validationUri: it needs validationUri",
             "!has(self.validationSha256) || has(self.validationUri)",
             lambda s: s.validation_sha256 is None or s.validation_uri is not None),
    )


# The DPO losses of TRL's DPOConfig that are a function of the chosen-rejected pair alone and need
# no further hyperparameter the spec does not carry (robust and exo_pair read label smoothing).
DpoLossType = Literal["sigmoid", "hinge", "ipo", "sigmoid_norm"]


class Dpo(ApiModel):
    beta: float = Field(default=0.1, gt=0, le=100, description="How far the policy may move from the reference "
                        "(the base with the adapter disabled): higher stays closer. For ipo, its tau.")
    loss_type: DpoLossType = Field(default="sigmoid", description="TRL's DPO loss: sigmoid (the DPO paper), hinge "
                                   "(SLiC), ipo, or sigmoid_norm (length-normalized log-ratios).")


class Objective(ApiModel):
    type: Literal["sft", "dpo"] = Field(default="sft", description=(
        "sft: supervised fine-tuning on completions. dpo: preference tuning (Direct Preference Optimization) on "
        "records of prompt, chosen and rejected (strings or conversations); the reference is the base model with "
        "the adapter disabled, so no second copy of the model is held."))
    dpo: Dpo | None = Field(default=None, description="DPO settings; defaults when type is dpo and this is unset.")
    rules: ClassVar = (
        Rule("dpo", "objective.dpo needs objective.type dpo",
             "self.type == 'dpo' || !has(self.dpo)", lambda s: s.type == "dpo" or s.dpo is None),
    )

    def dpo_settings(self) -> Dpo:
        return self.dpo or Dpo()


class Quantization(ApiModel):
    bits: Literal[4, 8] = Field(default=4, description="Storage precision of the frozen base; qlora needs 4.")
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description=(
        "Also quantize the quantization constants (QLoRA's numerics). The trainer expands them to fp32 once "
        "at load: 3 bytes per 64 weights more on the GPU, one dequantization fewer in every matmul."))
    compute_dtype: Literal["bfloat16", "float16"] = Field(default="bfloat16", description="Matmul dtype.")


class Lora(ApiModel):
    r: int = Field(default=16, ge=1, le=512, description="Rank of the low-rank update.")
    alpha: float = Field(default=32, gt=0, le=8192, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[ModuleName] = Field(default=["all-linear"], min_length=1, max_length=64,
                                             description="Module names to adapt, or [all-linear].")
    rules: ClassVar = (
        Rule("targetModules", "all-linear cannot be combined with module names",
             "!self.targetModules.exists(m, m == 'all-linear') || size(self.targetModules) == 1",
             lambda s: "all-linear" not in s.target_modules or len(s.target_modules) == 1),
    )


class Training(ApiModel):
    epochs: float = Field(default=1.0, gt=0, le=1000, description="Passes over the training split.")
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000,
                                  description="Optimizer steps; overrides epochs when set.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine")
    warmup_ratio: float = Field(default=0.03, ge=0, le=0.5, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000)
    max_seq_length: int = Field(default=2048, ge=32, le=131072, description="Tokens per training row.")
    packing: bool = Field(default=True, description="Pack short examples into full rows (no attention across them).")
    batch_size: int = Field(default=16, ge=1, le=65536,
                            description="Effective batch in rows per optimizer step, across all GPUs.")
    micro_batch_size: int | None = Field(
        default=None, ge=1, le=4096, description="Rows per forward pass per GPU; chosen from GPU memory when unset.")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto", description="Recompute activations to save memory: on every decoder layer, off none, "
        "auto as many of the first layers as the memory plan needs.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seeds data order, split and initialisation.")
    rules: ClassVar = (
        Rule("microBatchSize", "must not exceed batchSize",
             "!has(self.microBatchSize) || self.microBatchSize <= self.batchSize",
             lambda s: s.micro_batch_size is None or s.micro_batch_size <= s.batch_size),
    )


class Evaluation(ApiModel):
    exact_match: bool = Field(default=False,
                              description="Also generate answers for the hold-out prompts and score exact match "
                              "and JSON validity (structured tasks).")
    max_samples: int = Field(default=64, ge=1, le=100_000, description="Hold-out examples used for generation metrics.")
    max_new_tokens: int = Field(default=128, ge=1, le=8192)


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Resources(ApiModel):
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node; 0 trains on the CPU (lora only).")
    nodes: int = Field(default=1, ge=1, le=128, description="Nodes for multi-node training.")
    gpu_memory_gib: float | None = Field(
        default=None, alias="gpuMemoryGiB", gt=0, le=1024,
        description="GPU memory one process may use (GiB): the planner fits micro-batch and "
                    "checkpointing into it, e.g. 10 on a shared GPU; operator default when unset.")
    cpu: str | None = Field(default=None, pattern=QUANTITY, description="CPU request and limit per pod.")
    memory: str | None = Field(default=None, pattern=QUANTITY, description="Memory request and limit per pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    affinity: Annotated[dict[str, Any] | None, AfterValidator(_shallow)] = Field(
        default=None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
        description="A core/v1 Affinity, passed to the pod as is.")
    priority_class_name: str | None = Field(default=None, pattern=DNS1123_SUBDOMAIN, max_length=253)
    runtime_class_name: str | None = Field(default=None, pattern=DNS1123_SUBDOMAIN, max_length=253)
    rules: ClassVar = (
        Rule("gpus", "multi-node training needs at least one GPU per node",
             "self.nodes <= 1 || self.gpus >= 1", lambda s: s.nodes <= 1 or s.gpus >= 1),
    )


GgufType = Literal["f16", "q8_0", "q4_k_m"]


class Gguf(ApiModel):
    enabled: bool = Field(default=False, description="The LoraAdapter's merge Job also writes ARTIFACT/merged/gguf/: "
                          "the merged model in each of types, the adapter as a GGUF LoRA (llama.cpp --lora, Ollama "
                          "ADAPTER) and a Modelfile. Llama, Mistral and Qwen2 models; another architecture is "
                          "reported and the merged model published.")
    types: list[GgufType] = Field(default=["f16"], min_length=1, max_length=3,
                                  description="GGUF types of the merged model: f16, q8_0, q4_k_m (made from the f16 "
                                  "file by llama.cpp's quantizer, which the trainer image must have).")


class Output(ApiModel):
    uri: StorageUriStr = Field(description="Prefix the run writes under: s3://bucket/prefix or pvc://claim/path.")
    merge: bool = Field(default=True, description="The run's LoraAdapter gets the base model with the adapter merged "
                        "in (ARTIFACT/merged/) from its merge Job, once the training pods have given their GPUs back "
                        "(bf16 for a GPU run, fp32 for a CPU one).")
    gguf: Gguf = Field(default_factory=Gguf, json_schema_extra=DEFAULT_EMPTY,
                       description="GGUF files for llama.cpp and Ollama under ARTIFACT/merged/gguf/.")
    adapter_name: str | None = Field(default=None, pattern=DNS1123_SUBDOMAIN, max_length=63,
                                     description="Name of the LoraAdapter created on success (a re-run, or another "
                                     "job with the same name, adds version NAME-vN); the job's name if unset.")
    keep_checkpoints: int = Field(default=2, ge=1, le=100, description="Checkpoints kept; older ones are deleted.")
    rules: ClassVar = (
        Rule("uri", "output cannot be written to the hub: use s3:// or pvc://",
             "!self.uri.startsWith('hf://')", lambda s: not s.uri.startswith("hf://")),
    )


class Storage(ApiModel):
    secret_ref: SecretRef = Field(description="Secret with keys endpoint, accessKey, secretKey and optional region, "
                                  "secure (true/false) and caBundle (PEM).")


# http(s) only, and no user:password@ in it: credentials belong in the Secret, not in the spec.
MLFLOW_URI = r"^https?://[^\s/?#@]+(/[^\s?#@]*)?$"


class Mlflow(ApiModel):
    uri: str = Field(max_length=2048, pattern=MLFLOW_URI,
                     description="The MLflow tracking server, http:// or https:// (no credentials in it).")
    experiment: str = Field(min_length=1, max_length=500, pattern=r"^\S[^\r\n\t]*$",
                            description="Experiment the run is logged in; created if it does not exist.")
    secret_ref: SecretRef | None = Field(default=None, description=(
        "Secret with key MLFLOW_TRACKING_TOKEN, or keys MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD: "
        "the trainer's credentials for the server."))


class Tracking(ApiModel):
    mlflow: Mlflow = Field(description=(
        "Log the run to MLflow: the spec's training fields and the Trainer's arguments as params, each step's "
        "loss, learning rate and grad norm, the hold-out metrics, and tags naming the run's manifest and "
        "LoraAdapter. A resumed job continues its MLflow run. A server that cannot be reached never fails "
        "training: the trainer logs a warning, records the error in the run's manifest and goes on."))


class FineTuneJobSpec(ApiModel):
    base_model: BaseModelSource
    dataset: Dataset
    method: Method = Field(default="qlora", description="qlora: 4-bit frozen base on GPU; lora: bf16/fp32 base.")
    objective: Objective = Field(default_factory=Objective, json_schema_extra=DEFAULT_EMPTY,
                                 description="What the adapter is trained for: sft (the default) or dpo.")
    quantization: Quantization | None = Field(default=None, description="Base quantization; qlora uses NF4 when unset.")
    lora: Lora = Field(default_factory=Lora, json_schema_extra=DEFAULT_EMPTY)
    training: Training = Field(default_factory=Training, json_schema_extra=DEFAULT_EMPTY)
    evaluation: Evaluation = Field(default_factory=Evaluation, json_schema_extra=DEFAULT_EMPTY)
    resources: Resources = Field(default_factory=Resources, json_schema_extra=DEFAULT_EMPTY)
    queue_name: str | None = Field(default=None, pattern=DNS1123_LABEL, max_length=63,
                                   description="Kueue LocalQueue; the Job is created suspended for Kueue to admit.")
    workload_priority_class_name: str | None = Field(
        default=None, pattern=DNS1123_SUBDOMAIN, max_length=63,  # a label value: 63 characters at most
        description="Kueue WorkloadPriorityClass of the run (label kueue.x-k8s.io/priority-class on the Job): "
        "decides which queued run Kueue admits first and which it preempts; needs queueName.")
    output: Output
    storage: Storage | None = Field(default=None, description="Object-store access, required by any s3:// URI.")
    tracking: Tracking | None = Field(default=None, description="Experiment tracking (MLflow); off when unset.")
    allow_hub_downloads: bool = Field(default=False, description="Allow hf:// sources (the pod then needs egress).")
    suspend: bool = Field(default=False, description="Stop the pods (checkpointing first); false resumes.")
    backoff_limit: int = Field(default=3, ge=0, le=100, description="Failed attempts retried; preemptions are free.")
    checkpoint_every_steps: int = Field(default=100, ge=1, le=1_000_000)
    trainer_image: str | None = Field(default=None, max_length=512, pattern=r"^[^\s]+$",
                                      description="Overrides the operator's trainer image.")

    rules: ClassVar = (
        Rule("quantization.bits", "method qlora needs 4-bit quantization",
             "self.method != 'qlora' || !has(self.quantization) || self.quantization.bits == 4",
             lambda s: s.method != "qlora" or s.quantization is None or s.quantization.bits == 4),
        Rule("quantization", "method lora trains an unquantized base: remove quantization or use method qlora",
             "self.method != 'lora' || !has(self.quantization)",
             lambda s: s.method != "lora" or s.quantization is None),
        Rule("resources.gpus", "method qlora needs at least one GPU (4-bit kernels are CUDA-only)",
             "self.method != 'qlora' || self.resources.gpus >= 1",
             lambda s: s.method != "qlora" or s.resources.gpus >= 1),
        Rule("baseModel.uri", "hf:// sources are refused unless allowHubDownloads is true",
             "!self.baseModel.uri.startsWith('hf://') || self.allowHubDownloads",
             lambda s: not s.base_model.uri.startswith("hf://") or s.allow_hub_downloads),
        Rule("dataset.uri", "hf:// sources are refused unless allowHubDownloads is true",
             "!self.dataset.uri.startsWith('hf://') || self.allowHubDownloads",
             lambda s: not s.dataset.uri.startswith("hf://") or s.allow_hub_downloads),
        Rule("dataset.validationUri", "hf:// sources are refused unless allowHubDownloads is true",
             "!has(self.dataset.validationUri) || !self.dataset.validationUri.startsWith('hf://') || "
             "self.allowHubDownloads",
             lambda s: not (s.dataset.validation_uri or "").startswith("hf://") or s.allow_hub_downloads),
        Rule("storage.secretRef", "s3:// URIs need storage.secretRef",
             "!(self.baseModel.uri.startsWith('s3://') || self.dataset.uri.startsWith('s3://') || "
             "(has(self.dataset.validationUri) && self.dataset.validationUri.startsWith('s3://')) || "
             "self.output.uri.startsWith('s3://')) || has(self.storage)",
             lambda s: s.storage is not None or not any(
                 u.startswith("s3://") for u in (s.base_model.uri, s.dataset.uri, s.dataset.validation_uri or "",
                                                 s.output.uri))),
        Rule("dataset.validationSplit",
             "evaluation.exactMatch needs a hold-out (validationSplit > 0, or validationUri)",
             "!self.evaluation.exactMatch || self.dataset.validationSplit > 0.0 || "
             "has(self.dataset.validationUri)",
             lambda s: not s.evaluation.exact_match or s.dataset.validation_split > 0
             or s.dataset.validation_uri is not None),
        Rule("dataset.format", "objective dpo reads prompt/chosen/rejected records: dataset.format must be auto",
             "self.objective.type != 'dpo' || self.dataset.format == 'auto'",
             lambda s: s.objective.type != "dpo" or s.dataset.format == "auto"),
        Rule("evaluation.exactMatch", "evaluation.exactMatch is for objective sft; dpo reports reward accuracy",
             "self.objective.type != 'dpo' || !self.evaluation.exactMatch",
             lambda s: s.objective.type != "dpo" or not s.evaluation.exact_match),
        Rule("workloadPriorityClassName", "workloadPriorityClassName is a Kueue priority: it needs queueName",
             "!has(self.workloadPriorityClassName) || has(self.queueName)",
             lambda s: s.workload_priority_class_name is None or s.queue_name is not None),
    )

    def effective_quantization(self) -> Quantization | None:
        if self.method == "qlora":
            return self.quantization or Quantization()
        return None


def changed_immutable_fields(old: FineTuneJobSpec, new: FineTuneJobSpec) -> list[str]:
    """Training fields that differ once defaults are applied: the Python twin of the CRD's transition rule."""
    before, after = (s.model_dump(by_alias=True, mode="json") for s in (old, new))
    return [f for f in IMMUTABLE_AFTER_START if before.get(f) != after.get(f)]


# Fields that decide what is trained; changing them after the first pod started would make the
# checkpoints and the adapter describe a different run than the spec.
IMMUTABLE_AFTER_START = ("baseModel", "dataset", "method", "objective", "quantization", "lora", "training", "output")


class Progress(ApiModel):
    stage: str | None = Field(default=None, max_length=32,
                              description="What the trainer is doing: loading, evaluating, training, publishing, done.")
    step: int = Field(default=0, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    percent: int = Field(default=0, ge=0, le=100)
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = Field(default=None, ge=0)
    updated_at: str | None = None


class AdapterRef(ApiModel):
    name: str
    uri: str | None = None


class CountedPod(ApiModel):
    uid: str = Field(max_length=128)
    outcome: Literal["Ran", "Failed", "Preempted", "Succeeded"]


class FineTuneJobStatus(ApiModel):
    phase: Phase = "Pending"
    message: str = Field(default="", max_length=32768)
    observed_generation: int | None = None
    # meta's constant is typed by inference (dict[str, Sequence[str]]), not as pydantic's JsonDict
    conditions: list[Condition] = Field(default_factory=list,
                                        json_schema_extra=cast(JsonDict, CONDITIONS_SCHEMA_EXTRA))
    progress: Progress | None = None
    attempts: int = Field(default=0, ge=0, description="Pods that ran (failed, preempted, succeeded or running), "
                          "each counted once; never decreases.")
    failures: int = Field(default=0, ge=0, description="Attempts that counted against backoffLimit.")
    preemptions: int = Field(default=0, ge=0)
    counted_pods: list[CountedPod] = Field(
        default_factory=list, max_length=1000,
        description="Existing pods already counted in attempts, failures and preemptions: the counters only grow.")
    job_name: str | None = None
    last_checkpoint: str | None = None
    adapter_ref: AdapterRef | None = None
    start_time: str | None = None
    completion_time: str | None = None


class FineTuneJob(Resource[FineTuneJobSpec, FineTuneJobStatus]):
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    crd_plural: ClassVar[str] = "finetunejobs"
    crd_singular: ClassVar[str] = "finetunejob"
    crd_short_names: ClassVar[tuple[str, ...]] = ("ftj",)
    crd_printer_columns: ClassVar[tuple[dict, ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
         "description": "Percent of optimizer steps done"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
        {"name": "Adapter", "type": "string", "jsonPath": ".status.adapterRef.name"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
    rules: ClassVar = (name_fits_label("kubetune.dev/finetunejob"),)
    crd_root_rules: ClassVar[tuple[dict, ...]] = (
        {"rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || ("
                 + " && ".join(f"(has(self.spec.{f}) == has(oldSelf.spec.{f}) && (!has(self.spec.{f}) || "
                               f"self.spec.{f} == oldSelf.spec.{f}))" for f in IMMUTABLE_AFTER_START) + ")",
         "message": "training fields (" + ", ".join(IMMUTABLE_AFTER_START) + ") are immutable once the job has "
                    "started; create a new FineTuneJob instead",
         "reason": "FieldValueForbidden"},
    )
