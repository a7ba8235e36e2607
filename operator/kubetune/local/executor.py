"""The local executor: plays Kubernetes' Job controller and kubelet for the local stack.

It watches batch/v1 Jobs through the API, creates their Pods, runs each Pod's container as a local
process with the same command, environment and mounted files (ConfigMap volumes written out,
emptyDirs and PersistentVolumeClaims as directories; container paths in arguments and environment
values are mapped to those directories), and writes the Pod's phase, exit code and termination
message back through the API as a kubelet would. Two things differ from a node: the API server and
the termination-message file are given to the process by environment (KUBETUNE_API_URL,
KUBETUNE_TERMINATION_LOG), since it cannot see the in-cluster service or /dev/termination-log.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.meta import now_rfc3339
from kubetune.controller.kube import KubeClient, path_for
from kubetune.local.jobcontrol import decide

log = logging.getLogger(__name__)
TRAINER_ENTRYPOINT = [sys.executable, "-m", "kubetune_trainer.main"]
MAX_TERMINATION_MESSAGE = 4096


class CannotStart(Exception):
    """What a kubelet reports as CreateContainerConfigError (a missing Secret, say)."""


@dataclass
class RunningPod:
    namespace: str
    name: str
    process: asyncio.subprocess.Process
    termination_log: Path
    grace_s: float


def _phase(pod: dict) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _key(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("namespace", "default"), obj["metadata"]["name"]


class LocalExecutor:
    def __init__(self, client: KubeClient, root: Path, api_url: str, *, entrypoint: list[str] | None = None,
                 gpus: int = 0, gpu_resource: str = "nvidia.com/gpu", poll_s: float = 0.3):
        self.client, self.root, self.api_url = client, root, api_url
        self.entrypoint = entrypoint or TRAINER_ENTRYPOINT
        self.gpus, self.gpu_resource, self.poll_s = gpus, gpu_resource, poll_s
        self.running: dict[tuple[str, str], RunningPod] = {}

    def volume_dir(self, claim: str) -> Path:
        return self.root / "volumes" / claim

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sync()
            except Exception:  # noqa: BLE001 - a kubelet keeps going; the next pass retries
                log.exception("executor pass failed")
            try:
                await asyncio.wait_for(stop.wait(), self.poll_s)
            except TimeoutError:
                pass
        for pod in list(self.running.values()):
            await self._terminate(pod)

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
        for pod in pods:
            if _phase(pod) == "Pending" and _key(pod) not in self.running and _key(pod) in owned:
                await self._launch(pod)

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
        await self.client.create(path_for("v1", "pods", namespace), {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": f"{name}-", "namespace": namespace, "labels": labels,
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                              "uid": job["metadata"].get("uid", ""), "controller": True}]},
            "spec": template["spec"], "status": {"phase": "Pending"}})

    # -- the kubelet --------------------------------------------------------------------------------
    async def _launch(self, pod: dict) -> None:
        namespace, name = _key(pod)
        spec = pod["spec"]
        container = spec["containers"][0]
        wanted_gpus = int(((container.get("resources") or {}).get("limits") or {}).get(self.gpu_resource, 0))
        if wanted_gpus > self.gpus:
            await self._pod_status(pod, {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": f"0/1 nodes are available: 1 Insufficient {self.gpu_resource} "
                           f"(the local stack has {self.gpus} GPU(s))"}]})
            return
        pod_dir = self.root / "pods" / namespace / name
        try:
            mounts = await self._mounts(namespace, spec, container, pod_dir)
            env = await self._environment(pod, container, mounts, pod_dir)
        except CannotStart as exc:
            await self._pod_status(pod, {"phase": "Pending", "containerStatuses": [{
                "name": container["name"], "ready": False, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]})
            return
        argv = (container.get("command") or self.entrypoint) + [_translate(a, mounts) for a in container.get("args", [])]
        with open(pod_dir / "container.log", "ab") as out:
            process = await asyncio.create_subprocess_exec(*argv, env=env, cwd=pod_dir, stdout=out,
                                                           stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.running[(namespace, name)] = RunningPod(namespace, name, process, pod_dir / "termination-log",
                                                     float(spec.get("terminationGracePeriodSeconds", 30)))
        log.info("pod %s/%s: started %s (log: %s)", namespace, name, " ".join(argv), pod_dir / "container.log")
        now = now_rfc3339()
        await self._pod_status(pod, {"phase": "Running", "startTime": now, "conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": container["name"], "ready": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": now}}}]})

    async def _mounts(self, namespace: str, spec: dict, container: dict, pod_dir: Path) -> dict[str, Path]:
        sources: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                sources[volume["name"]] = self.volume_dir(volume["persistentVolumeClaim"]["claimName"])
                continue
            target = pod_dir / "volumes" / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                configmap = await self.client.get(path_for("v1", "configmaps", namespace, name))
                if configmap is None:
                    raise CannotStart(f'configmap "{name}" not found')
                for key, value in (configmap.get("data") or {}).items():
                    (target / key).write_text(value)
            sources[volume["name"]] = target
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            host = sources[mount["name"]] / mount.get("subPath", "")
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = host
        return mounts

    async def _environment(self, pod: dict, container: dict, mounts: dict[str, Path], pod_dir: Path) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "KUBETUNE_API_URL": self.api_url, "KUBETUNE_TERMINATION_LOG": str(pod_dir / "termination-log")}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = _translate(var["value"], mounts)
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                value = pod
                for part in source["fieldRef"]["fieldPath"].split("."):
                    value = value.get(part) or {}
                env[var["name"]] = str(value)
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = await self.client.get(path_for("v1", "secrets", pod["metadata"]["namespace"], ref["name"]))
                data = (secret or {}).get("data") or {}
                if ref["key"] in data:
                    env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
                elif not ref.get("optional"):
                    what = f'secret "{ref["name"]}" not found' if secret is None else \
                        f'couldn\'t find key {ref["key"]} in Secret {pod["metadata"]["namespace"]}/{ref["name"]}'
                    raise CannotStart(what)
        return env

    async def _reap(self, pods: dict[tuple[str, str], dict]) -> None:
        for key, running in list(self.running.items()):
            pod = pods.get(key)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                await self._terminate(running)
            if running.process.returncode is None:
                continue
            del self.running[key]
            if pod is not None:
                await self._record_exit(pod, running)

    async def _record_exit(self, pod: dict, running: RunningPod) -> None:
        code = running.process.returncode
        code = 128 - code if code < 0 else code  # killed by a signal, as a container runtime reports it
        try:
            message = running.termination_log.read_text()[:MAX_TERMINATION_MESSAGE]
        except OSError:
            message = ""
        name = pod["spec"]["containers"][0]["name"]
        await self._pod_status(pod, {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [{
            "name": name, "ready": False, "restartCount": 0, "state": {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                "finishedAt": now_rfc3339()}}}]})
        log.info("pod %s/%s: exited with %d", running.namespace, running.name, code)

    async def _terminate(self, running: RunningPod) -> None:
        """SIGTERM, then SIGKILL after the grace period, as the kubelet stops a container."""
        if running.process.returncode is not None:
            return
        try:
            os.killpg(running.process.pid, signal.SIGTERM)
            await asyncio.wait_for(running.process.wait(), running.grace_s)
        except TimeoutError:
            os.killpg(running.process.pid, signal.SIGKILL)
            await running.process.wait()
        except ProcessLookupError:
            await running.process.wait()

    async def evict(self, namespace: str, name: str) -> None:
        """What a node drain or a preemption does to a pod through the Eviction API: the pod is marked
        DisruptionTarget, its container is stopped (SIGTERM, then SIGKILL after the grace period) and
        how it ended is recorded; the Job's podFailurePolicy then decides (kubetune's: ignore, retry)."""
        pod = await self.client.get(path_for("v1", "pods", namespace, name))
        if pod is None:
            return
        conditions = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != "DisruptionTarget"]
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                           "message": "Eviction API: evicting", "lastTransitionTime": now_rfc3339()})
        await self._pod_status(pod, {"conditions": conditions})
        running = self.running.pop((namespace, name), None)
        if running is not None:
            await self._terminate(running)
            await self._record_exit(pod, running)

    async def _delete_pod(self, pod: dict) -> None:
        running = self.running.pop(_key(pod), None)
        if running is not None:
            await self._terminate(running)
        await self.client.delete(path_for("v1", "pods", *_key(pod)))
        shutil.rmtree(self.root / "pods" / pod["metadata"]["namespace"] / pod["metadata"]["name"], ignore_errors=True)

    async def _pod_status(self, pod: dict, status: dict) -> None:
        await self.client.patch(path_for("v1", "pods", *_key(pod), "status"), {"status": status})


def _translate(value: str, mounts: dict[str, Path]) -> str:
    """A container path under a mount, as the host path the process can open."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount.rstrip("/")):]
    return value
