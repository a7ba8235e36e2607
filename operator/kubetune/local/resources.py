"""A node's resources and a pod's share of them, as the scheduler and the kubelet count them: pure
functions over pod manifests.

- `requests`: what a pod asks for (cpu, memory, GPUs), with a LimitRange-style default filled in
  for what it does not say (the emulator has no admission chain; on the real plane the stack
  creates the same default as a LimitRange and the API server applies it);
- `unschedulable`: the scheduler's NodeResourcesFit verdict for one node, in its words;
- `cpu_share`: the CPUs a running container may use and the thread count it is told, from its CPU
  limit (a cpuset of whole CPUs stands in for the CFS quota a container runtime would set).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

# Kubernetes' quantity suffixes (resource.Quantity). The `kubernetes` package has a parser, but
# the local stack does not otherwise depend on it: this is the whole grammar.
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10**3),
            "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15),
            "E": Decimal(10**18)}


def parse_quantity(value: str | int | float) -> Decimal:
    """"500m" -> 0.5, "4Gi" -> 4294967296, "1e3" -> 1000; a clear error for anything else."""
    text = str(value).strip()
    try:
        for suffix, factor in _BINARY.items():
            if text.endswith(suffix):
                return Decimal(text[: -len(suffix)]) * factor
        if text[-1:] in _DECIMAL:
            return Decimal(text[:-1]) * _DECIMAL[text[-1]]
        return Decimal(text)
    except (InvalidOperation, IndexError):
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from None


@dataclass(frozen=True)
class Allocatable:
    """What the node offers to pods (the Node's status.allocatable)."""
    cpu: Decimal
    memory: Decimal
    gpus: int
    pods: int = 110
    gpu_resource: str = "nvidia.com/gpu"

    @classmethod
    def of_this_machine(cls, *, gpus: int = 0, cpu: float | None = None, memory: int | None = None,
                        gpu_resource: str = "nvidia.com/gpu") -> Allocatable:
        cpus = cpu if cpu is not None else len(os.sched_getaffinity(0))
        if memory is None:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(Decimal(str(cpus)), Decimal(memory), gpus, gpu_resource=gpu_resource)

    def as_status(self) -> dict[str, str]:
        return {"cpu": f"{int(self.cpu * 1000)}m", "memory": str(int(self.memory)), "pods": str(self.pods),
                "ephemeral-storage": "100Gi", self.gpu_resource: str(self.gpus)}


@dataclass(frozen=True)
class Requests:
    cpu: Decimal = Decimal(0)
    memory: Decimal = Decimal(0)
    gpus: int = 0

    def __add__(self, other: Requests) -> Requests:
        return Requests(self.cpu + other.cpu, self.memory + other.memory, self.gpus + other.gpus)


@dataclass(frozen=True)
class Defaults:
    """A LimitRange's container defaults: `limits` when a container sets none, `requests` likewise
    (Kubernetes takes a request from the container's own limit first)."""
    limits: dict[str, str] = field(default_factory=dict)
    requests: dict[str, str] = field(default_factory=dict)

    def as_limit_range(self, name: str, namespace: str) -> dict:
        return {"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": name, "namespace": namespace},
                "spec": {"limits": [{"type": "Container", "default": dict(self.limits),
                                     "defaultRequest": dict(self.requests)}]}}


def with_defaults(resources: dict | None, defaults: Defaults) -> dict:
    """A container's resources after LimitRange defaulting, as the LimitRanger admission plugin
    fills them in: a missing limit from the default, a missing request from the container's own
    limit, else from the default request."""
    resources = resources or {}
    limits = {**defaults.limits, **(resources.get("limits") or {})}
    own_limits = resources.get("limits") or {}
    requests = {**defaults.requests, **own_limits, **(resources.get("requests") or {})}
    return {"limits": limits, "requests": requests}


def container_requests(resources: dict | None, gpu_resource: str) -> Requests:
    resources = resources or {}
    requests = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
    return Requests(cpu=parse_quantity(requests.get("cpu", 0)), memory=parse_quantity(requests.get("memory", 0)),
                    gpus=int(parse_quantity((resources.get("limits") or {}).get(gpu_resource, 0))))


def pod_requests(pod: dict, gpu_resource: str, defaults: Defaults | None = None) -> Requests:
    total = Requests()
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources")
        total += container_requests(with_defaults(resources, defaults) if defaults else resources, gpu_resource)
    return total


def unschedulable(node: Allocatable, in_use: Requests, wanted: Requests, running_pods: int) -> str | None:
    """None if the pod fits next to what runs; else the scheduler's message for a one-node cluster."""
    short = []
    if running_pods + 1 > node.pods:
        short.append("Too many pods")
    if in_use.cpu + wanted.cpu > node.cpu:
        short.append("Insufficient cpu")
    if in_use.memory + wanted.memory > node.memory:
        short.append("Insufficient memory")
    if in_use.gpus + wanted.gpus > node.gpus:
        short.append(f"Insufficient {node.gpu_resource}")
    if not short:
        return None
    return "0/1 nodes are available: " + ", ".join(f"1 {s}" for s in short) + "."


@dataclass(frozen=True)
class CpuShare:
    cpus: frozenset[int]  # the cpuset the container runs on
    threads: int  # OMP_NUM_THREADS: one per CPU it may use


def cpu_share(limit: str | None, node_cpus: frozenset[int], pinned: list[frozenset[int]]) -> CpuShare:
    """The whole node without a limit; else ceil(limit) CPUs, the least used by the other pinned
    containers first (so that two 1-CPU trainings on two cores get one core each)."""
    if limit is None:
        return CpuShare(node_cpus, len(node_cpus))
    wanted = min(len(node_cpus), max(1, math.ceil(parse_quantity(limit))))
    load = {cpu: sum(cpu in share for share in pinned) for cpu in node_cpus}
    chosen = sorted(node_cpus, key=lambda cpu: (load[cpu], cpu))[:wanted]
    return CpuShare(frozenset(chosen), wanted)
