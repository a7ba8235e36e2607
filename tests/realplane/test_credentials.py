"""The operator's connection and credentials, judged by kube-apiserver's own authenticators.

kubetune's client and Kopf's login take their configuration from the `kubernetes` package: every
kind of kubeconfig user that kind, minikube, k3s and the managed clouds hand out, and the pod's
service account, whose token file the kubelet replaces while the operator runs. A rotated token is
made real here: the ServiceAccount is re-created, so the API server refuses the old token (401)
before the file is replaced. Error bodies that are not JSON keep their status (ApiError)."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.controller.jobs import job_name
from kubetune.controller.kube import ApiError, KubeClient, KubeConfig, path_for
from kubetune_trainer.progress import PodAnnotationChannel
from tests.realplane.operator_process import kubectl_apply, rotate_token, service_account_dir, start_operator
from tests.support import eventually, minimal_job, patched

FTJ_API = "kubetune.dev/v1alpha1"
EXEC_API = "client.authentication.k8s.io/v1"
# An exec credential plugin as EKS's, GKE's and AKS's are: it prints an ExecCredential on stdout;
# this one hands out the token or client certificate kept in the file named by its argument.
EXEC_PLUGIN = """
import json, pathlib, sys
print(json.dumps({"apiVersion": "%s", "kind": "ExecCredential",
                  "status": json.loads(pathlib.Path(sys.argv[1]).read_text())}))
