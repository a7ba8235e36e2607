"""FineTuneJob <-> fine_tuning.job: pure functions from one shape to the other.

A job's id is the FineTuneJob's name, so jobs applied with kubectl show up in the API too; what the
API alone knows (the catalog name, the file id, the suffix, the learning-rate multiplier, a cancel)
rides on the FineTuneJob as annotations.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from kubetune.api import API_VERSION
from kubetune.api.finetunejob import Dpo, Training
from kubetune.api.meta import parse_rfc3339
from kubetune.api.validation import validate_object
from kubetune.controller.status import CANCELLED_ANNOTATION
from kubetune.openai_api.catalog import CatalogEntry
from kubetune.openai_api.errors import OpenAIError
from kubetune.openai_api.models import (
    Checkpoint,
    DpoHyperparameters,
    EventLevel,
    FineTuningJob,
    JobCreate,
    JobError,
    JobEvent,
    JobHyperparameters,
    JobStatus,
)

PREFIX = "openai.kubetune.dev/"
A_MODEL, A_FILE, A_VALIDATION_FILE, A_SUFFIX, A_LR = (
    PREFIX + k for k in ("model", "training-file", "validation-file", "suffix", "lr-multiplier"))
A_CANCELLED = CANCELLED_ANNOTATION  # the operator's own: it fails the job as Cancelled once its pods stopped
CREATED_BY = {"app.kubernetes.io/created-by": "kubetune-openai-api"}
RESULT_FILE_PREFIX = "file-result-"
T = TypeVar("T")

# Request fields and the spec fields they become, to name the caller's field when a spec rule fails.
PARAMS = {"spec.training.epochs": "hyperparameters.n_epochs", "spec.training.batchSize": "hyperparameters.batch_size",
          "spec.training.microBatchSize": "hyperparameters.batch_size",
          "spec.training.learningRate": "hyperparameters.learning_rate_multiplier",
          "spec.training.seed": "seed", "spec.output.adapterName": "suffix",
          "spec.objective.dpo.beta": "method.dpo.hyperparameters.beta"}


@dataclass(frozen=True)
class UploadedFile:
    """A stored upload a job names: the URI the FineTuneJob reads and the format its upload check
    detected (None for files stored before formats were recorded)."""
    id: str
    uri: str
    format: str | None = None


@dataclass(frozen=True)
class Placement:
    """Where the server puts things, from its own configuration."""
    output_uri: str  # prefix runs write under
    storage_secret: str  # the Secret in the caller's namespace with the object store's credentials


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def adapter_name(model: str, suffix: str | None, job_id: str) -> str:
    """A DNS-1123 name that says what it is, like OpenAI's `ft:model:suffix:id`."""
    parts = [re.sub(r"[^a-z0-9-]+", "-", p.lower()).strip("-") for p in ("ft", model, suffix or "", job_id[-8:])]
    return "-".join(p for p in parts if p)[:253]


def _check_file_fits(method: str, file: UploadedFile, param: str) -> None:
    """Uploads are checked before any job names them, so the file's detected format is matched to
    the method here: a dpo job needs preference pairs, a supervised one anything but."""
    if file.format is None:
        return  # stored before formats were recorded: the trainer's own check decides
    preference = file.format.startswith("preference")
    if method == "dpo" and not preference:
        raise OpenAIError(400, f"{param} {file.id!r} is a {file.format} dataset; method dpo needs "
                          "preference pairs (prompt, chosen, rejected)", param=param, code=f"invalid_{param}")
    if method == "supervised" and preference:
        raise OpenAIError(400, f"{param} {file.id!r} holds preference pairs; use method dpo, or a "
                          "supervised dataset", param=param, code=f"invalid_{param}")


def _dataset(method: str, training: UploadedFile, validation: UploadedFile | None) -> dict[str, Any]:
    """spec.dataset: the training file, and the validation file as the hold-out in place of a split
    of the training file (the catalog's validationSplit is then 0, as the spec requires)."""
    _check_file_fits(method, training, "training_file")
    if validation is None:
        return {"uri": training.uri}
    _check_file_fits(method, validation, "validation_file")
    if None not in (training.format, validation.format) and validation.format != training.format:
        # The trainer refuses it too; here it is a 400 before anything is created.
        raise OpenAIError(400, f"validation_file {validation.id!r} is a {validation.format} dataset but "
                          f"training_file {training.id!r} is {training.format}; a validation file must have the "
                          "training file's format", param="validation_file", code="invalid_validation_file")
    return {"uri": training.uri, "validationUri": validation.uri, "validationSplit": 0.0}


