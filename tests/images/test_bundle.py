"""`kubetune bundle`: what it writes, that its checksums hold (checked by sha256sum itself), that it
refuses to overwrite, and, with the built operator image (opt-in, tests/images/image.py), an install
from the bundle alone: the image loaded into a private registry on 127.0.0.1 with `skopeo copy`,
pulled back from it, and run as the bundled chart's Deployment says, against an API server that has
only the bundle's CRDs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import subprocess
import tarfile
import urllib.request
from pathlib import Path

import kmock
import pytest
import yaml

from kubetune.bundle import verify_bundle
from kubetune.cli import main
from kubetune.controller.jobs import job_name
from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.local.apiserver import ApiServer
from kubetune.local.stack import write_kubeconfig
from tests.chart.tools import ecosystem_tool
from tests.images.image import REPO, VERSION, layout, unpack
from tests.support import eventually, minimal_job

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


def _tiny_layout(path: Path) -> Path:
    """A real, small OCI image (one layer with one file) tagged with the project's version."""
    subprocess.run(["umoci", "init", "--layout", str(path)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{path}:{VERSION}"], check=True)
    (path.parent / "hello").write_text("hello\n")
    subprocess.run(["umoci", "insert", "--image", f"{path}:{VERSION}", str(path.parent / "hello"), "/hello"],
                   check=True, capture_output=True)
    return path


def _bundle(out: Path, images_from: Path, *extra: str) -> int:
    return main(["bundle", str(out), "--root", str(REPO), "--images-from", str(images_from), "--image", "operator",
                 "--helm", ecosystem_tool("helm"), *extra])


def _digest(layout_dir: Path) -> str:
    return json.loads((layout_dir / "index.json").read_text())["manifests"][0]["digest"]


def test_bundle_holds_images_chart_crds_and_models_with_checksums(tmp_path):
    images = tmp_path / "images"
    _tiny_layout(images / "operator")
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "bundle"

    assert _bundle(out, images, "--model", str(model)) == 0

    assert out.stat().st_mode & 0o777 == 0o755
    index = json.loads((out / "bundle.json").read_text())
    assert index["version"] == VERSION
    assert index["images"] == [{"name": "operator", "archive": "images/operator.oci.tar",
                                "reference": f"ghcr.io/kubetune/operator:{VERSION}",
                                "digest": _digest(images / "operator")}]
    with tarfile.open(out / index["chart"]) as chart:
        packaged = yaml.safe_load(chart.extractfile("kubetune/Chart.yaml"))
        assert "kubetune/crds/finetunejobs.kubetune.dev.yaml" in chart.getnames()
    assert packaged["version"] == yaml.safe_load((REPO / "charts/kubetune/Chart.yaml").read_text())["version"]
    assert sorted(index["crds"]) == sorted(f"crds/{p.name}" for p in (REPO / "crds").glob("*.yaml"))
    for crd in index["crds"]:
        assert (out / crd).read_bytes() == (REPO / crd).read_bytes()
    assert index["models"] == [{"name": "tiny-model", "dir": "models/tiny-model",
                                "manifest": "models/tiny-model.manifest.json", "files": 2, "size": 16384 + len(
                                    (model / "config.json").read_bytes())}]
    manifest = json.loads((out / "models/tiny-model.manifest.json").read_text())
    assert manifest["kind"] == "ModelManifest" and manifest["model"]["modelType"] == "llama"
    assert {f["path"] for f in manifest["files"]} == {"config.json", "model.safetensors"}
    # The archive is an image skopeo reads back with the layout's digest.
    inspected = subprocess.run(["skopeo", "inspect", "--raw", f"oci-archive:{out / 'images/operator.oci.tar'}"],
                               capture_output=True, check=True).stdout
    assert f"sha256:{hashlib.sha256(inspected).hexdigest()}" == _digest(images / "operator")

    checked = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert verify_bundle(out) == []
    with (out / "models/tiny-model/model.safetensors").open("r+b") as f:
        f.write(b"\xff")
    (out / "stray.txt").write_text("not carried\n")
    assert verify_bundle(out) == ["models/tiny-model/model.safetensors: sha256 mismatch", "stray.txt: not in SHA256SUMS"]
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out, capture_output=True).returncode == 1


def test_bundle_refuses_bad_inputs_and_keeps_what_exists(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    assert _bundle(out, images, "--model", str(tmp_path)) == 1
    error = capsys.readouterr().err
    assert f"{out}: exists" in error
    assert f"{images / 'operator'}: no OCI layout of the operator image tagged {VERSION}" in error
    assert f"{tmp_path}: not a transformers model directory: no config.json" in error
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path):
    """Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1: the private
    registry of an air-gapped site."""
    binary = shutil.which("docker-registry")
    assert binary, "Debian's docker-registry is needed: apt-get install docker-registry (scripts/test does)"
    port = _free_port()
    config = tmp_path / "registry.yml"
    config.write_text(yaml.safe_dump({"version": 0.1, "log": {"level": "warn"},
                                      "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}},
                                      "http": {"addr": f"127.0.0.1:{port}"}}))
    server = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"127.0.0.1:{port}"
    server.terminate()
    server.wait(30)


def _registry_up(host: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}/v2/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


async def test_install_from_the_bundle_through_a_private_registry(tmp_path, registry, shared_tmp):
    source = layout("operator")  # opt-in: the built operator image
    out = tmp_path / "bundle"
    assert _bundle(out, source.parent) == 0
    index = json.loads((out / "bundle.json").read_text())
    await eventually(lambda: asyncio.to_thread(_registry_up, registry), timeout=30, what="the registry")

    # What docs/air-gapped.md says: skopeo copy from the archive into the private registry.
    target = f"{registry}/kubetune/operator:{VERSION}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci-archive:{out / 'images/operator.oci.tar'}", f"docker://{target}"], check=True, timeout=600)
    pushed = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{target}"],
                                       capture_output=True, check=True, text=True).stdout)
    assert pushed["Digest"] == index["images"][0]["digest"]

    # The chart from the bundle, pointed at the registry: the Deployment names the pushed image.
    rendered = subprocess.run([ecosystem_tool("helm"), "template", "kubetune", str(out / index["chart"]),
                               "--namespace", "kubetune", "--set", f"image.registry={registry}",
                               "--set", f"trainerImage.registry={registry}"],
                              capture_output=True, text=True, check=True).stdout
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == target

    # A node pulls it from the registry; it runs as the Deployment says (its arguments and plain env;
    # peering off: the emulator serves one replica), against an API server holding the bundle's CRDs.
    pulled = shared_tmp / "pulled"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{container['image']}",
                    f"oci:{pulled}:{VERSION}"], check=True, timeout=600)
    image = unpack(pulled, shared_tmp / "unpacked")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    port = _free_port()
    args = [a for a in container["args"] if not a.startswith(("--peering", "--liveness"))]
    args += ["--standalone", "--namespace=default", f"--liveness=http://0.0.0.0:{port}/healthz"]
    async with ApiServer() as api, kmock.Server(api) as server:
        url = str(server.url).rstrip("/")
        write_kubeconfig(shared_tmp / "kubeconfig", url)
        (shared_tmp / "kubeconfig").chmod(0o644)
        client = KubeClient(KubeConfig(server=url))
        for crd in index["crds"]:
            for body in yaml.safe_load_all((out / crd).read_text()):
                if body and body["spec"]["group"] == "kubetune.dev":
                    await client.create(CRDS, body)
        log = open(shared_tmp / "operator.log", "wb")
        operator = await asyncio.create_subprocess_exec(
            *image.command([image.args[0], *args], env={**env, "KUBECONFIG": "/tmp/kube/kubeconfig"},
                           binds={shared_tmp: "/tmp/kube"}),
            stdout=log, stderr=subprocess.STDOUT)
        try:
            await client.create(path_for("kubetune.dev/v1alpha1", "finetunejobs", "default"), minimal_job())
            job = await eventually(lambda: client.get(path_for("batch/v1", "jobs", "default", job_name("job"))),
                                   timeout=120, what="the batch Job the operator creates")
            assert job["spec"]["template"]["spec"]["containers"][0]["image"] == f"{registry}/kubetune/trainer:{VERSION}"
        finally:
            if operator.returncode is None:
                operator.terminate()
            await asyncio.wait_for(operator.wait(), 30)
            await client.close()
            log.close()
    assert "Traceback" not in (shared_tmp / "operator.log").read_text()
