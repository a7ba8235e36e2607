"""Ready-to-apply serving manifests for a verified LoraAdapter, built from its spec and status:
a vLLM Deployment and Service, a KServe InferenceService, an AIBrix ModelAdapter, an Ollama Job.

The copies from the object store are made by `kubetune adapters pull` in the operator's image,
with the adapter's storage Secret as its environment: one downloader, checking every file's
sha256 against the run manifest, for all targets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune import __version__
from kubetune.serving.publication import BASE_DIR, MODELS_DIR
from kubetune.storage.config import REQUIRED_KEYS, SECRET_KEYS

TARGETS = ("vllm", "kserve", "aibrix", "ollama")
VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"  # the release whose rules ServingCompatible applies
OLLAMA_IMAGE = "ollama/ollama:0.12.3"
PULLER_IMAGE = f"ghcr.io/kubetune/operator:{__version__}"
VLLM_PORT = 8000


class NotServable(ValueError):
    """The adapter has not published what the manifest needs (not verified yet, no GGUF files)."""


@dataclass(frozen=True)
class ServeSource:
    """What every target needs, from a LoraAdapter's spec and status."""

    name: str  # the adapter name requests select
    namespace: str
    artifact_uri: str
    adapter_uri: str
    base_model_uri: str
    base_dir: str
    adapter_dir: str
    max_lora_rank: int
    storage_secret: str | None
    ollama_modelfile: str | None  # set when the run (or a merge Job) exported GGUF files
    ollama_copy: list[str]  # the pulls that put them there, as status.serving.ollama says

    @classmethod
    def from_adapter(cls, adapter: dict[str, Any]) -> ServeSource:
        meta, spec, status = adapter["metadata"], adapter.get("spec") or {}, adapter.get("status") or {}
        vllm = (status.get("serving") or {}).get("vllm")
        where = f"LoraAdapter {meta.get('namespace', 'default')}/{meta['name']}"
        if not vllm:
            raise NotServable(f"{where} has no status.serving.vllm yet: it is published once its artifact verifies")
        if vllm.get("maxLoraRank") is None:
            raise NotServable(f"{where}: its LoRA rank is unknown (see its ServingCompatible condition)")
        ollama = (status.get("serving") or {}).get("ollama") or {}
        return cls(name=vllm["adapterName"], namespace=meta.get("namespace", "default"),
                   artifact_uri=spec["artifact"]["uri"], adapter_uri=vllm["adapterUri"],
                   base_model_uri=vllm["baseModelUri"], base_dir=vllm["baseDir"], adapter_dir=vllm["adapterDir"],
                   max_lora_rank=vllm["maxLoraRank"],
                   storage_secret=((spec.get("storage") or {}).get("secretRef") or {}).get("name"),
                   ollama_modelfile=ollama.get("modelfile"), ollama_copy=list(ollama.get("copy") or []))

    @property
    def base_is_stored(self) -> bool:
        return not self.base_model_uri.startswith("hf://")


def _storage_env(secret: str | None) -> list[dict[str, Any]]:
    # References only, as the operator's own Jobs take them: the values stay in the Secret.
    return [{"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key,
                                                         "optional": key not in REQUIRED_KEYS}}}
            for key, var in SECRET_KEYS.items()] if secret else []


# The pull container (kubetune's own image, uid 65532) meets the "restricted" Pod Security Standard.
# vLLM's and Ollama's images run as root and write under their home directories, so their containers
# keep their user but drop every capability and privilege escalation.
NO_PRIVILEGE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED = {**NO_PRIVILEGE, "runAsNonRoot": True, "readOnlyRootFilesystem": True}


def _pull(src: ServeSource, pulls: list[str]) -> dict[str, Any]:
    """The init container running `kubetune adapters pull` commands into /models."""
    return {"name": "pull", "image": PULLER_IMAGE, "command": ["sh", "-c", " && ".join(pulls)],
            "env": _storage_env(src.storage_secret), "securityContext": RESTRICTED,
            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}]}


