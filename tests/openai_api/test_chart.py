"""The chart's optional OpenAI API: off by default; on, valid Kubernetes objects, a restricted pod
whose arguments the CLI accepts, a catalog the server parses, and RBAC that is only what it needs."""

from __future__ import annotations

import kubernetes_validate

from kubetune.cli import build_parser
from kubetune.openai_api.catalog import parse_catalog
from tests.chart.test_chart import objects

ON = ("openaiApi.enabled=true", "openaiApi.catalog.smol.baseModel.uri=s3://models/smollm2",
      "openaiApi.catalog.smol.defaults.method=lora", "openaiApi.catalog.smol.defaults.resources.gpus=0")


def api_objects(*sets: str) -> list[dict]:
    return [d for d in objects(*sets) if "openai-api" in d["metadata"]["name"]]


def test_off_by_default():
    assert api_objects() == []


def test_on_renders_valid_objects_the_server_accepts():
    docs = api_objects(*ON)
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Role",
                                               "RoleBinding", "Service", "ServiceAccount"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33", strict=True)
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    args = build_parser().parse_args(container["args"])
    assert (args.auth, args.catalog, args.storage_secret) == ("kubernetes", "kubetune/rel-kubetune-openai-api-models",
                                                             "kubetune-minio")
    catalog = next(d for d in docs if d["kind"] == "ConfigMap")
    assert f"{catalog['metadata']['namespace']}/{catalog['metadata']['name']}" == args.catalog
    entry = parse_catalog(catalog, args.catalog)["smol"]
    assert entry.base_model.uri == "s3://models/smollm2" and entry.defaults["resources"] == {"gpus": 0}


def test_rbac_is_what_the_api_does_and_no_more():
    rules = {(group, resource): tuple(rule["verbs"])
             for doc in api_objects(*ON) if doc["kind"] in ("Role", "ClusterRole")
             for rule in doc["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rules == {("authentication.k8s.io", "tokenreviews"): ("create",),
                     ("authorization.k8s.io", "subjectaccessreviews"): ("create",),
                     ("kubetune.dev", "finetunejobs"): ("get", "list", "create", "patch"),
                     ("", "events"): ("list",), ("", "configmaps"): ("get",)}
    role = next(d for d in api_objects(*ON) if d["kind"] == "Role")
    assert role["rules"][0]["resourceNames"] == ["rel-kubetune-openai-api-models"]
