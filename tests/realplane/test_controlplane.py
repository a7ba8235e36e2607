"""The control plane itself (kubetune.local.controlplane): every component does its part, tokens are
bound to pods, and the restarts and compaction the watch-fault tests use keep the data."""

from __future__ import annotations

import json

from kubetune.local.controlplane import DEFAULT_NODE, ControlPlane
from tests.support import eventually


def _get(plane, path: str) -> dict:
    status, body = plane.request("GET", path)
    assert status == 200, body
    return body


async def test_job_controller_and_scheduler_run(control_plane, namespace):
    """kube-controller-manager creates the Job's pod, kube-scheduler judges it (no node matches)."""
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never", "nodeSelector": {"kubetune.dev/no-such-node": "true"},
            "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}}}}))

    def unschedulable():
        pods = _get(control_plane, f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3Dprobe")["items"]
        return [c for p in pods for c in p.get("status", {}).get("conditions", [])
                if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"]

    assert await eventually(unschedulable, timeout=60, what="the Job's pod judged by the scheduler")


def test_service_accounts_get_tokens_bound_to_their_pod(control_plane, namespace):
    control_plane.kubectl("create", "serviceaccount", "trainer", "-n", namespace)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"serviceAccountName": "trainer", "containers": [{"name": "c", "image": "busybox"}]}}))
    token = control_plane.token_for(namespace, "trainer", pod="p")
    status, review = control_plane.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
    assert status == 201 and review["status"]["authenticated"], review
    user = review["status"]["user"]
    assert user["username"] == f"system:serviceaccount:{namespace}:trainer"
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["p"]
    # The token works for its holder: the default service-account permissions let it discover APIs.
    assert control_plane.request("GET", "/apis", token=token)[0] == 200


def test_nodes_and_admin_have_tokens(control_plane):
    assert control_plane.request("GET", "/api/v1/nodes", token=control_plane.admin_token)[0] == 200
    # The Node authorizer: a node reads its own Node (404 until its kubelet registers it), not
    # another's, and no Secrets but those of its pods.
    node = control_plane.node_token()
    assert control_plane.request("GET", f"/api/v1/nodes/{DEFAULT_NODE}", token=node)[0] in (200, 404)
    assert control_plane.request("GET", "/api/v1/nodes/another-node", token=node)[0] == 403
    assert control_plane.request("GET", "/api/v1/secrets", token=node)[0] == 403


def test_restarts_and_compaction_keep_the_data(tmp_path):
    # A plane of its own: after an etcd restart kube-apiserver's CRD controllers were once seen not to
    # establish new CRDs for minutes (under load), which would fail every later test of the session.
    with ControlPlane(tmp_path / "plane") as plane:
        plane.kubectl("create", "configmap", "kept", "--from-literal=a=1")
        before = plane.compact_etcd()
        plane.restart_apiserver()
        plane.restart_etcd()
        assert _get(plane, "/api/v1/namespaces/default/configmaps/kept")["data"] == {"a": "1"}
        plane.kubectl("create", "configmap", "after")
        assert plane.compact_etcd() > before
