"""The CRD's CEL rules and the models' Python rules must give the same verdicts.

The API server evaluates the CEL; `kubetune validate` and the operator evaluate the Python. Here
both run on every example and every cross-field case, with the CEL evaluated by cel-python on the
object as the API server would see it (defaults applied).
"""

from __future__ import annotations

import celpy
import pytest

from kubetune.api import FineTuneJob
from kubetune.api.finetunejob import changed_immutable_fields
from kubetune.api.meta import ApiModel
from kubetune.api.validation import KIND_MODELS
from tests.api.test_invalid_specs import ADAPTER, ADAPTER_CASES, CASES
from tests.support import example_docs, minimal_job, patched

_ENV = celpy.Environment()


def cel(expression: str, **variables) -> bool:
    program = _ENV.program(_ENV.compile(expression))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in variables.items()}))


def _models(model: ApiModel):
    yield model
    for name in type(model).model_fields:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ApiModel):
                yield from _models(item)


def _rule_verdicts(doc) -> list[tuple[str, bool, bool]]:
    resource = KIND_MODELS[doc["kind"]].model_validate(doc, context={"skip_rules": True})
    verdicts = []
    for model in _models(resource):  # from the root: rules on the resource itself read metadata.name
        wire = model.model_dump(by_alias=True, mode="json", exclude_none=True)
        for rule in type(model).rules:
            verdicts.append((rule.cel, rule.check(model), cel(rule.cel, self=wire)))
    return verdicts


RULE_DOCS = [d for _, d in example_docs()] + [minimal_job(**p) for _, p, _, _ in CASES] + [
    patched(ADAPTER, {"spec": p}) for p, _, _ in ADAPTER_CASES] + [
    minimal_job(method="qlora"), minimal_job(method="qlora", quantization={"bits": 4}),
    minimal_job(baseModel={"uri": "hf://org/m"}, allowHubDownloads=True),
    minimal_job(queueName="q", workloadPriorityClassName="low"),
    minimal_job(evaluation={"exactMatch": True}, dataset={"validationUri": "s3://data/val.jsonl", "validationSplit": 0},
                storage={"secretRef": {"name": "minio"}}),
    patched(minimal_job(), {"metadata": {"name": "a" * 64}}), patched(ADAPTER, {"metadata": {"name": "a" * 64}}),
]


def _field_valid(doc) -> bool:
    try:
        KIND_MODELS[doc["kind"]].model_validate(doc, context={"skip_rules": True})
        return True
    except Exception:
        return False


@pytest.mark.parametrize("doc", [d for d in RULE_DOCS if _field_valid(d)])
def test_cel_and_python_agree(doc):
    for expression, python, cel_verdict in _rule_verdicts(doc):
        assert python == cel_verdict, expression


def test_every_rule_is_exercised_both_ways():
    seen: dict[str, set[bool]] = {}
    for doc in filter(_field_valid, RULE_DOCS):
        for expression, python, _ in _rule_verdicts(doc):
            seen.setdefault(expression, set()).add(python)
    all_rules = {r.cel for k in KIND_MODELS.values() for m in _all_model_classes(k) for r in m.rules}
    assert set(seen) == all_rules
    assert all(v == {True, False} for v in seen.values()), {k: v for k, v in seen.items() if len(v) < 2}


def _all_model_classes(cls):
    seen, stack = set(), [cls]
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        for f in c.model_fields.values():
            for t in [f.annotation, *getattr(f.annotation, "__args__", ())]:
                for inner in [t, *getattr(t, "__args__", ())]:
                    if isinstance(inner, type) and issubclass(inner, ApiModel):
                        stack.append(inner)
    return seen


def test_traversal_rule_in_cel():
    from kubetune.api.uris import TRAVERSAL_CEL

    for uri, ok in [("s3://b/../x", False), ("pvc://c/a/..", False), ("pvc://c/./a", False),
                    ("s3://b/a..b/c", True), ("s3://b/.hidden", True), ("pvc://c/x", True)]:
        assert cel(TRAVERSAL_CEL, self=uri) is ok, uri


def _started(doc):
    return patched(doc, {"status": {"phase": "Running", "startTime": "2026-11-22T10:00:00Z"}})


ROOT_RULE = FineTuneJob.crd_root_rules[0]["rule"]


@pytest.mark.parametrize("change,immutable", [
    ({"training": {"learningRate": 0.001}}, True),
    ({"lora": {"r": 64}}, True),
    ({"dataset": {"uri": "pvc://data/other.jsonl"}}, True),
    ({"suspend": True}, False),
    ({"backoffLimit": 9}, False),
    ({"queueName": "other"}, False),
])
def test_training_fields_are_immutable_once_started(change, immutable):
    old = _started(minimal_job())
    new = patched(old, {"spec": change})
    wire = lambda d: {**d, "spec": FineTuneJob.model_validate(d).spec.model_dump(by_alias=True, mode="json",
                                                                               exclude_none=True)}
    assert cel(ROOT_RULE, self=wire(new), oldSelf=wire(old)) is not immutable
    changed = changed_immutable_fields(FineTuneJob.model_validate(old).spec, FineTuneJob.model_validate(new).spec)
    assert bool(changed) is immutable
    # Before the start, anything may change.
    assert cel(ROOT_RULE, self=wire(patched(minimal_job(), {"spec": change})), oldSelf=wire(minimal_job()))
