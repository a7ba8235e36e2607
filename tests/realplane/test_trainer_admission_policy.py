"""The chart's ValidatingAdmissionPolicy, enforced by kube-apiserver: a trainer's pod-bound token may
patch only its own pod, and only the kubetune.dev/progress annotation, although its Role allows
patching every pod of the namespace."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from kubetune.contract import PROGRESS_ANNOTATION
from tests.chart.test_chart import CHART
from tests.chart.tools import ecosystem_tool
from tests.support import eventually

POLICY_KINDS = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
TRAINER = "kubetune-trainer"


def _trainer_objects(namespace: str) -> list[dict]:
    """The trainer's ServiceAccount, Role, RoleBinding and the policy, as helm renders them for a
    release watching `namespace`."""
    rendered = subprocess.run([ecosystem_tool("helm"), "template", "rel", str(CHART), "--namespace", namespace,
                               "--set", f"watch.namespaces={{{namespace}}}"],
                              capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(rendered) if d and (
        d["kind"] in POLICY_KINDS or (d["kind"] in ("ServiceAccount", "Role", "RoleBinding")
                                      and d["metadata"]["name"] == TRAINER))]


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": {"team": "a"}},
            "spec": {"serviceAccountName": TRAINER, "containers": [{"name": "trainer", "image": "trainer:test"}]}}


@pytest.fixture
def trainer_pods(control_plane, namespace):
    docs = _trainer_objects(namespace)
    assert {d["kind"] for d in docs} >= POLICY_KINDS | {"ServiceAccount", "Role", "RoleBinding"}
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([_pod("own"), _pod("other")]))
    yield namespace
    control_plane.kubectl("delete", "-f", "-", "--ignore-not-found",
                          input=yaml.safe_dump_all([d for d in docs if d["kind"] in POLICY_KINDS]))


def _patch(plane, token: str, namespace: str, pod: str, metadata: dict, *, dry_run: bool = False):
    query = "?dryRun=All" if dry_run else ""
    return plane.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod}{query}", {"metadata": metadata},
                         content_type="application/merge-patch+json", token=token)


async def test_trainer_token_patches_only_its_own_progress(control_plane, trainer_pods):
    namespace = trainer_pods
    token = control_plane.token_for(namespace, TRAINER, pod="own")
    progress = {"annotations": {PROGRESS_ANNOTATION: json.dumps({"step": 3, "totalSteps": 10})}}

    # The Role and the policy take effect once the API server's caches hold them: wait, without side
    # effects, for a denial by the policy (admission runs only after RBAC allowed the request).
    def denied_by_policy() -> bool:
        status, body = _patch(control_plane, token, namespace, "own", {"labels": {"x": "y"}}, dry_run=True)
        return status == 403 and "ValidatingAdmissionPolicy" in body.get("message", "")

    await eventually(denied_by_policy, timeout=60, what="RBAC and the policy to be in force")

    cases = {
        "own pod, progress annotation": (_patch(control_plane, token, namespace, "own", progress), 200),
        "other pod, progress annotation": (_patch(control_plane, token, namespace, "other", progress), 403),
        "own pod, a label": (_patch(control_plane, token, namespace, "own", {"labels": {"x": "y"}}), 403),
        "own pod, another annotation": (_patch(control_plane, token, namespace, "own",
                                               {"annotations": {"team": "b"}}), 403),
        "own pod, token not bound to a pod": (_patch(control_plane, control_plane.token_for(namespace, TRAINER),
                                                     namespace, "own", progress), 403),
    }
    outcomes = {case: status for case, ((status, _), _) in cases.items()}
    assert outcomes == {case: expected for case, (_, expected) in cases.items()}, {
        case: body.get("message") for case, ((_, body), _) in cases.items()}
    for case, ((status, body), _) in cases.items():
        if status == 403:  # refused by the policy, not by RBAC (the Role allows patching every pod)
            assert "ValidatingAdmissionPolicy" in body["message"] and "trainer-progress-only" in body["message"], case

    stored = json.loads(control_plane.kubectl("get", "pod", "own", "-n", namespace, "-o", "json").stdout)["metadata"]
    assert stored["annotations"] == {"team": "a", PROGRESS_ANNOTATION: progress["annotations"][PROGRESS_ANNOTATION]}
    assert "labels" not in stored
