"""Who may do what through `kubetune api`, judged by kube-apiserver itself: bearer tokens are
ServiceAccount tokens from the TokenRequest API, the API asks TokenReview who they are and
SubjectAccessReview what they may do, and it runs with only the chart's RBAC for its own account.

A token of namespace A cannot read B's jobs or files, an unauthenticated call is 401, a caller
without rights is 403."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import openai
import pytest
import yaml

from kubetune.api import API_VERSION
from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.openai_api.local import SAMPLE_ENTRY, SAMPLE_MODEL, catalog_configmap
from kubetune.openai_api.server import Settings, make_service, serve
from kubetune_trainer.samples import invoice_records
from tests.chart.test_chart import CHART
from tests.chart.tools import ecosystem_tool
from tests.openai_api.conftest import without_token

API_ACCOUNT = "rel-kubetune-openai-api"  # the chart's name for it in release "rel"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
TENANT_RULES = [{"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs"],
                 "verbs": ["get", "list", "create", "update", "patch", "delete"]}]
DATA = "".join(json.dumps(r) + "\n" for r in invoice_records(8)).encode()


def apply(plane, docs: list[dict]) -> None:
    plane.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))


def chart_rbac(namespace: str) -> list[dict]:
    """The API's ServiceAccount and RBAC exactly as the chart renders them."""
    out = subprocess.run([ecosystem_tool("helm"), "template", "rel", str(CHART), "--namespace", namespace, "--set",
                          "openaiApi.enabled=true"], capture_output=True, text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d and d["kind"] in RBAC_KINDS
            and d["metadata"]["name"].startswith(API_ACCOUNT)]


def tenant(plane, namespace: str, account: str, *, rights: bool) -> str:
    """A ServiceAccount's token; with rights, a Role on FineTuneJobs in its namespace."""
    docs: list[dict] = [{"apiVersion": "v1", "kind": "ServiceAccount",
                         "metadata": {"name": account, "namespace": namespace}}]
    if rights:
        docs += [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                  "metadata": {"name": "fine-tuner", "namespace": namespace}, "rules": TENANT_RULES},
                 {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                  "metadata": {"name": f"fine-tuner-{account}", "namespace": namespace},
                  "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fine-tuner"},
                  "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]}]
    apply(plane, docs)
    return plane.token_for(namespace, account)


def client(port: int, token: str, namespace: str | None = None) -> openai.AsyncOpenAI:
    prefix = f"/namespaces/{namespace}" if namespace else ""
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}{prefix}/v1", api_key=token, max_retries=0)


@pytest.fixture
def namespaces(control_plane, kubetune_crds):
    """The API's own namespace and two tenants', deleted afterwards."""
    names = {k: f"{k}-{uuid.uuid4().hex[:8]}" for k in ("api", "a", "b")}
    for name in names.values():
        control_plane.kubectl("create", "namespace", name)
    yield names
    for name in names.values():
        control_plane.kubectl("delete", "namespace", name, "--wait=false")


async def test_tokens_and_rights_decide(control_plane, namespaces, s3_server):
    plane, api_ns, ns_a, ns_b = control_plane, namespaces["api"], namespaces["a"], namespaces["b"]
    catalog = catalog_configmap(api_ns, {SAMPLE_MODEL: SAMPLE_ENTRY})
    catalog["metadata"]["name"] = f"{API_ACCOUNT}-models"
    apply(plane, chart_rbac(api_ns) + [catalog])
    alice = tenant(plane, ns_a, "alice", rights=True)
    bob = tenant(plane, ns_b, "bob", rights=True)
    nobody = tenant(plane, ns_a, "nobody", rights=False)

    # The API as the chart runs it: its own ServiceAccount's token, nothing more.
    kube = KubeClient(KubeConfig(plane.url, plane.token_for(api_ns, API_ACCOUNT), str(plane.ca_file)))
    settings = Settings(files_uri=f"s3://files-{uuid.uuid4().hex[:8]}", output_uri="s3://runs",
                        catalog=f"{api_ns}/{API_ACCOUNT}-models", auth="kubernetes")
    service = make_service(settings, kube, s3_server.config)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, "127.0.0.1", 0, stop, started))
    try:
        port = await asyncio.wait_for(started, 10)
        as_alice = client(port, alice, ns_a)
        file = await as_alice.files.create(file=("a.jsonl", DATA), purpose="fine-tune")
        job = await as_alice.fine_tuning.jobs.create(model=SAMPLE_MODEL, training_file=file.id)
        created = await kube.get(path_for(API_VERSION, "finetunejobs", ns_a, job.id))
        assert created is not None and job.organization_id == ns_a
        # Without a prefix, a service account works in its own namespace.
        assert [j.id for j in (await client(port, alice).fine_tuning.jobs.list()).data] == [job.id]

        # B's token against A: 403 on every job and file call.
        as_bob_in_a = client(port, bob, ns_a)
        for call, args in ((as_bob_in_a.fine_tuning.jobs.list, ()), (as_bob_in_a.fine_tuning.jobs.retrieve, (job.id,)),
                           (as_bob_in_a.fine_tuning.jobs.cancel, (job.id,)), (as_bob_in_a.files.list, ()),
                           (as_bob_in_a.files.retrieve, (file.id,)), (as_bob_in_a.files.content, (file.id,)),
                           (as_bob_in_a.files.delete, (file.id,))):
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await call(*args)
            assert f"system:serviceaccount:{ns_b}:bob may not" in denied.value.body["message"]
        # In B, bob sees nothing of A's and A's ids do not resolve there.
        as_bob = client(port, bob)
        assert (await as_bob.files.list()).data == [] and (await as_bob.fine_tuning.jobs.list()).data == []
        with pytest.raises(openai.NotFoundError):
            await as_bob.files.retrieve(file.id)
        with pytest.raises(openai.NotFoundError):
            await as_bob.fine_tuning.jobs.retrieve(job.id)

        # A caller of A without rights there: 403, and nothing uploaded.
        as_nobody = client(port, nobody, ns_a)
        with pytest.raises(openai.PermissionDeniedError):
            await as_nobody.fine_tuning.jobs.list()
        with pytest.raises(openai.PermissionDeniedError):
            await as_nobody.files.create(file=("n.jsonl", DATA), purpose="fine-tune")

        # No token, or one the API server does not know (made up, or alice's with a broken signature): 401.
        status, answer = await without_token(f"http://127.0.0.1:{port}/namespaces/{ns_a}/v1/fine_tuning/jobs")
        assert (status, answer["error"]["type"]) == (401, "authentication_error")
        for token in ("not-a-token", alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")):
            with pytest.raises(openai.AuthenticationError):
                await client(port, token, ns_a).fine_tuning.jobs.list()
        assert [f.id for f in (await as_alice.files.list()).data] == [file.id]
    finally:
        stop.set()
        await task
        await kube.close()

    # The API's own account has only what it needs: no Secrets, no Jobs or pods, no other writes.
    account = f"system:serviceaccount:{api_ns}:{API_ACCOUNT}"
    for verb, resource in (("get", "secrets"), ("create", "jobs.batch"), ("delete", "finetunejobs.kubetune.dev"),
                           ("list", "pods"), ("get", "configmaps")):
        answer = plane.kubectl("auth", "can-i", verb, resource, "-n", ns_a, "--as", account, check=False)
        assert answer.stdout.strip() == "no", (verb, resource)
