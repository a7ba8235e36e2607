"""The operator image, run as an image (tests/images/image.py): its entrypoint answers, it runs as
its non-root user on a read-only root, and it reconciles a FineTuneJob against the local API server
over HTTP, as it would against a cluster's."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import urllib.request

import kmock

from kubetune.api import FineTuneJob, LoraAdapter
from kubetune.api.crd import build_crd
from kubetune.controller.jobs import job_name
from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.local.apiserver import ApiServer
from kubetune.local.stack import write_kubeconfig
from tests.support import eventually, minimal_job

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def test_operator_image_answers_help_as_its_non_root_user(operator_image):
    assert operator_image.args == ["kubetune", "operator"] and operator_image.uid == 65532
    done = subprocess.run(operator_image.command([*operator_image.args, "--help"]), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--standalone" in done.stdout and "--peering" in done.stdout
    who = subprocess.run(operator_image.command(["sh", "-c", "id -u; touch /opt/x"]), capture_output=True,
                         text=True, timeout=60)
    assert who.stdout.split() == ["65532"] and "Read-only file system" in who.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


async def test_operator_image_reconciles_a_finetunejob_on_the_local_api_server(operator_image, shared_tmp):
    work = shared_tmp
    health = f"http://127.0.0.1:{_free_port()}/healthz"
    async with ApiServer() as api, kmock.Server(api) as server:
        url = str(server.url).rstrip("/")
        write_kubeconfig(work / "kubeconfig", url)
        (work / "kubeconfig").chmod(0o644)
        client = KubeClient(KubeConfig(server=url))
        for kind in (FineTuneJob, LoraAdapter):
            await client.create(CRDS, build_crd(kind))
        log = open(work / "operator.log", "wb")
        # The chart's arguments, less peering (one replica here) and with a reachable health port.
        operator = await asyncio.create_subprocess_exec(
            *operator_image.command([*operator_image.args, "--standalone", "--namespace=default",
                                     f"--liveness={health.replace('127.0.0.1', '0.0.0.0')}"],
                                    env={"KUBECONFIG": "/tmp/kube/kubeconfig",
                                         "KUBETUNE_TRAINER_IMAGE": "registry.local/kubetune/trainer:0.1.0"},
                                    binds={work: "/tmp/kube"}),
            stdout=log, stderr=subprocess.STDOUT)
        try:
            await eventually(lambda: asyncio.to_thread(_healthy, health), timeout=120, what="the operator's /healthz")
            await client.create(path_for("kubetune.dev/v1alpha1", "finetunejobs", "default"), minimal_job())

            job = await eventually(lambda: client.get(path_for("batch/v1", "jobs", "default", job_name("job"))),
                                   timeout=60, what="the batch Job the operator creates")
            container = job["spec"]["template"]["spec"]["containers"][0]
            assert container["image"] == "registry.local/kubetune/trainer:0.1.0"
            ftj = await client.get(path_for("kubetune.dev/v1alpha1", "finetunejobs", "default", "job"))
            validated = next(c for c in ftj["status"]["conditions"] if c["type"] == "Validated")
            assert validated["status"] == "True"
        finally:
            operator.terminate()
            await asyncio.wait_for(operator.wait(), 30)
            await client.close()
            log.close()
    output = (work / "operator.log").read_text()
    assert "Traceback" not in output, output[-3000:]
