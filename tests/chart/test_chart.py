"""The Helm chart, rendered by helm itself (built from helm.sh/helm/v4 by scripts/ecosystem-tools): lint, every object valid against
Kubernetes' schemas, restricted pods, least-privilege RBAC, values checked by values.schema.json."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.chart.tools import ecosystem_tool

CHART = Path(__file__).resolve().parents[2] / "charts" / "kubetune"
CUSTOM_KINDS = {"ServiceMonitor", "KopfPeering", "ClusterKopfPeering"}  # no schema of theirs in kubernetes-validate


def render(*sets: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [ecosystem_tool("helm"), "template", "rel", str(CHART), "--namespace", "kubetune"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)


def objects(*sets: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(render(*sets).stdout) if d]


VARIANTS = {
    "defaults": (),
    "namespaced": ("watch.namespaces={team-a,team-b}",),
    "mirror+monitoring": ("image.registry=mirror.local:5000", "trainerImage.registry=mirror.local:5000",
                          "imagePullSecrets[0].name=mirror", "metrics.serviceMonitor.enabled=true"),
    "evaluation-minio": ("minio.enabled=true", "minio.rootPassword=change-me-123", "storage.createSecret=true"),
}


def test_helm_is_the_release_pinned_in_ecosystem():
    pinned = next(line.split()[-1] for line in (CHART.parents[1] / "ecosystem" / "helm" / "go.mod").read_text().splitlines()
                  if line.strip().startswith(("require helm.sh/helm/", "helm.sh/helm/")))
    done = subprocess.run([ecosystem_tool("helm"), "version", "--template", "{{.Version}}"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == pinned


def test_lint():
    done = subprocess.run([ecosystem_tool("helm"), "lint", str(CHART), "--strict"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_every_object_is_valid_kubernetes(variant):
    docs = objects(*VARIANTS[variant])
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "Service"} <= kinds
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, "1.33", strict=True)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_pods_are_restricted(variant):
    for doc in objects(*VARIANTS[variant]):
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_operator_deployment_runs_replicas_with_peering_and_probes():
    deployment = next(d for d in objects() if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert "--peering=rel-kubetune" in container["args"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"]["value"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert any(d["kind"] == "ClusterKopfPeering" and d["metadata"]["name"] == "rel-kubetune" for d in objects())


def test_mirror_overrides_reach_every_image():
    docs = objects(*VARIANTS["mirror+monitoring"])
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("mirror.local:5000/")
    assert {e["name"]: e.get("value") for e in container["env"]}["KUBETUNE_TRAINER_IMAGE"].startswith("mirror.local:5000/")
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "mirror"}]
    assert any(d["kind"] == "ServiceMonitor" for d in docs)


def test_rbac_is_least_privilege():
    for variant in ("defaults", "namespaced"):
        for doc in objects(*VARIANTS[variant]):
            for rule in doc.get("rules", []) if doc["kind"] in ("Role", "ClusterRole") else []:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
                if "secrets" in rule["resources"]:
                    assert rule["verbs"] == ["get"]  # reads the storage Secret it is pointed at, never lists them
    namespaced = objects(*VARIANTS["namespaced"])
    roles = {(d["kind"], d["metadata"].get("namespace")) for d in namespaced if d["kind"] in ("Role", "ClusterRole")}
    assert ("Role", "team-a") in roles and ("Role", "team-b") in roles
    cluster_role = next(d for d in namespaced if d["kind"] == "ClusterRole")
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {"customresourcedefinitions", "namespaces"}
    trainer = next(d for d in namespaced if d["kind"] == "Role" and d["metadata"]["name"] == "kubetune-trainer")
    assert trainer["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]


@pytest.mark.parametrize("bad,complaint", [
    ("replicas=two", "replicas"),
    ("watch.namespaces={Team_A}", "namespaces"),
    ("metrics.port=0", "port"),
    ("operator.unknown=1", "unknown"),
])
def test_values_are_checked_by_the_schema(bad, complaint):
    done = render(bad, check=False)
    assert done.returncode != 0 and complaint in done.stderr


def test_evaluation_minio_needs_a_password_and_wires_the_secret():
    done = render("minio.enabled=true", check=False)
    assert done.returncode != 0 and "minio.rootPassword is required" in done.stderr
    secret = next(d for d in objects(*VARIANTS["evaluation-minio"])
                  if d["kind"] == "Secret" and d["metadata"]["name"] == "kubetune-minio")
    assert secret["stringData"]["endpoint"] == "http://rel-kubetune-minio.kubetune.svc:9000"
    assert secret["stringData"]["accessKey"] == "kubetune"