""" % EXEC_API


def account(plane, namespace: str, name: str, *, cluster_role: str | None = None) -> str:
    """A ServiceAccount (bound to `cluster_role` cluster-wide when given); its user name."""
    plane.kubectl("create", "serviceaccount", name, "-n", namespace)
    if cluster_role:
        plane.kubectl("create", "clusterrolebinding", f"{namespace}-{name}", f"--clusterrole={cluster_role}",
                      f"--serviceaccount={namespace}:{name}")
    return f"system:serviceaccount:{namespace}:{name}"


def recreate_account(plane, namespace: str, name: str) -> None:
    """A new ServiceAccount of the same name: its bindings still apply, every old token is void."""
    plane.kubectl("delete", "serviceaccount", name, "-n", namespace)
    plane.kubectl("create", "serviceaccount", name, "-n", namespace)


def refused(plane, token: str) -> bool:
    status, _ = plane.request("GET", "/api/v1/namespaces/default", token=token)
    return status == 401


async def whoami(config: KubeConfig) -> str:
    client = KubeClient(config)
    try:
        review = await client.create("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                     {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        return review["status"]["userInfo"]["username"]
    finally:
        await client.close()


def kubeconfig_with_user(plane, path: Path, user: dict) -> Path:
    plane.kubeconfig_for_token("unused", path)
    doc = yaml.safe_load(path.read_text())
    doc["users"][0]["user"] = user
    path.write_text(yaml.safe_dump(doc))
    return path


def inline(kubeconfig: Path) -> Path:
    """The kubeconfig with its CA and client certificate embedded (*-data), as kind, minikube and
    k3s write theirs."""
    doc = yaml.safe_load(kubeconfig.read_text())
    cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
    for holder, key in ((cluster, "certificate-authority"), (user, "client-certificate"), (user, "client-key")):
        holder[f"{key}-data"] = base64.b64encode(Path(holder.pop(key)).read_bytes()).decode()
    out = kubeconfig.with_name(kubeconfig.stem + "-inline.kubeconfig")
    out.write_text(yaml.safe_dump(doc))
    return out


def exec_kubeconfig(plane, directory: Path, credential: dict) -> tuple[Path, Path]:
    """A kubeconfig whose user is an exec plugin; the file it reads its credential from."""
    plugin, source = directory / "plugin.py", directory / "credential.json"
    plugin.write_text(EXEC_PLUGIN)
    source.write_text(json.dumps(credential))
    user = {"exec": {"apiVersion": EXEC_API, "command": sys.executable, "args": [str(plugin), str(source)],
                     "interactiveMode": "Never"}}
    return kubeconfig_with_user(plane, directory / "exec.kubeconfig", user), source


def certificate_credential(plane, path: Path, user: str) -> dict:
    pair = yaml.safe_load(plane.client_kubeconfig(path, user).read_text())["users"][0]["user"]
    return {"clientCertificateData": Path(pair["client-certificate"]).read_text(),
            "clientKeyData": Path(pair["client-key"]).read_text()}


# -- every kind of kubeconfig user, for kubetune's own client ------------------------------------------

@pytest.mark.parametrize("kind", ["client-certificate", "client-certificate-data", "token", "tokenFile",
                                  "exec-token", "exec-client-certificate", "in-cluster"])
async def test_the_api_server_sees_the_configured_identity(control_plane, namespace, tmp_path, monkeypatch, kind):
    plane = control_plane
    sa_user = account(plane, namespace, "who")
    token = plane.token_for(namespace, "who")
    if kind == "client-certificate":
        config, expected = KubeConfig.from_kubeconfig(plane.client_kubeconfig(tmp_path / "c.kubeconfig", "alice")), "alice"
    elif kind == "client-certificate-data":
        config = KubeConfig.from_kubeconfig(inline(plane.client_kubeconfig(tmp_path / "c.kubeconfig", "alice")))
        expected = "alice"
    elif kind == "token":
        config, expected = KubeConfig.from_kubeconfig(plane.kubeconfig_for_token(token, tmp_path / "t")), sa_user
    elif kind == "tokenFile":
        (tmp_path / "token").write_text(token)
        config = KubeConfig.from_kubeconfig(kubeconfig_with_user(plane, tmp_path / "tf", {"tokenFile": str(tmp_path / "token")}))
        expected = sa_user
    elif kind == "exec-token":
        config = KubeConfig.from_kubeconfig(exec_kubeconfig(plane, tmp_path, {"token": token})[0])
        expected = sa_user
    elif kind == "exec-client-certificate":
        credential = certificate_credential(plane, tmp_path / "bob.kubeconfig", "bob")
        config, expected = KubeConfig.from_kubeconfig(exec_kubeconfig(plane, tmp_path, credential)[0]), "bob"
    else:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(plane.port))
        monkeypatch.setenv("KUBETUNE_SERVICE_ACCOUNT_DIR", str(service_account_dir(tmp_path / "sa", plane, token)))
        config, expected = KubeConfig.load(), sa_user
    assert await whoami(config) == expected


async def test_a_rotated_token_is_used_after_the_old_one_is_refused(control_plane, namespace, tmp_path, monkeypatch):
    plane = control_plane
    account(plane, namespace, "rotating")
    old = plane.token_for(namespace, "rotating")
    sa_dir = service_account_dir(tmp_path / "sa", plane, old)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(plane.port))
    monkeypatch.setenv("KUBETUNE_SERVICE_ACCOUNT_DIR", str(sa_dir))
    config = KubeConfig.load()
    assert await whoami(config) == f"system:serviceaccount:{namespace}:rotating"
    recreate_account(plane, namespace, "rotating")
    await eventually(lambda: refused(plane, old), what="the old token refused")
    rotate_token(sa_dir, plane.token_for(namespace, "rotating"))
    client = KubeClient(config)
    try:
        review = await client.create("/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                     {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:rotating"
        assert client.config is not config, "the 401 made the client load its configuration anew"
    finally:
        await client.close()


# -- the operator (Kopf's login and kubetune's calls) ----------------------------------------------------

def job(name: str) -> dict:
    return patched(minimal_job(), {"metadata": {"name": name}})


async def wait_reconciled(plane, namespace: str, name: str, timeout: float = 60) -> None:
    """The operator created the FineTuneJob's Job and recorded a phase."""
    def done():
        status, ftj = plane.request("GET", path_for(FTJ_API, "finetunejobs", namespace, name))
        jobs, _ = plane.request("GET", path_for("batch/v1", "jobs", namespace, job_name(name)))
        return status == 200 and (ftj.get("status") or {}).get("phase") and jobs == 200
    await eventually(done, timeout=timeout, interval=0.5, what=f"{name} reconciled")


