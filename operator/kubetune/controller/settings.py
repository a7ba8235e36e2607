"""Operator settings, from the environment (the chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorSettings:
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    gpu_resource: str = "nvidia.com/gpu"
    trainer_service_account: str = "kubetune-trainer"
    termination_grace_seconds: int = 300  # room for a checkpoint upload after SIGTERM
    max_running_per_namespace: int = 0  # 0: no limit
    volume_root: str = "/mnt/volumes"
    gpu_memory_gib: float = 80.0  # of one GPU, for jobs that do not say (resources.gpuMemoryGiB)
    metrics_port: int = 0  # Prometheus /metrics; 0: not served
    reverify_seconds: int = 3600  # Ready adapters' periodic listing check; 0: never

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> OperatorSettings:
        env = dict(os.environ) if env is None else env
        return cls(
            trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", cls.trainer_image),
            gpu_resource=env.get("KUBETUNE_GPU_RESOURCE", cls.gpu_resource),
            trainer_service_account=env.get("KUBETUNE_TRAINER_SERVICE_ACCOUNT", cls.trainer_service_account),
            termination_grace_seconds=int(env.get("KUBETUNE_TERMINATION_GRACE_SECONDS",
                                                  cls.termination_grace_seconds)),
            max_running_per_namespace=int(env.get("KUBETUNE_MAX_RUNNING_PER_NAMESPACE",
                                                  cls.max_running_per_namespace)),
            gpu_memory_gib=float(env.get("KUBETUNE_GPU_MEMORY_GIB", cls.gpu_memory_gib)),
            metrics_port=int(env.get("KUBETUNE_METRICS_PORT", cls.metrics_port)),
            reverify_seconds=int(env.get("KUBETUNE_REVERIFY_SECONDS", cls.reverify_seconds)),
        )
