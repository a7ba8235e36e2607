"""The fine-tuning recipe: one readable pass from spec to published adapter.

Features, and the spec fields that drive them:
- base model from pvc://, s3:// (manifest-verified download, cached) or hf:// (allowHubDownloads);
- datasets in JSONL/JSON/Parquet/CSV, a file or a directory of parts, formats
  alpaca/chat/prompt-completion/text/auto (dataset.format), completion-only loss
  (dataset.completionOnlyLoss), seeded hold-out (dataset.validationSplit) or a hold-out file
  (dataset.validationUri), overlong policy (dataset.onOverlong); prepared once per node and cached
  (kubetune_trainer.data);
- TRL's SFTTrainer runs the training (kubetune_trainer.training); objective dpo: TRL's DPOTrainer on
  prompt/chosen/rejected pairs, the reference being the base with the adapter disabled
  (kubetune_trainer.preference, kubetune_trainer.dpo), hold-out reward accuracy and margin;
- QLoRA (4-bit NF4, double quantization, bf16 compute) or LoRA (method, quantization, lora.*);
- packing without cross-example attention (training.packing);
- checkpoints to the output location every checkpointEverySteps, resume from the newest complete
  one, SIGTERM -> checkpoint and exit EXIT_PREEMPTED;
- hold-out loss/perplexity before and after, generation metrics (evaluation.*);
- adapter and manifest.json written last, with lineage. The merged model (output.merge) and the
  GGUF files (output.gguf) are made by the LoraAdapter's merge Job once this pod has given its GPUs
  back.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from kubetune.api.uris import parse_uri
from kubetune.contract import HISTORY_FILE
from kubetune.planning import RunPlan
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import Location, open_location
from kubetune.storage.manifest import MANIFEST, Manifest, describe_dir, publish
from kubetune_trainer import distributed
from kubetune_trainer.checkpoints import CheckpointStore, check_resumable
from kubetune_trainer.data import DataFile, PreparedData, prepare
from kubetune_trainer.dpo import build_dpo_trainer, preference_metrics
from kubetune_trainer.evaluation import generation_metrics, holdout_loss
from kubetune_trainer.history import TrainingHistory, history_rows, summary, write_history, write_tensorboard
from kubetune_trainer.modeling import Placement, attach_lora, load_base, load_tokenizer
from kubetune_trainer.preference import PreparedPreferences, prepare_preferences
from kubetune_trainer.progress import Channel, FileChannel, PodAnnotationChannel, ProgressReport, ProgressReporter
from kubetune_trainer.runspec import RunSpec
from kubetune_trainer.sources import ModelSource, resolve_dataset, resolve_model
from kubetune_trainer.tracking import tracked_run
from kubetune_trainer.training import (
    AlreadyTrained,
    PreemptionFlag,
    build_trainer,
    coverage,
    mean_train_loss,
    peak_memory_gib,
    plan_batches,
    reset_peak_memory,
)

log = logging.getLogger(__name__)
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "gguf", "kubetune")


@dataclass
class RunResult:
    preempted: bool
    manifest_uri: str | None = None
    manifest_sha256: str | None = None
    metrics: dict = field(default_factory=dict)


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """The installed versions of these distributions (LIBRARIES: what a run's manifest records);
    one that is not installed is left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


class FineTuneRecipe:
    def __init__(self, runspec: RunSpec, *, preemption: PreemptionFlag | None = None,
                 ranks: distributed.Ranks | None = None):
        ranks = ranks if ranks is not None else distributed.Ranks()
        self.spec, self.run_info, self.ranks = runspec.spec, runspec.run, ranks
        self.dpo = self.spec.objective.type == "dpo"
        self.work = Path(self.run_info.work_dir)
        self.preemption = preemption or PreemptionFlag()
        channels: list[Channel] = []
        if ranks.is_main:  # one writer of progress for the whole group
            channels = [c for c in (PodAnnotationChannel.from_env(),) if c]
            if self.run_info.progress_file:
                channels.append(FileChannel(Path(self.run_info.progress_file)))
        self.reporter = ProgressReporter(channels, self.run_info.progress_interval_s)

    # -- setup -------------------------------------------------------------------------------
    def _storage(self) -> StorageConfig | None:
        uris = (self.spec.base_model.uri, self.spec.dataset.uri, self.spec.dataset.validation_uri or "",
                self.run_info.output_uri)
        return StorageConfig.from_env() if any(u.startswith("s3://") for u in uris) else None

    def _setup_sources(self, storage) -> tuple[ModelSource, Path, DataFile | None]:
        """Downloaded once per node (pod); every process then uses the same paths.
        The third: the hold-out file (dataset.validationUri), when the spec has one."""
        sources = None
        if self.ranks.is_local_main:
            volumes, cache = Path(self.run_info.volume_root), Path(self.run_info.cache_dir)
            model = resolve_model(self.spec.base_model, storage=storage, volume_root=volumes, cache_dir=cache,
                                  allow_hub=self.spec.allow_hub_downloads)
            held = self.spec.dataset.validation_uri
            sources = (model, resolve_dataset(self.spec.dataset.uri, storage=storage, volume_root=volumes,
                                              cache_dir=cache),
                       DataFile(resolve_dataset(held, storage=storage, volume_root=volumes, cache_dir=cache), held)
                       if held else None)
        return distributed.from_main(self.ranks, sources)

    def _setup_model(self, source: ModelSource, placement: Placement, plan: RunPlan):
        model = load_base(source.path, self.spec, placement, gradient_checkpointing=plan.gradient_checkpointing,
                          checkpointed_layers=plan.checkpointed_layers, sharded=plan.sharded)
        # DPOTrainer attaches the adapter itself
        return model if self.dpo else attach_lora(model, self.spec, sharded=plan.sharded)

    def _prepare(self, data_path: Path, validation: DataFile | None, tokenizer) -> PreparedData | PreparedPreferences:
        if self.dpo:
            return prepare_preferences(data_path, self.spec.dataset.uri, self.spec.dataset, self.spec.training,
                                       tokenizer, validation)
        return prepare(data_path, self.spec.dataset.uri, self.spec.dataset, self.spec.training, tokenizer,
                       validation=validation, cache_dir=Path(self.run_info.cache_dir) / "datasets", ranks=self.ranks)

    def _build(self, model, data, tokenizer, plan: RunPlan, callback_kwargs: dict):
        if self.dpo:
            # Checkpoints report no hold-out loss: DPO's hold-out figures are the rewards, measured at the end.
            return build_dpo_trainer(model, self.spec, data, tokenizer=tokenizer, plan=plan, work_dir=self.work,
                                     callback_kwargs={**callback_kwargs, "evaluate": dict})
        return build_trainer(model, self.spec, data.rows, tokenizer=tokenizer, plan=plan, work_dir=self.work,
                             callback_kwargs=callback_kwargs)

    def _evaluate(self, model, tokenizer, data: PreparedData | PreparedPreferences, plan: RunPlan, *,
                  generate: bool, everywhere: bool = False, trainer=None) -> dict:
        """Every rank shares the hold-out loss, at the plan's micro-batch (planned for it); generation
        and DPO's figures run on rank 0 alone unless everywhere (the model is sharded, so every rank
        takes part). trainer: DPO's, which holds the hold-out pairs as TRL tokenized them."""
        takes_part = self.ranks.is_main or everywhere
        if self.dpo:
            return preference_metrics(model, trainer.eval_dataset or [], pad_id=tokenizer.pad_token_id,
                                      beta=self.spec.objective.dpo_settings().beta,
                                      max_length=self.spec.training.max_seq_length) if takes_part else {}
        metrics = holdout_loss(model, data.validation, tokenizer.pad_token_id, plan.micro_batch_size, self.ranks)
        if generate and self.spec.evaluation.exact_match and takes_part:
            metrics |= generation_metrics(model, tokenizer, data.validation,
                                          max_samples=self.spec.evaluation.max_samples,
                                          max_new_tokens=self.spec.evaluation.max_new_tokens,
                                          batch_size=plan.micro_batch_size)
        return metrics

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        with tracked_run(self.spec, self.run_info, main=self.ranks.is_main) as self.tracking:
            return self._run()

    def _run(self) -> RunResult:
        self.reporter.report(ProgressReport("loading"), force=True)
        storage = self._storage()
        output = open_location(parse_uri(self.run_info.output_uri), storage=storage,
                               volume_root=Path(self.run_info.volume_root))
        if self.ranks.is_main:
            output.ensure_ready()
        source, data_path, validation = self._setup_sources(storage)
        tokenizer = load_tokenizer(source.path)
        data = self._prepare(data_path, validation, tokenizer)
        log.info("dataset: %s", data.report.to_dict())
        placement = Placement.detect()
        plan = plan_batches(self.spec, source.path, placement.device == "cuda", self.ranks.world_size)
        # Seed before LoRA's random init: a rerun of the same spec must start from the same weights.
        set_seed(self.spec.training.seed)
        model = self._setup_model(source, placement, plan)

        self.reporter.report(ProgressReport("evaluating"), force=True)
        # LoRA starts as a no-op: this is the base. DPO's adapter is attached by its trainer, below.
        baseline = {} if self.dpo else self._evaluate(model, tokenizer, data, plan, generate=True)
        store = CheckpointStore(output, self.spec.output.keep_checkpoints)
        self.work.mkdir(parents=True, exist_ok=True)
        resume = store.pull_latest(self.work / "checkpoints") if self.ranks.is_local_main else None
        resume = distributed.from_main(self.ranks, resume)
        if resume:
            check_resumable(resume[0], sharded=plan.sharded)
            log.info("resuming from %s", resume[1])
        history = TrainingHistory(lambda: loop.counter.loss_tokens, self.ranks)
        # The Trainer's model: under FSDP the wrapper (set once training starts) that gathers each layer.
        trainer, loop = self._build(
            model, data, tokenizer, plan,
            {"reporter": self.reporter, "store": store, "preemption": self.preemption,
             "evaluate": history.recording(lambda: holdout_loss(trainer.model, data.validation,
                                                                tokenizer.pad_token_id, plan.micro_batch_size,
                                                                self.ranks)),
             "ranks": self.ranks})
        if self.dpo:
            baseline = self._evaluate(trainer.model, tokenizer, data, plan, generate=True, trainer=trainer)
        trainer.add_callback(history)
        if self.tracking.callback:
            trainer.add_callback(self.tracking.callback)
        loop.last_checkpoint = resume[1] if resume else None
        self.preemption.install()
        reset_peak_memory()
        try:
            trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
        except AlreadyTrained as done:
            log.info("%s: training had ended; evaluating and publishing again", done)
        seen = coverage(self.ranks, loop.counter)
        if loop.stopped_for_preemption:
            return RunResult(preempted=True)

        self.reporter.report(ProgressReport("evaluating", trainer.state.global_step, trainer.state.max_steps,
                                            loss=loop.last_loss), force=True)
        final = self._evaluate(trainer.model, tokenizer, data, plan, generate=True, everywhere=plan.sharded,
                               trainer=trainer)
        final_dir = self.work / "final"
        self._save_adapter(trainer, tokenizer, final_dir / "adapter", sharded=plan.sharded)
        if not self.ranks.is_main:
            return RunResult(preempted=False)  # rank 0 publishes
        train_metrics = {"steps": trainer.state.global_step, "trainLoss": round(mean_train_loss(trainer.state), 6),
                         "tokensPerSecond": loop.tokens_per_second, "peakGpuMemoryGiB": peak_memory_gib(),
                         "microBatchSize": plan.micro_batch_size,
                         "gradientAccumulationSteps": plan.gradient_accumulation_steps,
                         "gradientCheckpointing": plan.gradient_checkpointing,
                         "checkpointedLayers": plan.checkpointed_layers, "sharded": plan.sharded,
                         "rows": data.report.rows, **seen}
        rows = history_rows(trainer.state.log_history, final.get("evalLoss"))
        write_history(final_dir / HISTORY_FILE, rows)  # published with the run, listed in its manifest
        write_tensorboard(rows, final_dir)
        train_metrics |= summary(rows, data.report.tokens)
        self.reporter.report(ProgressReport("publishing", trainer.state.global_step, trainer.state.max_steps,
                                            loss=loop.last_loss, evalLoss=final.get("evalLoss")), force=True)
        published = self._publish(output, final_dir, source, data,
                                  {"baseline": baseline, "final": final, "train": train_metrics})
        self.tracking.publish(manifest_uri=published.manifest_uri or "", step=trainer.state.global_step, rows=rows,
                              adapter_name=self.spec.output.adapter_name or self.run_info.job_name,
                              metrics={"baseline": baseline, "final": final})
        self.reporter.report(ProgressReport("done", trainer.state.global_step, trainer.state.max_steps,
                                            loss=loop.last_loss, evalLoss=final.get("evalLoss"),
                                            lastCheckpoint=loop.last_checkpoint), force=True)
        return published

    def _save_adapter(self, trainer, tokenizer, adapter_dir: Path, *, sharded: bool) -> None:
        """Rank 0 writes; sharded, every rank first hands over its part of the adapter."""
        if self.ranks.is_main:
            shutil.rmtree(adapter_dir.parent, ignore_errors=True)
        if sharded:
            trainer.save_model(str(adapter_dir))
        elif self.ranks.is_main:
            trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
        if self.ranks.is_main:
            tokenizer.save_pretrained(adapter_dir)

    def _publish(self, output: Location, final_dir: Path, source: ModelSource,
                 data: PreparedData | PreparedPreferences, metrics: dict) -> RunResult:
        base = json.loads((source.path / "config.json").read_text())
        manifest = Manifest("RunManifest", describe_dir(final_dir), {
            "metrics": metrics,
            "data": data.report.to_dict(),
            "lineage": {
                "fineTuneJob": f"{self.run_info.namespace}/{self.run_info.job_name}",
                "attempt": self.run_info.attempt,
                "baseModelUri": source.uri, "baseModelRevision": source.revision,
                "datasetUri": self.spec.dataset.uri, "datasetSha256": data.report.sha256,
                "validationDatasetUri": data.report.validation_file,
                "validationDatasetSha256": data.report.validation_sha256,
                "trainerImage": self.run_info.image, "libraries": library_versions(),
                "objective": self.spec.objective.type,
            },
            "spec": self.spec.model_dump(by_alias=True, mode="json", exclude_none=True),
            # What a serving engine's compatibility turns on (the operator's ServingCompatible condition).
            "model": {"architectures": base.get("architectures"), "modelType": base.get("model_type"),
                      "torchDtype": base.get("dtype") or base.get("torch_dtype")},  # renamed in transformers 5
            "tracking": self.tracking.record(),
            "layout": {"adapter": "adapter"},
        })
        digest = publish(output, manifest, final_dir)
        log.info("published %s/%s (sha256 %s, %d files)", output.uri, MANIFEST, digest, len(manifest.files))
        return RunResult(False, f"{output.uri}/{MANIFEST}", digest, metrics)
