"""FineTuneJob -> the objects that run it: a ConfigMap with the run spec and a batch/v1 Job (for
several nodes an Indexed Job, one pod per node, and a headless Service for torchrun's rendezvous:
the pattern of JobSet and Kubeflow's trainer, with nothing but batch/v1 and v1).

Pure functions: the same FineTuneJob and settings always give the same manifests, so a restarted
operator computes the names of what it created before and adopts them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubetune.api.finetunejob import FineTuneJob, Tracking
from kubetune.api.meta import API_VERSION
from kubetune.api.uris import parse_uri
from kubetune.contract import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_PREEMPTED,
    MLFLOW_BASIC_AUTH_KEYS,
    MLFLOW_TOKEN_KEY,
    RENDEZVOUS_HOST_ENV,
    RENDEZVOUS_PORT,
)
from kubetune.controller.settings import OperatorSettings
from kubetune.storage.config import REQUIRED_KEYS, SECRET_KEYS

LABEL_JOB = "kubetune.dev/finetunejob"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGER = "kubetune"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # a WorkloadPriorityClass
KUEUE_API = "kueue.x-k8s.io/v1beta2"
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on the Workload Kueue makes for a Job
SPEC_MOUNT = "/etc/kubetune"
SPEC_FILE = "runspec.json"
SCRATCH = "/scratch"
TRAINER_UID = 65532


def derived_name(base: str, suffix: str) -> str:
    """base-suffix, shortened with a hash when over 63 characters (label-safe and deterministic)."""
    name = f"{base}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{base[: 63 - len(suffix) - 10]}-{digest}-{suffix}"


def job_name(ftj: FineTuneJob | str) -> str:
    return derived_name(ftj if isinstance(ftj, str) else ftj.metadata.name, "train")


def configmap_name(ftj: FineTuneJob | str) -> str:
    return derived_name(ftj if isinstance(ftj, str) else ftj.metadata.name, "spec")


def run_output_uri(ftj: FineTuneJob) -> str:
    """Each FineTuneJob writes under its own prefix; the uid keeps a re-created job of the same
    name from resuming the old one's checkpoints."""
    uid = str((ftj.metadata.model_extra or {}).get("uid", ""))[:8] or "local"
    return str(parse_uri(ftj.spec.output.uri).join(f"{ftj.metadata.name}-{uid}"))


def owner_reference(ftj: FineTuneJob) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "FineTuneJob", "name": ftj.metadata.name,
            "uid": (ftj.metadata.model_extra or {}).get("uid", ""), "controller": True,
            "blockOwnerDeletion": True}


def _labels(ftj: FineTuneJob) -> dict[str, str]:
    labels = {LABEL_MANAGED: MANAGER, LABEL_JOB: ftj.metadata.name, "app.kubernetes.io/name": "kubetune-trainer"}
    if ftj.spec.queue_name:
        labels[KUEUE_QUEUE_LABEL] = ftj.spec.queue_name
    if ftj.spec.workload_priority_class_name:
        labels[KUEUE_PRIORITY_LABEL] = ftj.spec.workload_priority_class_name
    return labels


def run_spec(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "spec": ftj.spec.model_dump(by_alias=True, mode="json", exclude_none=True),
        # What to run; where the pod's directories are comes from its environment (_env), so the
        # spec says nothing about the filesystem it lands on.
        "run": {"namespace": ftj.metadata.namespace or "default", "job_name": ftj.metadata.name,
                "output_uri": run_output_uri(ftj), "image": ftj.spec.trainer_image or settings.trainer_image},
    }


def build_configmap(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    # Only the spec and resolved locations: credentials never enter a ConfigMap.
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap_name(ftj), "namespace": ftj.metadata.namespace, "labels": _labels(ftj),
                     "ownerReferences": [owner_reference(ftj)]},
        "data": {SPEC_FILE: json.dumps(run_spec(ftj, settings), indent=2, sort_keys=True)},
    }


def _claims(ftj: FineTuneJob) -> dict[str, bool]:
    """PVC claims the pod mounts, and whether each must be writable (the output's)."""
    claims: dict[str, bool] = {}
    spec = ftj.spec
    for uri, writable in ((spec.base_model.uri, False), (spec.dataset.uri, False),
                          (spec.dataset.validation_uri, False), (spec.output.uri, True)):
        if uri is None:
            continue
        parsed = parse_uri(uri)
        if parsed.scheme == "pvc":
            claims[parsed.authority] = claims.get(parsed.authority, False) or writable
    return claims


def pod_env(settings: OperatorSettings, *, storage_secret: str | None, offline: bool = True) -> list[dict[str, Any]]:
    """What every trainer-image pod gets: its identity, its directories, offline hub settings and,
    when it uses the object store, the Secret's keys as references (never values)."""
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_VOLUME_ROOT", "value": settings.volume_root},
        {"name": "KUBETUNE_WORK_DIR", "value": f"{SCRATCH}/work"},
        {"name": "KUBETUNE_CACHE_DIR", "value": f"{SCRATCH}/cache"},
        {"name": "HOME", "value": f"{SCRATCH}/home"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/hf"},
        {"name": "TRITON_CACHE_DIR", "value": f"{SCRATCH}/triton"},
    ]
    env += [{"name": n, "value": "1" if offline else "0"}
            for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if storage_secret:
        for key, var in SECRET_KEYS.items():
            # Only references: the values stay in the Secret and reach the container at start.
            env.append({"name": var, "valueFrom": {"secretKeyRef": {
                "name": storage_secret, "key": key, "optional": key not in REQUIRED_KEYS}}})
    return env


def tracking_env(tracking: Tracking | None) -> list[dict[str, Any]]:
    """The MLflow credentials, as references to the Secret's keys, which MLflow's client reads from
    the environment. Each is optional: planning checked the Secret holds a token or a username and
    password (controller.secrets.check_tracking_secret), not which."""
    ref = tracking.mlflow.secret_ref if tracking else None
    if ref is None:
        return []
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key, "optional": True}}}
            for key in (MLFLOW_TOKEN_KEY, *MLFLOW_BASIC_AUTH_KEYS)]


