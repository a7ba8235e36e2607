"""The Jobs a LoraAdapter runs from the trainer image, pure builders like the training Job's: the merge
Job (spec.merge.enabled with no merged model yet; `merge-job`) and the verification Job that hashes
the artifact's content (`verify-job`)."""

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
MERGE_APP, VERIFY_APP = "kubetune-merge", "kubetune-verify"  # app.kubernetes.io/name of their pods


def merge_job_name(adapter: LoraAdapter | str) -> str:
    return derived_name(adapter if isinstance(adapter, str) else adapter.metadata.name, "merge")


def verify_job_name(adapter: str, fingerprint: str) -> str:
    """One name per adapter and artifact state: a restarted operator adopts the Job it started, and
    an artifact rewritten since gets a Job of its own."""
    return derived_name(adapter, f"verify-{fingerprint[:8]}")


def _labels(adapter: LoraAdapter, app: str) -> dict[str, str]:
    return {LABEL_MANAGED: MANAGER, LABEL_ADAPTER_OWNER: adapter.metadata.name, "app.kubernetes.io/name": app}


def _owner(adapter: LoraAdapter) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "LoraAdapter", "name": adapter.metadata.name,
            "uid": (adapter.metadata.model_extra or {}).get("uid", ""), "controller": True, "blockOwnerDeletion": True}


def _adapter_job(adapter: LoraAdapter, settings: OperatorSettings, *, name: str, app: str, command: str,
                 job_spec: dict[str, Any], resources: dict[str, Any],
                 claims: dict[str, bool]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ConfigMap holding job_spec, and the Job, owned by the adapter, that runs the trainer
    image's `command --spec` on it."""
    meta = {"name": name, "namespace": adapter.metadata.namespace, "labels": _labels(adapter, app),
            "ownerReferences": [_owner(adapter)]}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                 "data": {SPEC_FILE: json.dumps(job_spec, indent=2, sort_keys=True)}}
    storage = adapter.spec.storage
    pod = trainer_pod_spec(settings, image=settings.trainer_image,
                           args=[command, "--spec", f"{SPEC_MOUNT}/{SPEC_FILE}"],
                           env=pod_env(settings, storage_secret=storage.secret_ref.name if storage else None),
                           resources=resources, configmap=name, claims=claims)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
           "spec": {"backoffLimit": 2, "podFailurePolicy": pod_failure_policy(), "completions": 1, "parallelism": 1,
                    "template": {"metadata": {"labels": _labels(adapter, app)}, "spec": pod}}}
    return configmap, job


def build_merge_objects(adapter: LoraAdapter, settings: OperatorSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap with the merge spec, and the Job that runs it."""
    spec = adapter.spec
    merge_spec: dict[str, Any] = {"baseModel": spec.base_model.model_dump(by_alias=True, exclude_none=True),
                                  "artifactUri": spec.artifact.uri}
    if spec.merge.dtype:
        merge_spec["dtype"] = spec.merge.dtype
    if spec.merge.gguf:
        merge_spec |= {"gguf": spec.merge.gguf, "name": spec.adapter_name or adapter.metadata.name}
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
    return _adapter_job(adapter, settings, name=merge_job_name(adapter), app=MERGE_APP, command="merge-job",
                        job_spec=merge_spec, resources={"limits": limits, "requests": dict(limits)} if limits else {},
                        claims=claims)


def build_verify_objects(adapter: LoraAdapter, settings: OperatorSettings, manifest_sha256: str,
                         fingerprint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap and Job that hash the content of the artifact whose manifest (manifest_sha256)
    and listing (fingerprint) the operator checked. CPU only and small: it streams each object
    through sha256, so it needs a share of a core and a few MiB, not the artifact's size."""
    verify_spec = {"artifactUri": adapter.spec.artifact.uri, "manifestSha256": manifest_sha256,
                   "fingerprint": fingerprint}
    return _adapter_job(adapter, settings, name=verify_job_name(adapter.metadata.name, fingerprint), app=VERIFY_APP,
                        command="verify-job", job_spec=verify_spec, claims={},
                        resources={"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}})
