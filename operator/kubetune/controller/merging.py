"""The merge Job of a LoraAdapter (spec.merge.enabled with no merged model yet): a pure builder, like
the training Job's. The trainer image's `merge-job` command does the work."""

from __future__ import annotations

import json
from typing import Any

from kubetune.api import LoraAdapter
from kubetune.api.meta import API_VERSION
from kubetune.api.uris import parse_uri
from kubetune.controller.jobs import (
    LABEL_MANAGED,
    MANAGER,
    SPEC_FILE,
    SPEC_MOUNT,
    derived_name,
    pod_env,
    pod_failure_policy,
    trainer_pod_spec,
)
from kubetune.controller.settings import OperatorSettings

LABEL_ADAPTER_OWNER = "kubetune.dev/loraadapter"


def merge_job_name(adapter: LoraAdapter | str) -> str:
    return derived_name(adapter if isinstance(adapter, str) else adapter.metadata.name, "merge")


def _labels(adapter: LoraAdapter) -> dict[str, str]:
    return {LABEL_MANAGED: MANAGER, LABEL_ADAPTER_OWNER: adapter.metadata.name,
            "app.kubernetes.io/name": "kubetune-merge"}


def _owner(adapter: LoraAdapter) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "LoraAdapter", "name": adapter.metadata.name,
            "uid": (adapter.metadata.model_extra or {}).get("uid", ""), "controller": True, "blockOwnerDeletion": True}


def build_merge_objects(adapter: LoraAdapter, settings: OperatorSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap with the merge spec, and the Job that runs it."""
    spec, name = adapter.spec, merge_job_name(adapter)
    meta = {"name": name, "namespace": adapter.metadata.namespace, "labels": _labels(adapter),
            "ownerReferences": [_owner(adapter)]}
    merge_spec = {"baseModel": spec.base_model.model_dump(by_alias=True, exclude_none=True),
                  "artifactUri": spec.artifact.uri}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                 "data": {SPEC_FILE: json.dumps(merge_spec, indent=2, sort_keys=True)}}
    claims: dict[str, bool] = {}
    for uri, writable in ((spec.base_model.uri, False), (spec.artifact.uri, True)):
        parsed = parse_uri(uri)
        if parsed.scheme == "pvc":
            claims[parsed.authority] = claims.get(parsed.authority, False) or writable
    limits: dict[str, Any] = {}
    if spec.merge.gpus:
        limits[settings.gpu_resource] = spec.merge.gpus
    if spec.merge.memory:
        limits["memory"] = spec.merge.memory
    pod = trainer_pod_spec(settings, image=settings.trainer_image,
                           args=["merge-job", "--spec", f"{SPEC_MOUNT}/{SPEC_FILE}"],
                           env=pod_env(settings, storage_secret=spec.storage.secret_ref.name if spec.storage else None),
                           resources={"limits": limits, "requests": dict(limits)} if limits else {},
                           configmap=name, claims=claims)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
           "spec": {"backoffLimit": 2, "podFailurePolicy": pod_failure_policy(), "completions": 1, "parallelism": 1,
                    "template": {"metadata": {"labels": _labels(adapter)}, "spec": pod}}}
    return configmap, job