def build_job(request: JobCreate, entry: CatalogEntry, namespace: str, job_id: str, training_file: UploadedFile,
              placement: Placement, validation: UploadedFile | None = None) -> dict[str, Any]:
    """The FineTuneJob a create request asks for, validated by the same models the operator uses;
    a request the operator would refuse is a 400 here, before anything is created.
    training_file, validation: the stored uploads request.training_file and request.validation_file name."""
    method = request.method.type if request.method else "supervised"
    if method not in ("supervised", "dpo"):
        raise OpenAIError(400, f"method {method!r} is not available on this cluster; use 'supervised' or 'dpo'",
                          param="method.type", code="unsupported")
    dataset = _dataset(method, training_file, validation)
    hyper = request.hyperparameters
    settings = request.method and (request.method.supervised if method == "supervised" else request.method.dpo)
    if settings:
        if hyper is not None:
            raise OpenAIError(400, f"give hyperparameters either at the top level or in method.{method}, not both",
                              param="hyperparameters")
        hyper = settings.hyperparameters
    objective: dict[str, Any] = {"type": "dpo"} if method == "dpo" else {}
    # only method.dpo's hyperparameters carry a beta; the top-level ones never do
    if method == "dpo" and isinstance(hyper, DpoHyperparameters) and hyper.beta != "auto":
        objective["dpo"] = {"beta": float(hyper.beta)}
    defaults = copy.deepcopy(entry.defaults)
    training: dict[str, Any] = {}
    multiplier = 1.0
    if hyper is not None:
        if hyper.n_epochs != "auto":
            training["epochs"] = float(hyper.n_epochs)
            (defaults.get("training") or {}).pop("maxSteps", None)  # an explicit epoch count beats a step cap
        if hyper.batch_size != "auto":
            training["batchSize"] = hyper.batch_size
        if hyper.learning_rate_multiplier != "auto":
            multiplier = hyper.learning_rate_multiplier
            base = (defaults.get("training") or {}).get("learningRate", Training().learning_rate)
            training["learningRate"] = float(base) * multiplier
    if request.seed is not None:
        training["seed"] = request.seed
    spec = _merge(defaults, {
        "baseModel": entry.base_model.model_dump(by_alias=True, exclude_none=True),
        "dataset": dataset,
        "training": training,
        **({"objective": objective} if objective else {}),
        "output": {"uri": placement.output_uri, "adapterName": adapter_name(request.model, request.suffix, job_id)},
        "storage": {"secretRef": {"name": placement.storage_secret}},
    })
    annotations = {A_MODEL: request.model, A_FILE: request.training_file, A_LR: repr(multiplier)}
    if validation is not None:
        annotations[A_VALIDATION_FILE] = validation.id
    if request.suffix:
        annotations[A_SUFFIX] = request.suffix
    doc = {"apiVersion": API_VERSION, "kind": "FineTuneJob",
           "metadata": {"name": job_id, "namespace": namespace, "labels": dict(CREATED_BY),
                        "annotations": annotations},
           "spec": spec}
    _, problems = validate_object(doc)
    if problems:
        message = "; ".join(f"{p.path}: {p.message}" for p in problems)
        raise OpenAIError(400, f"the job for model {request.model!r} would be invalid: {message}",
                          param=PARAMS.get(problems[0].path), code="invalid_job")
    return doc


def epoch_seconds(timestamp: str | None) -> int | None:
    if not timestamp:
        return None
    return int(parse_rfc3339(timestamp).timestamp())


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def job_status(ftj: dict) -> JobStatus:
    status = ftj.get("status") or {}
    phase = status.get("phase")
    annotations = ftj["metadata"].get("annotations") or {}
    if phase == "Succeeded":
        return "succeeded"
    if phase == "Failed":
        return "cancelled" if _condition(status, "Failed").get("reason") == "Cancelled" else "failed"
    if A_CANCELLED in annotations:
        return "cancelled"
    if phase == "Running":
        return "running"
    if phase in ("Queued", "Suspended"):
        return "queued"
    if _condition(status, "Validated").get("status") != "True":
        return "validating_files"
    return "queued"


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def job_object(ftj: dict, trained_tokens: int | None = None) -> FineTuningJob:
    """The fine_tuning.job for a FineTuneJob; `trained_tokens` comes from the run's manifest."""
    meta, spec, status = ftj["metadata"], ftj.get("spec") or {}, ftj.get("status") or {}
    annotations = meta.get("annotations") or {}
    training = spec.get("training") or {}
    defaults = Training()
    state = job_status(ftj)
    error = None
    if state == "failed":
        failed = _condition(status, "Failed")
        error = JobError(code=failed.get("reason") or "failed",
                         message=status.get("message") or failed.get("message", ""))
    progress = status.get("progress") or {}
    eta = progress.get("etaSeconds")
    updated = epoch_seconds(progress.get("updatedAt"))
    hyper = JobHyperparameters(n_epochs=_number(training.get("epochs", defaults.epochs)),
                               batch_size=training.get("batchSize", defaults.batch_size),
                               learning_rate_multiplier=float(annotations.get(A_LR, 1.0)))
    objective = spec.get("objective") or {}
    if objective.get("type") == "dpo":
        beta = (objective.get("dpo") or {}).get("beta", Dpo().beta)
        method = {"type": "dpo", "dpo": {"hyperparameters": hyper.model_dump() | {"beta": beta}}}
    else:
        method = {"type": "supervised", "supervised": {"hyperparameters": hyper.model_dump()}}
    return FineTuningJob(
        id=meta["name"], created_at=epoch_seconds(meta.get("creationTimestamp")) or 0, error=error,
        fine_tuned_model=(status.get("adapterRef") or {}).get("name") if state == "succeeded" else None,
        finished_at=epoch_seconds(status.get("completionTime")), hyperparameters=hyper,
        model=annotations.get(A_MODEL) or (spec.get("baseModel") or {}).get("uri", ""),
        organization_id=meta["namespace"],
        result_files=[RESULT_FILE_PREFIX + meta["name"]] if state == "succeeded" else [],
        seed=training.get("seed", defaults.seed), status=state, trained_tokens=trained_tokens,
        training_file=annotations.get(A_FILE) or (spec.get("dataset") or {}).get("uri", ""),
        validation_file=annotations.get(A_VALIDATION_FILE) or (spec.get("dataset") or {}).get("validationUri"),
        estimated_finish=updated + eta if state == "running" and updated and eta is not None else None,
        method=method,
        user_provided_suffix=annotations.get(A_SUFFIX))


