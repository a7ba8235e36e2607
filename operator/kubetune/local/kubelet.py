"""The executor in node mode: the kubelet of one Node of a real control plane (`controlplane.py`).

Kubernetes' own controllers do the rest: the Job controller creates the pods, the scheduler binds
them to this node (judging its allocatable cpu, memory and GPUs), the API server carries out
evictions. This kubelet:

- registers its Node (allocatable cpu, memory, pods and the GPU resource; Ready) and renews its
  Lease in kube-node-lease, so that the node-lifecycle controller never taints it unreachable;
- runs the pods bound to it (`spec.nodeName`) as local processes (`podruntime.py`), with their
  service-account token from the TokenRequest API and their claims' PersistentVolumes (hostPath
  or local) as directories;
- writes their status: phase, conditions, container state with exit code and termination message;
- honours graceful deletion (an eviction's, a suspended Job's, `kubectl delete`'s): SIGTERM, SIGKILL
  after the deletion's grace period, the exit recorded, then the pod deleted with grace 0;
- on its own shutdown stops its pods with DisruptionTarget (TerminationByKubelet), as a node's
  graceful shutdown does, so the Jobs' podFailurePolicy does not count them as failures.

Its identity is the node's, `system:node:NAME` in group `system:nodes` (`ControlPlane.node_token`):
the API server's Node authorizer and NodeRestriction admission judge every call, so it can read
only the Secrets, ConfigMaps, claims and tokens of pods bound to it. Status writes carry the
resourceVersion they were computed from: a condition the API server added in the meantime (an
eviction's DisruptionTarget) is never overwritten.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.meta import now_rfc3339
from kubetune.controller.kube import ApiError, KubeClient, path_for
from kubetune.local.podruntime import CannotStart, Exit, PodRuntime, RunningPod, every
from kubetune.local.resources import Allocatable

log = logging.getLogger(__name__)
DEFAULT_NODE = "kubetune-node"
LEASE_S = 40  # the Lease's duration; renewed every quarter of it, as the kubelet does
STATUS_EVERY_S = 60  # the Ready condition's heartbeat (the Lease is what the lifecycle controller reads)
SHUTDOWN_GRACE_S = 20.0
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady")


def _key(pod: dict) -> tuple[str, str]:
    return pod["metadata"]["namespace"], pod["metadata"]["name"]


def _phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def _micro_time() -> str:
    """A Lease's MicroTime: RFC 3339 with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Ended:
    exit: Exit
    started_at: str
    finished_at: str
    disruption: dict | None = None  # a DisruptionTarget condition this kubelet adds (its own shutdown)


def pod_conditions(existing: list[dict], *, ready: bool, started: bool, terminated: bool, now: str) -> list[dict]:
    """The pod's conditions with the kubelet's own replaced; those of other writers (PodScheduled,
    DisruptionTarget) are kept as they are, and so is the transition time of one that did not change."""
    reason = "PodCompleted" if terminated else "ContainersNotReady"
    ours = {"PodReadyToStartContainers": (started, ""), "Initialized": (True, ""),
            "Ready": (ready, "" if ready else reason), "ContainersReady": (ready, "" if ready else reason)}
    old = {c.get("type"): c for c in existing}
    conditions = [c for c in existing if c.get("type") not in ours]
    for kind, (value, why) in ours.items():
        previous = old.get(kind) or {}
        condition = {"type": kind, "status": str(value),
                     "lastTransitionTime": previous.get("lastTransitionTime") if previous.get("status") == str(value)
                     else now}
        conditions.append({**condition, "reason": why} if why else condition)
    return conditions


