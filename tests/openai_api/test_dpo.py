"""method dpo on the OpenAI API: the request maps onto spec.objective, the upload check knows
preference pairs, and a file that does not fit the method is a 400 before anything is created."""

from __future__ import annotations

import json

import pytest

from kubetune.api import FineTuneJob
from kubetune.openai_api import mapping
from kubetune.openai_api.errors import OpenAIError
from kubetune.openai_api.uploads import check_dataset
from kubetune_trainer.records import DatasetError
from tests.openai_api.test_mapping import build

DPO = {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}}


def test_dpo_request_becomes_a_dpo_finetunejob():
    doc = build(DPO, file_format="preference")
    spec = FineTuneJob.model_validate(doc).spec
    assert doc["spec"]["objective"] == {"type": "dpo", "dpo": {"beta": 0.25}}
    assert spec.objective.type == "dpo" and spec.objective.dpo_settings().beta == 0.25
    assert spec.training.epochs == 2.0
    # The job reads back as OpenAI's dpo method, with its beta.
    method = mapping.job_object(doc).method
    assert method["type"] == "dpo" and method["dpo"]["hyperparameters"]["beta"] == 0.25


def test_dpo_with_auto_beta_takes_the_spec_default():
    doc = build({"method": {"type": "dpo"}}, file_format="preference-conversational")
    assert doc["spec"]["objective"] == {"type": "dpo"}
    assert mapping.job_object(doc).method["dpo"]["hyperparameters"]["beta"] == 0.1


@pytest.mark.parametrize("body, file_format, param, text", [
    (DPO, "prompt-completion", "training_file",
     "training_file 'file-abc' is a prompt-completion dataset; method dpo needs preference pairs"),
    ({}, "preference", "training_file", "training_file 'file-abc' holds preference pairs; use method dpo"),
    ({"hyperparameters": {"n_epochs": 2}, **DPO}, "preference", "hyperparameters",
     "give hyperparameters either at the top level or in method.dpo, not both"),
])
def test_dpo_requests_refused(body, file_format, param, text):
    with pytest.raises(OpenAIError) as caught:
        build(body, file_format=file_format)
    assert caught.value.status == 400 and caught.value.param == param and text in caught.value.message


def test_dpo_beta_of_wrong_type_is_refused():
    from pydantic import ValidationError

    from kubetune.openai_api.models import JobCreate

    with pytest.raises(ValidationError):
        JobCreate.model_validate({"model": "smol", "training_file": "file-abc",
                                  "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}})


def test_upload_check_knows_preference_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "0"}) + "\n"
                            for i in range(3)))
    assert check_dataset(path, "pairs.jsonl") == ("preference", 3)
    path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DatasetError) as caught:
        check_dataset(path, "pairs.jsonl")
    assert str(caught.value) == "pairs.jsonl: line 1: field 'rejected': is required"
