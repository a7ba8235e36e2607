"""Request and response shapes of the fine-tuning API, as OpenAI's reference spells them.

Requests are strict (no coercion of `"3"` to 3, unknown fields refused) so a wrong type is a 400
that names the field instead of a job trained with something the caller did not mean.
Responses carry every field the official clients read; what kubetune has no value for is null.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
EventLevel = Literal["info", "warn", "error"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Hyperparameters(Strict):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=1000)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=65536)] = "auto"
    # strict=False for this one field: JSON has one number type, and a multiplier of 2 is as valid as 2.0.
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100, strict=False)] = "auto"


class Supervised(Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoHyperparameters(Hyperparameters):
    # strict=False as for the multiplier: a beta of 1 is as valid as 1.0.
    beta: Auto | Annotated[float, Field(gt=0, le=100, strict=False)] = "auto"


class Dpo(Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(Strict):
    model: str = Field(min_length=1, max_length=253)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(default=None, min_length=1, max_length=128)
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9-]*$")
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str = "fine-tune"
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    n_epochs: int | float | str
    batch_size: int | str
    learning_rate_multiplier: float | str


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any] | None = None
    user_provided_suffix: str | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: EventLevel
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float | int | None]
    step_number: int


def page(items: Sequence[BaseModel], has_more: bool) -> dict[str, Any]:
    """A list in OpenAI's cursor-page shape; the clients page on with the last item's id as `after`."""
    data = [i.model_dump(mode="json") for i in items]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
