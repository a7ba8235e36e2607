"""The pure parts of the executor's kubelet: container paths mapped onto the pod's directories,
downward-API fields, pod DNS names, conditions, quantities and CPU shares."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from kubetune.local.kubelet import pod_conditions
from kubetune.local.podruntime import _resolve_pod_dns, _translate, field_value
from kubetune.local.resources import Allocatable, Defaults, Requests, cpu_share, parse_quantity, pod_requests, \
    unschedulable, with_defaults

MOUNTS = {"/mnt/volumes/data": Path("/state/volumes/data"), "/scratch": Path("/pod/scratch"),
          "/tmp": Path("/pod/scratch/tmp")}


def test_container_paths():
    pod = Path("/pod")
    assert _translate("/mnt/volumes/data/x.jsonl", MOUNTS, pod) == "/state/volumes/data/x.jsonl"
    assert _translate("/mnt/volumes", MOUNTS, pod) == "/pod/root/mnt/volumes"  # above a mount: the pod's view
    assert _translate("/mnt/volumes/", MOUNTS, pod) == "/pod/root/mnt/volumes"
    assert _translate("/tmp", MOUNTS, pod) == "/pod/scratch/tmp"
    assert _translate("/mnt/volumesX", MOUNTS, pod) == "/mnt/volumesX"
    assert _translate("/etc/passwd", MOUNTS, pod) == "/etc/passwd"
    assert _translate("relative", MOUNTS, pod) == "relative"


def test_downward_api_fields():
    pod = {"metadata": {"name": "p", "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
           "spec": {"nodeName": "n"}}
    assert field_value(pod, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "1"
    assert field_value(pod, "metadata.labels['missing']") == ""
    assert field_value(pod, "spec.nodeName") == "n"
    assert field_value(pod, "metadata.name") == "p"


def test_pod_dns_names_of_the_headless_service_are_this_machine():
    assert _resolve_pod_dns("job-train-0.job-train", "job-train", "ns") == "127.0.0.1"
    assert _resolve_pod_dns("job-train-0.job-train.ns.svc.cluster.local", "job-train", "ns") == "127.0.0.1"
    assert _resolve_pod_dns("job-train-0.other", "job-train", "ns") == "job-train-0.other"
    assert _resolve_pod_dns("job-train-0.job-train", None, "ns") == "job-train-0.job-train"


def test_conditions_of_other_writers_are_kept():
    existing = [{"type": "PodScheduled", "status": "True"},
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "t0"}]
    out = {c["type"]: c for c in pod_conditions(existing, ready=False, started=True, terminated=True, now="t1")}
    assert out["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI" and out["PodScheduled"]["status"] == "True"
    assert (out["Ready"]["status"], out["Ready"]["reason"], out["Ready"]["lastTransitionTime"]) == \
        ("False", "PodCompleted", "t1")
    same = {c["type"]: c for c in pod_conditions(existing, ready=True, started=True, terminated=False, now="t1")}
    assert same["Ready"]["lastTransitionTime"] == "t0"  # unchanged: its transition time too


def test_quantities():
    assert parse_quantity("500m") == Decimal("0.5")
    assert parse_quantity("4Gi") == 4 * 2**30
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(2) == 2
    with pytest.raises(ValueError, match="not a Kubernetes quantity: 'lots'"):
        parse_quantity("lots")


def test_limit_range_defaults_and_fit():
    defaults = Defaults(limits={"cpu": "2"}, requests={"cpu": "2"})
    assert with_defaults(None, defaults) == {"limits": {"cpu": "2"}, "requests": {"cpu": "2"}}
    # A request comes from the container's own limit before the default request.
    assert with_defaults({"limits": {"cpu": "1"}}, defaults)["requests"] == {"cpu": "1"}
    assert with_defaults({"requests": {"cpu": "500m"}}, defaults) == {"limits": {"cpu": "2"},
                                                                      "requests": {"cpu": "500m"}}
    pod = {"spec": {"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": 1}}}]}}
    assert pod_requests(pod, "nvidia.com/gpu") == Requests(Decimal(1), Decimal(2**30), 1)
    node = Allocatable(Decimal(2), Decimal(2**31), 1)
    assert unschedulable(node, Requests(Decimal(1)), Requests(Decimal(1), gpus=1), 1) is None
    assert unschedulable(node, Requests(Decimal("1.5"), gpus=1), Requests(Decimal(1), Decimal(2**32), 1), 1) == \
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory, 1 Insufficient nvidia.com/gpu."


def test_cpu_shares():
    node = frozenset({0, 1, 2, 3})
    assert cpu_share(None, node, []).threads == 4
    first = cpu_share("2", node, [])
    second = cpu_share("1500m", node, [first.cpus])
    assert (first.threads, second.threads) == (2, 2) and not first.cpus & second.cpus
    assert cpu_share("64", node, []).cpus == node