def _pull_adapter(src: ServeSource) -> dict[str, Any]:
    """Copies the base (if stored) and the adapter's files for vLLM."""
    pulls = [f"kubetune adapters pull {src.artifact_uri} {MODELS_DIR}/{src.name} --only adapter"]
    if src.base_is_stored:
        pulls.insert(0, f"kubetune adapters pull {src.base_model_uri} {BASE_DIR}")
    return _pull(src, pulls)


def _labels(src: ServeSource) -> dict[str, str]:
    return {"app.kubernetes.io/name": f"vllm-{src.name}", "kubetune.dev/adapter": src.name}


def vllm_args(src: ServeSource) -> list[str]:
    return [src.base_dir, "--enable-lora", "--max-lora-rank", str(src.max_lora_rank),
            "--lora-modules", f"{src.name}={src.adapter_dir}", "--port", str(VLLM_PORT)]


def vllm_manifests(src: ServeSource, *, gpus: int = 1) -> list[dict[str, Any]]:
    """A Deployment running `vllm serve` with the adapter, and a Service in front of it."""
    name, labels = f"vllm-{src.name}", _labels(src)
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": src.namespace, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "initContainers": [_pull_adapter(src)],
                "containers": [{
                    "name": "vllm", "image": VLLM_IMAGE, "command": ["vllm", "serve"], "args": vllm_args(src),
                    "ports": [{"name": "http", "containerPort": VLLM_PORT}],
                    "resources": {"limits": {"nvidia.com/gpu": gpus}},
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
                    "securityContext": NO_PRIVILEGE,
                    "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR},
                                     {"name": "shm", "mountPath": "/dev/shm"}],  # NCCL and the tokenizer pool
                }],
                "volumes": [{"name": "models", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory"}}],
            }}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": src.namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return [deployment, service]


def kserve_manifests(src: ServeSource, *, gpus: int = 1) -> list[dict[str, Any]]:
    """An InferenceService on KServe's Hugging Face runtime (vLLM backend) with the same LoRA args;
    the copies are made by the same init container, so no storageUri (and no KServe S3 setup)."""
    return [{
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": {"name": src.name, "namespace": src.namespace, "labels": {"kubetune.dev/adapter": src.name}},
        "spec": {"predictor": {
            "initContainers": [_pull_adapter(src)],
            "model": {
                "modelFormat": {"name": "huggingface"},
                "args": [f"--model_name={src.name}", f"--model_dir={src.base_dir}", "--backend=vllm",
                         "--enable-lora", f"--max-lora-rank={src.max_lora_rank}",
                         f"--lora-modules={src.name}={src.adapter_dir}"],
                "resources": {"limits": {"nvidia.com/gpu": gpus}},
                "securityContext": NO_PRIVILEGE,
                "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}],
            },
            "volumes": [{"name": "models", "emptyDir": {}}],
        }},
    }]


def dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not label:
        raise ValueError(f"{text!r} gives no DNS label: pass --base-name")
    return label


# AIBrix's runtime sidecar downloads s3:// artifacts with boto3 and reads exactly these keys of the
# Secret the controller hands it (aibrix python/aibrix/aibrix/runtime/downloaders.py), none of which
# kubetune's storage Secret has; it passes boto3 no endpoint, so a MinIO endpoint has to reach it as
# the sidecar's AWS_ENDPOINT_URL.
AIBRIX_SECRET_KEYS = {"accessKey": "aws_access_key_id", "secretKey": "aws_secret_access_key", "region": "aws_region"}


