"""Property-based: whatever a manifest holds, parsing answers with a resource or with problems that
name fields (never an exception), accepts nothing the CRD's schema refuses, and is stable."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api.validation import validate_object
from tests.api.test_crds import _validator
from tests.support import minimal_job

SCHEMA = _validator("FineTuneJob")
FIELDS = ["baseModel", "dataset", "method", "lora", "training", "resources", "output", "evaluation", "storage",
          "checkpointEverySteps", "backoffLimit", "queueName", "suspend", "trainerImage", "quantization"]
# Any JSON value, weighted towards what specs hold: short and unicode strings, numbers at the edges,
# the URI shapes that must be refused (traversal, other schemes), nesting.
scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
           | st.text(max_size=40) | st.sampled_from(["s3://b/../x", "pvc://claim/../../etc", "hf://org/m",
                                                     "s3://models/qwen", "qlora", "lora", "all-linear", "é🙂",
                                                     "x" * 5000]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=12) | st.sampled_from(["r", "uri", "gpus", "nodes",
                                                                               "maxSteps", "batchSize"]),
                                        inner, max_size=4), max_leaves=12)


def _without_nulls(value):
    """The API server drops null fields of a CRD object (none is nullable) before validating."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, max_size=4))
def test_any_spec_parses_to_a_resource_or_to_named_problems(changes):
    doc = minimal_job()
    doc["spec"].update(changes)
    resource, problems = validate_object(doc)
    if resource is None:
        assert problems and all(p.message for p in problems)
        assert all(p.path.startswith("spec") or p.path == "" for p in problems)
        return
    assert not problems
    assert not list(SCHEMA.iter_errors(_without_nulls(doc)))  # the API server would take it too
    dumped = resource.model_dump(by_alias=True, mode="json", exclude_none=True)
    again, problems = validate_object(dumped)
    assert not problems and again.model_dump(by_alias=True, mode="json", exclude_none=True) == dumped
    for uri in (resource.spec.base_model.uri, resource.spec.dataset.uri, resource.spec.output.uri):
        assert ".." not in uri.split("/")
