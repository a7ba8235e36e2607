"""The operator with the chart's identity through the whole flow on the real plane.

The chart is rendered by helm (per-namespace Roles), its ServiceAccounts, RBAC, peering and trainer
admission policy applied; the operator runs with the Deployment's arguments under the chart's
ServiceAccount token. The quickstart's SmolLM2 LoRA run goes apply -> Job (the operator) -> pods
(Kubernetes' Job controller) -> bound (the scheduler) -> run (the node's kubelet, kubetune's
executor) -> Succeeded -> LoraAdapter Ready. No call of the operator or the trainer may be refused.

From the API server's audit log: every verb of every rule was used by some call (or is in KEPT, with
the README's reason), and taking any used verb away makes the authorizer refuse the call that used
it (SubjectAccessReview of that very call)."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass

import pytest
import yaml

from kubetune.controller.jobs import job_name
from kubetune.controller.kube import path_for
from tests.realplane.kubetune_install import (Call, Installation, audited_calls, install, prepare_inputs,
                                              quickstart_doc, running_node, storage_secret, uninstall)
from tests.realplane.operator_process import kubectl_apply
from tests.support import eventually, minimal_job, patched

FTJ_API = "kubetune.dev/v1alpha1"
FLOW_TIMEOUT_S = 2400
# Rules no call of the flow used, and why the chart keeps them (the README's RBAC table says the same).
KEPT: dict[str, str] = {
    "core/services:create": "the headless Service of a multi-node job's rendezvous (resources.nodes > 1; "
                            "tests/realplane/test_job_semantics.py runs one); the quickstart is one node",
    "core/services:get": "adopting that Service when it already exists (a restarted operator)",
    "core/pods:delete": "a group restart of a multi-node job stops the other ranks; on deletion the operator "
                        "deletes the pods the garbage collector has not removed yet, a race the quickstart's "
                        "clean-up may or may not see",
    "kueue.x-k8s.io/workloads:list": "reading why Kueue holds a job with spec.queueName (the quickstart has none; "
                                     "tests/realplane/test_kueue.py covers it)",
}


@dataclass(frozen=True)
class Grant:
    """One verb of one rule of one Role or ClusterRole."""
    kind: str
    name: str
    namespace: str
    rule: int
    group: str
    resource: str
    verb: str

    @property
    def key(self) -> str:
        return f"{self.group or 'core'}/{self.resource}:{self.verb}"

    def matches(self, call: Call) -> bool:
        return (call.group, call.resource_path, call.verb) == (self.group, self.resource, self.verb) and (
            self.kind == "ClusterRole" or call.namespace == self.namespace)


def grants(roles: list[dict]) -> list[Grant]:
    return [Grant(role["kind"], role["metadata"]["name"], role["metadata"].get("namespace", ""), index, group,
                  resource, verb)
            for role in roles for index, rule in enumerate(role.get("rules") or [])
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]]


def without(role: dict, grant: Grant) -> dict:
    """The role with one verb of one rule taken away."""
    reduced = copy.deepcopy(role)
    rule = reduced["rules"][grant.rule]
    rule["verbs"] = [v for v in rule["verbs"] if v != grant.verb]
    if not rule["verbs"]:
        reduced["rules"].pop(grant.rule)
    return reduced


def allowed(installation: Installation, user: str, call: Call) -> bool:
    namespace = user.split(":")[2]
    _, review = installation.plane.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                          "system:authenticated"],
                 "resourceAttributes": {"namespace": call.namespace, "verb": call.verb, "group": call.group,
                                        "resource": call.resource, "subresource": call.subresource,
                                        "name": call.name}}})
    return review["status"].get("allowed", False)


def apply_role(installation: Installation, role: dict) -> None:
    installation.plane.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-",
                               input=yaml.safe_dump(role))


def _get(plane, api_version: str, plural: str, namespace: str, name: str) -> dict:
    status, body = plane.request("GET", path_for(api_version, plural, namespace, name))
    return body if status == 200 else {}


async def run_quickstart(installation: Installation) -> dict:
    """The quickstart's run, applied suspended and then resumed (the operator creates the Job
    suspended and lets it go), to its adapter Ready; then deleted (the operator cleans up after it).
    Its final status. Exact-match generation is off (see quickstart_doc)."""
    plane, namespace = installation.plane, installation.namespaces[0]
    doc = quickstart_doc()
    name = doc["metadata"]["name"]
    kubectl_apply(plane, namespace, patched(doc, {"spec": {"suspend": True}}))
    await eventually(lambda: _get(plane, "batch/v1", "jobs", namespace, job_name(name)).get("spec", {}).get("suspend"),
                     timeout=120, interval=1, what="the suspended Job")
    plane.kubectl("patch", "finetunejob", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    await eventually(lambda: (_get(plane, FTJ_API, "finetunejobs", namespace, name).get("status") or {}).get("phase")
                     in ("Succeeded", "Failed"), timeout=FLOW_TIMEOUT_S, interval=2, what="the run's end")
    status = _get(plane, FTJ_API, "finetunejobs", namespace, name)["status"]
    adapter = (status.get("adapterRef") or {}).get("name", "")
    await eventually(lambda: adapter and (_get(plane, FTJ_API, "loraadapters", namespace, adapter).get("status")
                                          or {}).get("phase") == "Ready", timeout=600, interval=2, what="adapter Ready")
    plane.kubectl("delete", "finetunejob", name, "-n", namespace, "--wait=false")
    await eventually(lambda: not _get(plane, FTJ_API, "finetunejobs", namespace, name), timeout=180, interval=1,
                     what="the FineTuneJob cleaned up and gone")
    return status


@pytest.fixture(scope="module")
def flow(control_plane, kubetune_crds, s3_server, tmp_path_factory):
    """The quickstart's run, once, by the chart's identities (per-namespace Roles)."""
    work = tmp_path_factory.mktemp("rbac-flow")
    installation = install(control_plane, watch=[f"team-{work.name[-6:].lower().replace('_', '')}"])
    try:
        storage_secret(control_plane, installation.namespaces[0], s3_server.config)
        prepare_inputs(s3_server.config)
        operator = installation.start_operator(work)
        with running_node(control_plane, work / "node"):
            status = asyncio.run(run_quickstart(installation))
        yield installation, status, operator
    finally:
        uninstall(installation)


def test_the_quickstart_run_succeeds_with_the_charts_identity(flow):
    installation, status, operator = flow
    assert status["phase"] == "Succeeded", status
    assert operator.forbidden_lines() == []
    assert "Not enough permissions" not in operator.output()


def test_no_call_was_refused(flow):
    installation, _, _ = flow
    users = [installation.user, installation.trainer_user(installation.namespaces[0])]
    refused = [(u, c) for u in users for c in audited_calls(installation.plane, u) if c.code in (401, 403)]
    assert refused == []


async def test_every_rule_is_used_or_kept_and_removing_it_refuses_the_call(flow):
    installation, _, _ = flow
    namespace = installation.namespaces[0]
    checked = {installation.user: [r for r in installation.rbac("Role") + installation.rbac("ClusterRole")
                                   if r["metadata"]["name"] == installation.account],
               installation.trainer_user(namespace): [r for r in installation.rbac("Role")
                                                      if r["metadata"]["name"] == "kubetune-trainer"]}
    unused, still_allowed = [], []
    for user, roles in checked.items():
        calls = audited_calls(installation.plane, user)
        for grant in grants(roles):
            call = next((c for c in calls if grant.matches(c) and c.code < 400), None)
            if call is None:
                if grant.key not in KEPT:
                    unused.append(grant.key)
                continue
            role = next(r for r in roles if (r["kind"], r["metadata"]["name"], r["metadata"].get("namespace", ""))
                        == (grant.kind, grant.name, grant.namespace))
            apply_role(installation, without(role, grant))
            try:
                await eventually(lambda: not allowed(installation, user, call), timeout=10, what=f"{grant.key} refused")
            except AssertionError:
                still_allowed.append(grant.key)
            finally:
                apply_role(installation, role)
            await eventually(lambda: allowed(installation, user, call), timeout=10, what=f"{grant.key} restored")
    assert unused == [], f"rules no call used (drop them, or say in KEPT and the README why they stay): {unused}"
    assert still_allowed == [], f"taking these away refused nothing: {still_allowed}"


def test_the_cluster_wide_role_allows_the_same_calls(flow, control_plane):
    """The chart's other mode (no watch.namespaces: one ClusterRole, a ClusterKopfPeering) allows
    every call the flow made, in any namespace."""
    installation, _, _ = flow
    cluster_wide = install(control_plane)
    try:
        peering = {"kopfpeerings": "clusterkopfpeerings"}
        calls = {Call(c.verb, c.group, peering.get(c.resource, c.resource), c.subresource,
                      "" if c.resource in peering else c.namespace, "", 0, "", "")
                 for c in audited_calls(control_plane, installation.user) if c.code < 400}
        assert [c for c in calls if not allowed(cluster_wide, cluster_wide.user, c)] == []
    finally:
        uninstall(cluster_wide)


KOPF_ERROR_RETRY_S = 60  # Kopf's delay before retrying a handler that raised an unexpected error


async def test_taking_away_a_rule_breaks_the_operator_for_real(flow):
    """Not only the authorizer's word: without `create` on Jobs, a new FineTuneJob gets no Job and
    the operator's call is refused. (Runs last: it makes the operator see 403s.)"""
    installation, _, _ = flow
    namespace = installation.namespaces[0]
    role = next(r for r in installation.rbac("Role")
                if (r["metadata"]["name"], r["metadata"]["namespace"]) == (installation.account, namespace))
    apply_role(installation, without(role, next(g for g in grants([role]) if g.key == "batch/jobs:create")))
    try:
        kubectl_apply(installation.plane, namespace, patched(minimal_job(suspend=True), {"metadata": {"name": "no-job"}}))
        await eventually(lambda: any((c.verb, c.resource, c.code) == ("create", "jobs", 403)
                                     for c in audited_calls(installation.plane, installation.user)),
                         timeout=60, what="the operator refused creating the Job")
        status, _ = installation.plane.request("GET", path_for("batch/v1", "jobs", namespace, job_name("no-job")))
        assert status == 404
    finally:
        apply_role(installation, role)
    # Kopf retries a handler that failed with an unexpected error (this 403) a minute after the
    # failure, which was seconds before the rule came back: a 60 s wait raced that retry.
    await eventually(lambda: installation.plane.request(
        "GET", path_for("batch/v1", "jobs", namespace, job_name("no-job")))[0] == 200,
        timeout=KOPF_ERROR_RETRY_S + 60, what="the Job created once the rule is back")