def events_of(ftj: dict, kube_events: Iterable[dict]) -> list[JobEvent]:
    """The job's Kubernetes events plus its latest progress as a metrics event, newest first."""
    name = ftj["metadata"]["name"]
    out = []
    for event in kube_events:
        involved = event.get("involvedObject") or {}
        if involved.get("kind") != "FineTuneJob" or involved.get("name") != name:
            continue
        when = (event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
                or event["metadata"].get("creationTimestamp"))
        warning = event.get("type") == "Warning"
        level: EventLevel = ("error" if warning and "-> Failed" in (event.get("message") or "")
                             else ("warn" if warning else "info"))
        out.append(JobEvent(id=f"ftevent-{event['metadata'].get('uid') or event['metadata']['name']}",
                            created_at=epoch_seconds(when) or 0, level=level,
                            message=f"{event.get('reason', '')}: {event.get('message', '')}".strip(": ")))
    status = ftj.get("status") or {}
    state = job_status(ftj)
    if state in ("succeeded", "failed", "cancelled") and status.get("completionTime"):
        # From the status, the one record of the outcome: the operator's Kubernetes Events are
        # posted in the background and best-effort (Kopf drops one it fails to post).
        outcome = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled",
                   "failed": f"The job failed: {status.get('message', '')}".rstrip(": ")}[state]
        out.append(JobEvent(id=f"ftevent-{name}-{state}", created_at=epoch_seconds(status["completionTime"]) or 0,
                            level="error" if state == "failed" else "info", message=outcome))
    progress = status.get("progress") or {}
    if progress.get("step"):
        step, total = progress["step"], progress.get("totalSteps")
        data = {"step": step, "total_steps": total, "train_loss": progress.get("loss"),
                "valid_loss": progress.get("evalLoss"), "epoch": progress.get("epoch"),
                "tokens_per_second": progress.get("tokensPerSecond")}
        loss = f": training loss={progress['loss']:.4f}" if progress.get("loss") is not None else ""
        out.append(JobEvent(id=f"ftevent-{name}-step-{step}", type="metrics", level="info", data=data,
                            created_at=epoch_seconds(progress.get("updatedAt")) or 0,
                            message=f"Step {step}/{total or '?'}{loss}"))
    return sorted(out, key=lambda e: (e.created_at, e.type == "metrics", e.id), reverse=True)


def checkpoints_of(job_id: str, found: Iterable[tuple[int, str, str]]) -> list[Checkpoint]:
    """Checkpoint objects, newest first, from (step, createdAt, URI) of the run's complete checkpoints."""
    return [Checkpoint(id=f"ftckpt-{job_id}-{step}", created_at=epoch_seconds(created) or 0,
                       fine_tuned_model_checkpoint=uri, fine_tuning_job_id=job_id, metrics={"step": step},
                       step_number=step)
            for step, created, uri in sorted(found, reverse=True)]


def paginate(items: list[T], ident, after: str | None, limit: int) -> tuple[list[T], bool]:
    """OpenAI's cursor paging: the `limit` items that follow the one whose id is `after`."""
    if after is not None:
        ids = [ident(i) for i in items]
        if after not in ids:
            raise OpenAIError(400, f"after: no item with id {after!r} in this list", param="after")
        items = items[ids.index(after) + 1:]
    return items[:limit], len(items) > limit