@pytest.mark.parametrize("kind", ["client-certificate-data", "exec-token"])
async def test_operator_runs_with_a_kubeconfig(control_plane, kubetune_crds, namespace, tmp_path, kind):
    plane = control_plane
    if kind == "client-certificate-data":
        kubeconfig = inline(plane.client_kubeconfig(tmp_path / "op.kubeconfig", "kubetune-op", ["system:masters"]))
    else:
        account(plane, namespace, "op", cluster_role="cluster-admin")
        kubeconfig, _ = exec_kubeconfig(plane, tmp_path, {"token": plane.token_for(namespace, "op")})
    operator = start_operator(tmp_path / "operator.log", [namespace], kubeconfig=kubeconfig)
    try:
        kubectl_apply(plane, namespace, job("first"))
        await wait_reconciled(plane, namespace, "first")
    finally:
        operator.stop()
        if kind == "exec-token":
            plane.kubectl("delete", "clusterrolebinding", f"{namespace}-op")


async def test_operator_picks_up_a_rotated_service_account_token(control_plane, kubetune_crds, namespace, tmp_path):
    plane = control_plane
    account(plane, namespace, "op", cluster_role="cluster-admin")
    old = plane.token_for(namespace, "op")
    sa_dir = service_account_dir(tmp_path / "sa", plane, old)
    operator = start_operator(tmp_path / "operator.log", [namespace], service_account_dir=sa_dir, plane=plane)
    try:
        kubectl_apply(plane, namespace, job("before"))
        await wait_reconciled(plane, namespace, "before")
        recreate_account(plane, namespace, "op")
        await eventually(lambda: refused(plane, old), what="the old token refused")
        rotate_token(sa_dir, plane.token_for(namespace, "op"))
        kubectl_apply(plane, namespace, job("after"))
        await wait_reconciled(plane, namespace, "after")
        assert operator.process.poll() is None, operator.output()[-3000:]
    finally:
        operator.stop()
        plane.kubectl("delete", "clusterrolebinding", f"{namespace}-op")


# -- the trainer's progress channel ----------------------------------------------------------------------

async def test_trainer_progress_channel_picks_up_a_rotated_token(control_plane, namespace, tmp_path):
    plane = control_plane
    account(plane, namespace, "kubetune-trainer")
    plane.kubectl("create", "role", "trainer", "--verb=get,patch", "--resource=pods", "-n", namespace)
    plane.kubectl("create", "rolebinding", "trainer", "--role=trainer",
                  f"--serviceaccount={namespace}:kubetune-trainer", "-n", namespace)
    # A trainer pod that no node will run: only its identity matters (the token is bound to it).
    plane.kubectl("run", "trainer-0", "--image=kubetune/trainer", "-n", namespace, "--overrides", json.dumps(
        {"spec": {"serviceAccountName": "kubetune-trainer", "nodeSelector": {"kubetune.dev/no-such-node": "true"}}}))
    old = plane.token_for(namespace, "kubetune-trainer", pod="trainer-0")
    sa_dir = service_account_dir(tmp_path / "sa", plane, old)
    channel = PodAnnotationChannel(plane.url, namespace, "trainer-0", sa_dir / "token", sa_dir / "ca.crt")

    def progress() -> str | None:
        _, pod = plane.request("GET", path_for("v1", "pods", namespace, "trainer-0"))
        return (pod["metadata"].get("annotations") or {}).get("kubetune.dev/progress")

    channel.send('{"step":1}')
    assert progress() == '{"step":1}'
    recreate_account(plane, namespace, "kubetune-trainer")
    await eventually(lambda: refused(plane, old), what="the old token refused")
    rotate_token(sa_dir, plane.token_for(namespace, "kubetune-trainer", pod="trainer-0"))
    channel.send('{"step":2}')
    assert progress() == '{"step":2}'


# -- error bodies -------------------------------------------------------------------------------------------

async def test_a_plain_text_error_is_an_api_error_with_its_status(control_plane):
    """kube-apiserver answers paths outside its API with text ("404 page not found"), as proxies and
    size limits do: the client raises ApiError with the status, not a JSON error."""
    client = KubeClient(KubeConfig.from_kubeconfig(control_plane.admin_kubeconfig))
    try:
        with pytest.raises(ApiError) as raised:
            await client.create("/not-an-api", {})
    finally:
        await client.close()
    assert raised.value.status == 404 and "page not found" in str(raised.value)
