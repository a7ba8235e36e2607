"""The emulator's executor: plays Kubernetes' Job controller, scheduler and kubelet for the local
stack's own API server (`apiserver.py`), which has none of them.

It watches batch/v1 Jobs through the API and creates their Pods (`jobcontrol.py` decides; the
namespace's container defaults filled in as a LimitRange would), places each Pending pod on the
one node if its requests fit next to what runs (`resources.py`; else it stays Pending with the
scheduler's `Unschedulable` reason), runs it as a local process (`podruntime.py`) and writes its
phase, exit code and termination message back through the API as a kubelet would.

On the real control plane the Job controller and the scheduler are Kubernetes' own and only the
kubelet half runs: `kubelet.py`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kubetune.api.meta import now_rfc3339
from kubetune.controller.kube import KubeClient, path_for
from kubetune.local.jobcontrol import decide
from kubetune.local.podruntime import CannotStart, Exit, PodRuntime, RunningPod, every
from kubetune.local.resources import Allocatable, Defaults, Requests, pod_requests, unschedulable, with_defaults

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 20.0  # what the stack gives its pods when it stops (a node's shutdownGracePeriod)


def _phase(pod: dict) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("namespace", "default"), obj["metadata"]["name"]


def _created(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("creationTimestamp") or "", obj["metadata"]["name"]


class LocalExecutor:
    def __init__(self, client: KubeClient, root: Path, api_url: str, *, entrypoint: list[str] | None = None,
                 gpus: int = 0, gpu_resource: str = "nvidia.com/gpu", poll_s: float = 0.3,
                 node: Allocatable | None = None, defaults: Defaults | None = None,
                 shutdown_grace_s: float = SHUTDOWN_GRACE_S):
        self.client, self.root, self.poll_s = client, root, poll_s
        self.node = node or Allocatable.of_this_machine(gpus=gpus, gpu_resource=gpu_resource)
        self.defaults, self.shutdown_grace_s = defaults, shutdown_grace_s
        self.runtime = PodRuntime(client, root, api_url, self._claim_dir, entrypoint=entrypoint,
                                  gpu_resource=self.node.gpu_resource, gpus=self.node.gpus)
        self.requests: dict[tuple[str, str], Requests] = {}

    @property
    def running(self) -> dict[tuple[str, str], RunningPod]:
        return self.runtime.running

    def volume_dir(self, claim: str) -> Path:
        """Where a claim's files are: there is no PersistentVolume here, one directory per claim name."""
        return self.root / "volumes" / claim

    async def _claim_dir(self, namespace: str, claim: str) -> Path:
        return self.volume_dir(claim)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await every(self.poll_s, self.sync, stop, "executor pass")
        finally:  # cancelled too: no pod process may outlive the executor
            # Every pod at once, each given at most the shutdown grace period.
            await asyncio.gather(*(self.runtime.stop(r, min(r.grace_s, self.shutdown_grace_s))
                                   for r in list(self.running.values())))

    async def sync(self) -> None:
        pods = await self.client.list("/api/v1/pods")
        await self._reap({_key(p): p for p in pods})
        pods = await self.client.list("/api/v1/pods")
        jobs = {_key(j): j for j in await self.client.list("/apis/batch/v1/jobs")}
        by_job: dict[tuple[str, str], list[dict]] = {key: [] for key in jobs}
        for pod in pods:
            owner = (pod["metadata"].get("labels") or {}).get("job-name")
            key = (pod["metadata"]["namespace"], owner)
            if owner and key in by_job:
                by_job[key].append(pod)
            elif owner:  # its Job is gone: garbage-collect it, as the API server's collector would
                await self._delete_pod(pod)
        for key, job in jobs.items():
            await self._sync_job(job, by_job[key])
        owned = {_key(p) for ps in by_job.values() for p in ps}
        pending = [p for p in pods if _phase(p) == "Pending" and _key(p) not in self.running and _key(p) in owned]
        for pod in sorted(pending, key=_created):
            await self._schedule(pod)

    # -- the Job controller ---------------------------------------------------------------------
    async def _sync_job(self, job: dict, pods: list[dict]) -> None:
        namespace, name = _key(job)
        decision = decide(job, pods)
        if decision.stop_pods:
            for pod in pods:
                if _phase(pod) in (None, "Pending", "Running"):
                    await self._delete_pod(pod)
        status = dict(job.get("status") or {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "Suspended"]
        was = next((c for c in status.get("conditions") or [] if c.get("type") == "Suspended"), None)
        suspended = decision.condition == "Suspended"
        if was is not None and was.get("status") == str(suspended):
            conditions.append(was)  # unchanged: keep its transition time, write nothing new
        elif suspended or was is not None:  # set, or cleared on resume
            conditions.append({"type": "Suspended", "status": str(suspended), "message": decision.message,
                               "reason": "JobSuspended" if suspended else "JobResumed",
                               "lastTransitionTime": now_rfc3339()})
        if decision.condition in ("Complete", "Failed"):
            conditions.append({"type": decision.condition, "status": "True", "reason": decision.reason,
                               "message": decision.message, "lastTransitionTime": now_rfc3339()})
        if decision.start_pod:
            await self._create_pod(job)
        patch = {"conditions": conditions,
                 "active": sum(1 for p in pods if _phase(p) in ("Pending", "Running")) + int(decision.start_pod),
                 "succeeded": sum(1 for p in pods if _phase(p) == "Succeeded"),
                 "failed": sum(1 for p in pods if _phase(p) == "Failed")}
        if not status.get("startTime") and decision.start_pod:
            patch["startTime"] = now_rfc3339()
        if decision.condition in ("Complete", "Failed"):
            patch["completionTime"] = now_rfc3339()
        if any(status.get(k) != v for k, v in patch.items()):
            await self.client.patch(path_for("batch/v1", "jobs", namespace, name, "status"), {"status": patch})

    async def _create_pod(self, job: dict) -> None:
        namespace, name = _key(job)
        template = job["spec"]["template"]
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": name,
                  "batch.kubernetes.io/job-name": name}
        spec = dict(template["spec"])
        if self.defaults is not None:  # what the LimitRanger admission plugin does to a new pod
            spec["containers"] = [{**c, "resources": with_defaults(c.get("resources"), self.defaults)}
                                  for c in spec["containers"]]
        await self.client.create(path_for("v1", "pods", namespace), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{name}-", "namespace": namespace, "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                              "uid": job["metadata"].get("uid", ""), "controller": True}]},
            "spec": spec, "status": {"phase": "Pending"}})

    # -- the scheduler ----------------------------------------------------------------------------
    async def _schedule(self, pod: dict) -> None:
        wanted = pod_requests(pod, self.node.gpu_resource)
        in_use = sum(self.requests.values(), Requests())
        reason = unschedulable(self.node, in_use, wanted, len(self.running))
        if reason is None:
            await self._launch(pod, wanted)
            return
        scheduled: dict = next((c for c in (pod.get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled"), {})
        if scheduled.get("message") != reason:  # written once, not on every pass
            await self._pod_status(pod, {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": reason,
                "lastTransitionTime": now_rfc3339()}]})

    # -- the kubelet ------------------------------------------------------------------------------
    async def _launch(self, pod: dict, wanted: Requests) -> None:
        container = pod["spec"]["containers"][0]
        try:
            await self.runtime.start(pod)
        except CannotStart as exc:
            await self._pod_status(pod, {"phase": "Pending", "containerStatuses": [{
                "name": container["name"], "ready": False, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]})
            return
        self.requests[_key(pod)] = wanted
        now = now_rfc3339()
        await self._pod_status(pod, {"phase": "Running", "startTime": now, "hostIP": "127.0.0.1",
                                     "podIP": "127.0.0.1", "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": container["name"], "ready": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": now}}}]})

    async def _reap(self, pods: dict[tuple[str, str], dict]) -> None:
        for key, running in list(self.running.items()):
            pod = pods.get(key)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                await self.runtime.stop(running)
            if not running.exited:
                continue
            ended = self._forget(running)
            if pod is not None:
                await self._record_exit(pod, ended)

    def _forget(self, running: RunningPod) -> Exit:
        self.requests.pop((running.namespace, running.name), None)
        return self.runtime.forget(running)

    async def _record_exit(self, pod: dict, ended: Exit) -> None:
        name = pod["spec"]["containers"][0]["name"]
        await self._pod_status(pod, {"phase": "Succeeded" if ended.code == 0 else "Failed", "containerStatuses": [{
            "name": name, "ready": False, "restartCount": 0, "state": {"terminated": {
                "exitCode": ended.code, "reason": "Completed" if ended.code == 0 else "Error",
                "message": ended.message, "finishedAt": now_rfc3339()}}}]})

    async def evict(self, namespace: str, name: str) -> None:
        """What a node drain or a preemption does to a pod through the Eviction API: the pod is marked
        DisruptionTarget, its container is stopped (SIGTERM, then SIGKILL after the grace period) and
        how it ended is recorded; the Job's podFailurePolicy then decides (kubetune's: ignore, retry)."""
        pod = await self.client.get(path_for("v1", "pods", namespace, name))
        if pod is None:
            return
        conditions = [c for c in (pod.get("status") or {}).get("conditions") or []
                      if c.get("type") != "DisruptionTarget"]
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                           "message": "Eviction API: evicting", "lastTransitionTime": now_rfc3339()})
        await self._pod_status(pod, {"conditions": conditions})
        running = self.running.get((namespace, name))
        if running is not None:
            await self.runtime.stop(running)
            await self._record_exit(pod, self._forget(running))

    async def _delete_pod(self, pod: dict) -> None:
        running = self.running.get(_key(pod))
        if running is not None:
            await self.runtime.stop(running)
            self._forget(running)
        await self.client.delete(path_for("v1", "pods", *_key(pod)))
        self.runtime.remove(*_key(pod))

    async def _pod_status(self, pod: dict, status: dict) -> None:
        await self.client.patch(path_for("v1", "pods", *_key(pod), "status"), {"status": status})