class NodeKubelet:
    def __init__(self, client: KubeClient, root: Path, api_url: str, *, node_name: str = DEFAULT_NODE,
                 node: Allocatable | None = None, entrypoint: list[str] | None = None, poll_s: float = 0.5,
                 shutdown_grace_s: float = SHUTDOWN_GRACE_S):
        self.client, self.root, self.name, self.poll_s = client, root, node_name, poll_s
        self.node = node or Allocatable.of_this_machine()
        self.shutdown_grace_s = shutdown_grace_s
        self.runtime = PodRuntime(client, root, api_url, self._claim_dir, entrypoint=entrypoint,
                                  gpu_resource=self.node.gpu_resource, gpus=self.node.gpus)
        self.ended: dict[tuple[str, str], Ended] = {}  # exits not yet written to the API
        self.started_at: dict[tuple[str, str], str] = {}
        self.stopping: dict[tuple[str, str], asyncio.Task] = {}
        self.finalized: set[tuple[str, str]] = set()  # deleted with grace 0, waiting for finalizers
        self.status_at = 0.0  # loop time of the Node's last status write

    @property
    def running(self) -> dict[tuple[str, str], RunningPod]:
        return self.runtime.running

    # -- the node ---------------------------------------------------------------------------------
    async def register(self) -> None:
        labels = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(),
                                                                                    platform.machine())}
        try:
            await self.client.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                       "metadata": {"name": self.name, "labels": labels}})
        except ApiError as exc:
            if exc.status != 409:
                raise
        await self._node_status()
        await self._renew_lease()

    async def _node_status(self) -> None:
        now = now_rfc3339()
        healthy = [(kind, "False", reason) for kind, reason in (
            ("MemoryPressure", "KubeletHasSufficientMemory"), ("DiskPressure", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "KubeletHasSufficientPID"))] + [("Ready", "True", "KubeletReady")]
        resources = self.node.as_status()
        await self.client.patch(f"/api/v1/nodes/{self.name}/status", {"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": kind, "status": status, "reason": reason, "message": f"kubetune executor: {reason}",
                            "lastHeartbeatTime": now, "lastTransitionTime": now} for kind, status, reason in healthy],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": platform.release(),
                         "osImage": "kubetune local executor", "containerRuntimeVersion": "kubetune://process",
                         "kubeletVersion": "kubetune", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": platform.machine()}}})
        self.status_at = asyncio.get_running_loop().time()  # after the write: a failed one is retried next beat

    async def _renew_lease(self) -> None:
        path = path_for("coordination.k8s.io/v1", "leases", "kube-node-lease", self.name)
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_S, "renewTime": _micro_time()}
        if await self.client.get(path) is None:
            node = await self.client.get(f"/api/v1/nodes/{self.name}")
            if node is None:  # deleted since `register`; `every` logs this and the next beat retries
                raise RuntimeError(f"node {self.name} not found: its lease cannot name it as owner")
            await self.client.create(path_for("coordination.k8s.io/v1", "leases", "kube-node-lease"), {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}]},
                "spec": spec})
        else:
            await self.client.patch(path, {"spec": spec})

    async def _beat(self) -> None:
        """The lease renewed (a missed beat is retried at the next: the lease outlasts three), and
        the Node's status refreshed every STATUS_EVERY_S."""
        await self._renew_lease()
        if asyncio.get_running_loop().time() - self.status_at >= STATUS_EVERY_S:
            await self._node_status()

    # -- the pods ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.register()
        heartbeat = asyncio.create_task(every(LEASE_S / 4, self._beat, stop, "node heartbeat"), name="node-heartbeat")
        try:
            await every(self.poll_s, self.sync, stop, "kubelet pass")
        finally:
            heartbeat.cancel()
            await self._shut_down()

    async def _shut_down(self) -> None:
        """A node's graceful shutdown: every pod stopped at once within the shutdown grace period,
        marked DisruptionTarget, and how it ended written."""
        now = now_rfc3339()
        disruption = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                      "message": "Pod was terminated in response to imminent node shutdown.",
                      "lastTransitionTime": now}
        running = list(self.running.values())
        await asyncio.gather(*self.stopping.values(), return_exceptions=True)
        await asyncio.gather(*(self.runtime.stop(r, min(r.grace_s, self.shutdown_grace_s)) for r in running))
        for r in running:
            if (r.namespace, r.name) in self.running:
                self._ended(r, disruption)
        for key in list(self.ended):
            pod = await self.client.get(path_for("v1", "pods", *key))
            if pod is not None:
                await self._write_ended(pod)

    async def sync(self) -> None:
        pods = {_key(p): p for p in await self.client.list(f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.name}")}
        for key, running in list(self.running.items()):
            if key not in pods and key not in self.stopping:  # force-deleted: nobody waits for its status
                self.stopping[key] = asyncio.create_task(self._stop(running, None))
        for key in [k for k in self.ended if k not in pods] + [k for k in self.finalized if k not in pods]:
            self.ended.pop(key, None)
            self.finalized.discard(key)
            self.runtime.remove(*key)
        for key, pod in pods.items():
            await self._sync_pod(key, pod)

    async def _sync_pod(self, key: tuple[str, str], pod: dict) -> None:
        running = self.running.get(key)
        if running is not None and running.exited and key not in self.stopping:
            self._ended(running)
            running = None
        if key in self.ended:
            await self._write_ended(pod)
        elif pod["metadata"].get("deletionTimestamp") is not None:
            await self._deleting(key, pod, running)
        elif running is None and _phase(pod) == "Pending":
            await self._start(pod)
        elif running is None and _phase(pod) == "Running":
            # Running under an earlier run of this kubelet, whose process is gone.
            self.ended[key] = Ended(Exit(137, "The container could not be located when the pod was terminated"),
                                    "", now_rfc3339())
            await self._write_ended(pod)
        elif running is not None and _phase(pod) == "Pending":  # the first write lost a race: again
            await self._write_running(pod, running)

    async def _deleting(self, key: tuple[str, str], pod: dict, running: RunningPod | None) -> None:
        if running is not None:
            if key not in self.stopping:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                self.stopping[key] = asyncio.create_task(self._stop(running, grace))
            return
        if key in self.finalized or key in self.stopping:
            return
        if _phase(pod) not in ("Succeeded", "Failed"):  # deleted before it ever ran
            if not await self._write_status(pod, {"phase": "Failed", "reason": "Terminated"}, ready=False,
                                            started=False, terminated=True):
                return
        await self._finalize(key)

    async def _start(self, pod: dict) -> None:
        container = pod["spec"]["containers"][0]
        try:
            running = await self.runtime.start(pod)
        except CannotStart as exc:
            waiting = [(cs.get("state") or {}).get("waiting") or {}
                       for cs in (pod.get("status") or {}).get("containerStatuses") or []]
            if waiting and waiting[0].get("message") == str(exc):
                return  # said already; tried again on every pass
            await self._write_status(pod, {"phase": "Pending", "containerStatuses": [{
                "name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
                "restartCount": 0, "started": False,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]},
                ready=False, started=False)
            return
        except ApiError as exc:
            # The Node authorizer learns of a newly bound pod a moment after the scheduler binds it.
            log.info("pod %s/%s: not started yet: %s", *_key(pod), exc)
            return
        self.started_at[_key(pod)] = now_rfc3339()
        await self._write_running(pod, running)

    async def _write_running(self, pod: dict, running: RunningPod) -> None:
        container = pod["spec"]["containers"][0]
        started = self.started_at[_key(pod)]
        await self._write_status(pod, {
            "phase": "Running", "startTime": (pod.get("status") or {}).get("startTime") or started,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "imageID": "",
                                   "containerID": f"kubetune://{running.process.pid}", "ready": True,
                                   "started": True, "restartCount": 0, "state": {"running": {"startedAt": started}}}]},
            ready=True)

    async def _stop(self, running: RunningPod, grace: float | None) -> None:
        key = (running.namespace, running.name)
        try:
            await self.runtime.stop(running, grace)
            self._ended(running)
        finally:
            self.stopping.pop(key, None)

    def _ended(self, running: RunningPod, disruption: dict | None = None) -> None:
        key = (running.namespace, running.name)
        self.ended[key] = Ended(self.runtime.forget(running), self.started_at.pop(key, ""), now_rfc3339(), disruption)

    async def _write_ended(self, pod: dict) -> None:
        key = _key(pod)
        ended = self.ended[key]
        container = pod["spec"]["containers"][0]
        code = ended.exit.code
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "finishedAt": ended.finished_at, "containerID": ""}
        if ended.started_at:
            terminated["startedAt"] = ended.started_at
        if ended.exit.message:
            terminated["message"] = ended.exit.message
        status: dict = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{
            "name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
            "started": False, "restartCount": 0, "state": {"terminated": terminated}}]}
        extra = [ended.disruption] if ended.disruption else []
        if await self._write_status(pod, status, ready=False, terminated=True, extra_conditions=extra):
            del self.ended[key]
            if pod["metadata"].get("deletionTimestamp"):
                await self._finalize(key)

    async def _finalize(self, key: tuple[str, str]) -> None:
        """The last step of a graceful deletion: the containers are gone, the API server may remove
        the pod (once other finalizers, the Job controller's, are done)."""
        await self.client.delete(path_for("v1", "pods", *key), grace_period_s=0)
        self.finalized.add(key)

    async def _write_status(self, pod: dict, status: dict, *, ready: bool, started: bool = True,
                            terminated: bool = False, extra_conditions: Sequence[dict] = ()) -> bool:
        """One status write, conditional on the pod being as read (its resourceVersion); False when it
        changed in between, so that the next pass writes from what it then is."""
        existing = [c for c in (pod.get("status") or {}).get("conditions") or []
                    if c.get("type") not in {e["type"] for e in extra_conditions}]
        conditions = pod_conditions(existing, ready=ready, started=started, terminated=terminated,
                                    now=now_rfc3339()) + list(extra_conditions)
        try:
            await self.client.patch(path_for("v1", "pods", *_key(pod), "status"), {
                "metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
                "status": {**status, "conditions": conditions}})
        except ApiError as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def _claim_dir(self, namespace: str, claim: str) -> Path:
        """The directory of the PersistentVolume bound to the claim (hostPath or local)."""
        pvc = await self.client.get(path_for("v1", "persistentvolumeclaims", namespace, claim))
        if pvc is None:
            raise CannotStart(f'persistentvolumeclaim "{claim}" not found')
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        volume = await self.client.get(f"/api/v1/persistentvolumes/{volume_name}") if volume_name else None
        spec = (volume or {}).get("spec") or {}
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if path is None:
            raise CannotStart(f'persistentvolumeclaim "{claim}" is not bound to a hostPath or local volume')
        return Path(path)
