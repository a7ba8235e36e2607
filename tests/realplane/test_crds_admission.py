"""Our CRDs judged by kube-apiserver itself: they install and become Established, every invalid spec
`kubetune validate` refuses (tests/api/test_invalid_specs.py) is refused at admission by real
`kubectl apply --server-side --validate=strict`, every example is accepted, and the transition
rule freezes the training fields of a started job but not `spec.suspend`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import pytest
import yaml

from kubetune.api.validation import validate_object
from tests.api.test_invalid_specs import ADAPTER, ADAPTER_CASES, CASES
from tests.realplane.conftest import apply_crds
from tests.support import REPO, example_docs, minimal_job, patched

INVALID = ([(f"ftj/{case_id}", minimal_job(**patch)) for case_id, patch, _, _ in CASES]
           # The adapter cases have no ids: numbered, with the field they are about.
           + [(f"lora/{n}-{path.removeprefix('spec.')}", patched(ADAPTER, {"spec": patch}))
              for n, (patch, path, _) in enumerate(ADAPTER_CASES, 1)])


@dataclass(frozen=True)
class Verdict:
    case: str
    field: str  # the field kubetune validate names ("" when it accepts)
    kubetune: str  # "" when kubetune validate accepts, else its first problem
    apiserver: str  # "" when the API server accepts, else its message

    @property
    def agree(self) -> bool:
        """Both accept, or both refuse naming the same field."""
        return bool(self.kubetune) == bool(self.apiserver) and self.field in self.apiserver


def _named(doc: dict, name: str) -> dict:
    """doc under another name, without its namespace (kubectl -n puts it in the test's)."""
    return {**doc, "metadata": {**{k: v for k, v in doc["metadata"].items() if k != "namespace"}, "name": name}}


def _apply(plane, namespace: str, doc: dict):
    return plane.kubectl("apply", "--server-side", "--validate=strict", "--field-manager=kubetune-tests",
                         "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)


def _apiserver_message(stderr: str) -> str:
    return " ".join(stderr.split())


@pytest.fixture(scope="module")
def admission_namespace(control_plane, kubetune_crds):
    name = f"admission-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def verdicts(control_plane, admission_namespace) -> dict[str, Verdict]:
    out = {}
    for index, (case, doc) in enumerate(INVALID):
        doc = _named(doc, f"case-{index}")
        _, problems = validate_object(doc)
        result = _apply(control_plane, admission_namespace, doc)
        out[case] = Verdict(case, problems[0].path if problems else "",
                            f"{problems[0].path}: {problems[0].message}" if problems else "",
                            _apiserver_message(result.stderr) if result.returncode else "")
    return out


def test_crds_and_chart_crds_become_established(control_plane):
    names = apply_crds(control_plane, REPO / "crds") + apply_crds(control_plane, REPO / "charts/kubetune/crds")
    assert {"finetunejobs.kubetune.dev", "loraadapters.kubetune.dev"} <= set(names)
    established = json.loads(control_plane.kubectl("get", "crd", "-o", "json").stdout)["items"]
    conditions = {c["metadata"]["name"]: {x["type"]: x["status"] for x in c["status"]["conditions"]}
                  for c in established}
    assert all(conditions[name].get("Established") == "True" for name in names), conditions
    assert all(conditions[name].get("NamesAccepted") == "True" for name in names), conditions


@pytest.mark.parametrize("case", [c for c, _ in INVALID])
def test_invalid_spec_is_refused_by_the_api_server(verdicts, case):
    verdict = verdicts[case]
    assert verdict.kubetune, "kubetune validate must refuse every case of tests/api"
    assert verdict.apiserver, f"the API server accepted {case}, which kubetune validate refuses: {verdict.kubetune}"
    assert verdict.field in verdict.apiserver, f"refused for another field than {verdict.field}: {verdict.apiserver}"


def test_admission_table(verdicts, capsys):
    """The case-by-case table (shown with -s); any disagreement fails."""
    rows = [f"| {v.case} | {'refused' if v.kubetune else 'accepted'} | {'refused' if v.apiserver else 'accepted'} "
            f"| {'yes' if v.agree else 'NO'} | {_short(v.apiserver)} |" for v in verdicts.values()]
    table = "\n".join(["| case | kubetune validate | kube-apiserver | agree (verdict and field) | API server's reason |",
                       "|---|---|---|---|---|", *rows])
    with capsys.disabled():
        print(f"\n{table}\nrefused by the API server: {sum(bool(v.apiserver) for v in verdicts.values())} "
              f"of {len(verdicts)}")
    assert [v.case for v in verdicts.values() if not v.agree] == []


def _short(message: str) -> str:
    # kubectl wraps the API server's answer in "Error from server (Invalid): ... is invalid:"; the rest is the reason.
    return re.sub(r"^.*? is invalid: ", "", message)[:160].replace("|", "/")


@pytest.mark.parametrize("example,doc", example_docs(), ids=[name for name, _ in example_docs()])
def test_example_is_accepted(control_plane, admission_namespace, example, doc):
    result = _apply(control_plane, admission_namespace, _named(doc, f"example-{uuid.uuid4().hex[:6]}"))
    assert result.returncode == 0, result.stderr


# Valid values at the bounds, integers where the schema says number: kube-openapi once refused
# `validationSplit: 0` (it compared 0 < int64(0.5)); the CRD generator now states such bounds in CEL.
BOUNDARY_VALID = {
    "split-zero": {"dataset": {"validationSplit": 0}},
    "split-below-half": {"dataset": {"validationSplit": 0.49}},
    "warmup-half": {"training": {"warmupRatio": 0.5}},
    "warmup-zero": {"training": {"warmupRatio": 0}},
    "dropout-zero": {"lora": {"dropout": 0}},
    "epochs-integer": {"training": {"epochs": 3}},
}


@pytest.mark.parametrize("case", BOUNDARY_VALID)
def test_valid_boundary_value_is_accepted(control_plane, admission_namespace, case):
    doc = _named(minimal_job(**BOUNDARY_VALID[case]), f"bound-{case}")
    assert validate_object(doc)[1] == []
    result = _apply(control_plane, admission_namespace, doc)
    assert result.returncode == 0, result.stderr


def _patch(plane, namespace, name, patch: dict, *subresource: str):
    return plane.kubectl("patch", "finetunejob", name, "-n", namespace, "--type=merge", "-p", json.dumps(patch),
                         *subresource, check=False)


def test_training_fields_freeze_once_started_but_suspend_does_not(control_plane, admission_namespace):
    name = f"frozen-{uuid.uuid4().hex[:6]}"
    assert _apply(control_plane, admission_namespace, _named(minimal_job(), name)).returncode == 0
    not_started = _patch(control_plane, admission_namespace, name, {"spec": {"training": {"learningRate": 0.001}}})
    assert not_started.returncode == 0, not_started.stderr

    started = _patch(control_plane, admission_namespace, name, {"status": {"startTime": "2026-12-01T00:00:00Z"}},
                     "--subresource=status")
    assert started.returncode == 0, started.stderr
    for change in ({"training": {"learningRate": 0.002}}, {"lora": {"r": 8}}, {"dataset": {"uri": "pvc://data/b.jsonl"}}):
        refused = _patch(control_plane, admission_namespace, name, {"spec": change})
        assert refused.returncode != 0 and "immutable once the job has started" in refused.stderr, (change, refused)

    suspended = _patch(control_plane, admission_namespace, name, {"spec": {"suspend": True}})
    assert suspended.returncode == 0, suspended.stderr
    stored = json.loads(control_plane.kubectl("get", "finetunejob", name, "-n", admission_namespace,
                                              "-o", "json").stdout)["spec"]
    assert (stored["suspend"], stored["training"]["learningRate"]) == (True, 0.001)