def aibrix_secret_note(secret: str, namespace: str) -> str:
    """How to make the Secret the ModelAdapter names from kubetune's storage Secret."""
    literal = " ".join(f"--from-literal={theirs}=\"$(kubectl get secret {secret} -n {namespace} "
                       f"-o jsonpath='{{.data.{ours}}}' | base64 -d)\"" for ours, theirs in AIBRIX_SECRET_KEYS.items())
    return (f"AIBrix reads {', '.join(AIBRIX_SECRET_KEYS.values())} from Secret {secret}-aibrix; make it from "
            f"{secret} (again after a rotation) with: kubectl create secret generic {secret}-aibrix -n {namespace} "
            f"{literal} --dry-run=client -o yaml | kubectl apply -f -. A non-AWS "
            "endpoint (MinIO) must also reach AIBrix's runtime container as AWS_ENDPOINT_URL.")


def aibrix_manifests(src: ServeSource, *, base_name: str | None = None) -> list[dict[str, Any]]:
    """An AIBrix ModelAdapter: AIBrix loads the adapter from its S3 location into the pods serving
    the base model (labelled model.aibrix.ai/name=BASE), with credentials from a Secret holding the
    keys AIBrix reads (aibrix_secret_note says how to make it from the storage Secret)."""
    base = base_name or dns_label(src.base_model_uri.rstrip("/").rsplit("/", 1)[-1])
    spec: dict[str, Any] = {
        "baseModel": base,
        "podSelector": {"matchLabels": {"model.aibrix.ai/name": base}},
        "artifactURL": src.adapter_uri,
        "schedulerName": "default",
    }
    if src.storage_secret:
        spec["credentialsSecretRef"] = {"name": f"{src.storage_secret}-aibrix"}
    return [{"apiVersion": "model.aibrix.ai/v1alpha1", "kind": "ModelAdapter",
             "metadata": {"name": src.name, "namespace": src.namespace,
                          "labels": {"model.aibrix.ai/name": src.name, "kubetune.dev/adapter": src.name}},
             "spec": spec}]


def ollama_manifests(src: ServeSource, *, claim: str = "ollama-models") -> list[dict[str, Any]]:
    """A Job that pulls the run's GGUF files and runs `ollama create` from their Modelfile into the
    claim an Ollama server keeps its models on."""
    if not src.ollama_modelfile:
        raise NotServable(f"adapter {src.name}: no GGUF files were exported (output.gguf, or merge.gguf)")
    # `ollama create` talks to a server: one runs in the container until the model is created.
    create = (f"ollama serve & until ollama list >/dev/null 2>&1; do sleep 1; done; "
              f"ollama create {src.name} -f {src.ollama_modelfile}")
    return [{
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": f"ollama-create-{src.name}", "namespace": src.namespace,
                     "labels": {"kubetune.dev/adapter": src.name}},
        "spec": {"backoffLimit": 2, "template": {"spec": {
            "restartPolicy": "Never",
            "initContainers": [_pull(src, src.ollama_copy)],
            "containers": [{"name": "create", "image": OLLAMA_IMAGE, "command": ["sh", "-c", create],
                            "env": [{"name": "OLLAMA_MODELS", "value": "/ollama/models"}],
                            "securityContext": NO_PRIVILEGE,
                            "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR},
                                             {"name": "ollama", "mountPath": "/ollama"}]}],
            "volumes": [{"name": "models", "emptyDir": {}},
                        {"name": "ollama", "persistentVolumeClaim": {"claimName": claim}}],
        }}},
    }]


def serve_manifests(adapter: dict[str, Any], target: str, **options: Any) -> list[dict[str, Any]]:
    src = ServeSource.from_adapter(adapter)
    builders: dict[str, Callable[..., list[dict[str, Any]]]] = {
        "vllm": vllm_manifests, "kserve": kserve_manifests, "aibrix": aibrix_manifests, "ollama": ollama_manifests}
    if target not in builders:
        raise ValueError(f"--for {target}: one of {', '.join(TARGETS)}")
    return builders[target](src, **options)


class _PlainDumper(yaml.SafeDumper):
    """No &anchors for the label maps the objects share: the YAML is for people to read and edit."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_PlainDumper, sort_keys=False)
