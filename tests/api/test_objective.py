"""spec.objective: sft by default, dpo with TRL's defaults, immutable once the job has started."""

from __future__ import annotations

from kubetune.api import FineTuneJob
from kubetune.api.finetunejob import IMMUTABLE_AFTER_START, changed_immutable_fields
from tests.api.test_cel_rules import ROOT_RULE, _started, cel
from tests.support import minimal_job, patched


def test_objective_defaults():
    spec = FineTuneJob.model_validate(minimal_job()).spec
    assert spec.objective.type == "sft" and spec.objective.dpo is None
    dpo = FineTuneJob.model_validate(minimal_job(objective={"type": "dpo"})).spec.objective
    assert (dpo.dpo_settings().beta, dpo.dpo_settings().loss_type) == (0.1, "sigmoid")


def test_objective_is_immutable_once_started():
    assert "objective" in IMMUTABLE_AFTER_START
    old = _started(minimal_job())
    new = patched(old, {"spec": {"objective": {"type": "dpo"}}})
    jobs = [FineTuneJob.model_validate(d) for d in (old, new)]
    assert changed_immutable_fields(jobs[0].spec, jobs[1].spec) == ["objective"]
    wire = [{**d, "spec": j.spec.model_dump(by_alias=True, mode="json", exclude_none=True)}
            for d, j in zip((new, old), (jobs[1], jobs[0]), strict=True)]
    assert cel(ROOT_RULE, self=wire[0], oldSelf=wire[1]) is False