def _env(ftj: FineTuneJob, settings: OperatorSettings) -> list[dict[str, Any]]:
    return pod_env(settings, storage_secret=ftj.spec.storage.secret_ref.name if ftj.spec.storage else None,
                   offline=not ftj.spec.allow_hub_downloads) + tracking_env(ftj.spec.tracking)


def _resources(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    r = ftj.spec.resources
    limits: dict[str, Any] = {}
    if r.gpus:
        limits[settings.gpu_resource] = r.gpus
    if r.cpu:
        limits["cpu"] = r.cpu
    if r.memory:
        limits["memory"] = r.memory
    return {"limits": limits, "requests": dict(limits)} if limits else {}


def pod_failure_policy() -> dict[str, Any]:
    return {"rules": [
        # A preempted trainer checkpointed and asked to be resumed: not a failure.
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                             "values": [EXIT_PREEMPTED]}},
        # Evictions, node drains and preemption by priority: not the trainer's fault either.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # A bad dataset or spec fails the same way every time: stop at once.
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": [EXIT_DATA, EXIT_CONFIG]}},
    ]}


def trainer_pod_spec(settings: OperatorSettings, *, image: str, args: list[str], env: list[dict[str, Any]],
                     resources: dict[str, Any], configmap: str, claims: dict[str, bool]) -> dict[str, Any]:
    """A restricted pod running the trainer image: the run spec mounted read-only, writable scratch
    and /dev/shm, the PVC claims (writable where asked)."""
    volumes: list[dict[str, Any]] = [
        {"name": "runspec", "configMap": {"name": configmap}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "runspec", "mountPath": SPEC_MOUNT, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH},
        {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    for index, (claim, writable) in enumerate(sorted(claims.items())):
        volumes.append({"name": f"pvc-{index}", "persistentVolumeClaim": {"claimName": claim,
                                                                          "readOnly": not writable}})
        mounts.append({"name": f"pvc-{index}", "mountPath": f"{settings.volume_root}/{claim}",
                       "readOnly": not writable})
    return {
        "restartPolicy": "Never",
        "serviceAccountName": settings.trainer_service_account,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID,
                            "fsGroup": TRAINER_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "trainer",
            "image": image,
            "args": args,
            "env": env,
            "resources": resources,
            "volumeMounts": mounts,
            "terminationMessagePolicy": "File",
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": volumes,
    }


def multi_node(ftj: FineTuneJob) -> bool:
    return ftj.spec.resources.nodes > 1


def build_rendezvous_service(ftj: FineTuneJob) -> dict[str, Any]:
    """Headless: gives each pod of the Indexed Job a DNS name (JOB-INDEX.JOB), pod 0's for rendezvous.
    Not-ready addresses are published: the ranks meet before any of them could be ready."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": job_name(ftj), "namespace": ftj.metadata.namespace, "labels": _labels(ftj),
                     "ownerReferences": [owner_reference(ftj)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"batch.kubernetes.io/job-name": job_name(ftj)},
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}]},
    }


def build_job(ftj: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    spec, r = ftj.spec, ftj.spec.resources
    pod_spec = trainer_pod_spec(settings, image=spec.trainer_image or settings.trainer_image,
                                args=["--spec", f"{SPEC_MOUNT}/{SPEC_FILE}"], env=_env(ftj, settings),
                                resources=_resources(ftj, settings), configmap=configmap_name(ftj),
                                claims=_claims(ftj))
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in r.tolerations]
    if r.affinity:
        pod_spec["affinity"] = r.affinity
    if r.priority_class_name:
        pod_spec["priorityClassName"] = r.priority_class_name
    if r.runtime_class_name:
        pod_spec["runtimeClassName"] = r.runtime_class_name
    parallel: dict[str, Any] = {"completions": 1, "parallelism": 1}
    if multi_node(ftj):
        # All pods at once (Kueue admits the Job's one pod set as a whole), each with its GPUs;
        # the completion index is torchrun's node rank.
        parallel = {"completionMode": "Indexed", "completions": r.nodes, "parallelism": r.nodes}
        pod_spec["subdomain"] = job_name(ftj)
        trainer = pod_spec["containers"][0]
        trainer["env"].append({"name": RENDEZVOUS_HOST_ENV, "value": f"{job_name(ftj)}-0.{job_name(ftj)}"})
        trainer["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    labels = _labels(ftj)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(ftj), "namespace": ftj.metadata.namespace, "labels": labels,
                     "ownerReferences": [owner_reference(ftj)]},
        "spec": {
            # Kueue admits a queued Job by unsuspending it; a suspended FineTuneJob starts suspended.
            "suspend": bool(spec.queue_name) or spec.suspend,
            "backoffLimit": spec.backoff_limit,
            "podFailurePolicy": pod_failure_policy(),
            **parallel,
            "template": {"metadata": {"labels": {k: v for k, v in labels.items()
                                                  if k not in (KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL)}},
                         "spec": pod_spec},
        },
    }
