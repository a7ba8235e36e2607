"""The generated CRDs: in sync with the models, structural, valid for Kubernetes, accepting the examples."""

from __future__ import annotations


import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.api.crd import KINDS, build_crd, crd_files
from kubetune.api.reference import splice
from tests.support import REPO, example_docs, minimal_job, patched


def test_generated_files_match_the_models():
    stale = [str(p.relative_to(REPO)) for p, text in crd_files(REPO).items()
             if not p.exists() or p.read_text() != text]
    assert stale == [], "run `kubetune crds generate`"
    readme = (REPO / "README.md").read_text()
    assert splice(readme) == readme, "README reference is stale: run `kubetune crds generate`"


def _walk(node: dict, path: str):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


INTENDED_OPEN = {"FineTuneJob": {".spec.resources.affinity"}, "LoraAdapter": set()}
FORBIDDEN_KEYS = {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs", "const"}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_schema_is_structural(kind):
    schema = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    open_nodes = set()
    for path, node in _walk(schema, ""):
        assert "type" in node, f"{path} has no type"
        assert not FORBIDDEN_KEYS & node.keys(), f"{path} has {FORBIDDEN_KEYS & node.keys()}"
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            open_nodes.add(path)
    assert open_nodes == INTENDED_OPEN[kind.__name__]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_crd_is_valid_apiextensions_v1(kind):
    crd = yaml.safe_load((REPO / "crds" / f"{kind.crd_plural}.kubetune.dev.yaml").read_text())
    kubernetes_validate.validate(crd, "1.33", strict=True)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["categories"] == ["kubetune"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Phase", "Age"}


def _validator(kind_name: str) -> jsonschema.Draft4Validator:
    crd = yaml.safe_load((REPO / "crds" / f"{kind_name.lower()}s.kubetune.dev.yaml").read_text())
    # OpenAPI v3.0 schemas use draft-4 semantics (boolean exclusiveMaximum).
    return jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("name,doc", example_docs(), ids=[n for n, _ in example_docs()])
def test_examples_validate_against_crd_schema(name, doc):
    errors = list(_validator(doc["kind"]).iter_errors(doc))
    assert errors == []


@pytest.mark.parametrize("patch,field", [
    ({"lora": {"r": 0}}, "r"),
    # 0.5 itself is refused by a CEL rule (see crd.py on fractional bounds): tests/realplane.
    ({"dataset": {"validationSplit": 0.6}}, "validationSplit"),
    ({"method": "full"}, "method"),
    ({"baseModel": {"uri": "ftp://x/y"}}, "uri"),
    ({"resources": {"gpus": -1}}, "gpus"),
])
def test_crd_schema_refuses_what_the_models_refuse(patch, field):
    errors = list(_validator("FineTuneJob").iter_errors(minimal_job(**patch)))
    assert [e.path[-1] for e in errors] == [field]


def test_examples_round_trip_without_loss():
    from kubetune.api.validation import validate_object

    for name, doc in example_docs():
        resource, problems = validate_object(doc)
        assert problems == [], name
        assert resource.to_wire() == doc, name


def test_unknown_metadata_survives_round_trip():
    from kubetune.api.validation import validate_object

    doc = patched(minimal_job(), {"metadata": {"uid": "u-1", "resourceVersion": "7", "generation": 2}})
    resource, _ = validate_object(doc)
    assert resource.to_wire()["metadata"] == doc["metadata"]
