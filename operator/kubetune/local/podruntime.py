"""The container half of a kubelet for the local stack: a pod's one container run as a local process.

The process gets the container's command, environment (values, fieldRefs, secretKeyRefs) and
volumes (ConfigMaps and projected service-account volumes written out, emptyDirs and
PersistentVolumeClaims as directories). Container paths in its arguments and environment values
are mapped onto those directories; a path above mount points (KUBETUNE_VOLUME_ROOT above each
claim's mount, say) maps onto a per-pod view in which each mount point is a link to its directory.
Its CPUs are a cpuset of ceil(CPU limit) cores and OMP_NUM_THREADS says how many; the GPUs it was
given are its CUDA_VISIBLE_DEVICES. Pods share the host's network, as hostNetwork pods do: a pod's
DNS name under its headless Service (`HOST.SUBDOMAIN`) is 127.0.0.1.

What a node has that a process cannot see is given by environment: the API server
(KUBETUNE_API_URL), the termination-message file (KUBETUNE_TERMINATION_LOG) and the
service-account volume (KUBETUNE_SERVICE_ACCOUNT_DIR).

Each running process is recorded in `POD_DIR/pid` (pid and start time), so that `kubetune local
down` can make sure none outlives the stack.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.controller.kube import KubeClient, path_for
from kubetune.local.resources import CpuShare, cpu_share

log = logging.getLogger(__name__)
TRAINER_ENTRYPOINT = [sys.executable, "-m", "kubetune_trainer.main"]
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80  # what FallbackToLogsOnError takes from the log, as the kubelet does
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_SECONDS = 3607  # the kubelet's default for kube-api-access volumes (the API server extends it)
_FIELD = re.compile(r"^(metadata)\.(labels|annotations)\['(.+)'\]$")


async def every(interval_s: float, step: Callable[[], Awaitable[None]], stop: asyncio.Event, what: str) -> None:
    """Runs step() every interval_s until stop is set. A failed pass is logged and the next retries
    it: a node keeps going through a flaky API server, as a kubelet does."""
    while not stop.is_set():
        try:
            await step()
        except Exception:  # see the docstring
            log.exception("%s failed", what)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


class CannotStart(Exception):
    """What a kubelet reports as CreateContainerConfigError (a missing Secret, say)."""


@dataclass
class RunningPod:
    namespace: str
    name: str
    process: asyncio.subprocess.Process
    pod_dir: Path
    grace_s: float
    cpus: frozenset[int]
    gpus: tuple[int, ...]
    fallback_to_logs: bool

    @property
    def termination_log(self) -> Path:
        return self.pod_dir / "termination-log"

    @property
    def exited(self) -> bool:
        return self.process.returncode is not None


@dataclass(frozen=True)
class Exit:
    code: int
    message: str


ClaimDir = Callable[[str, str], Awaitable[Path]]  # (namespace, claim) -> its directory on this machine


class PodRuntime:
    def __init__(self, client: KubeClient, root: Path, api_url: str, claim_dir: ClaimDir, *,
                 entrypoint: list[str] | None = None, gpu_resource: str = "nvidia.com/gpu", gpus: int = 0):
        self.client, self.root, self.api_url, self.claim_dir = client, root, api_url, claim_dir
        self.entrypoint = entrypoint or TRAINER_ENTRYPOINT
        self.gpu_resource, self.gpus = gpu_resource, gpus
        self.node_cpus = frozenset(os.sched_getaffinity(0))
        self.running: dict[tuple[str, str], RunningPod] = {}

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self.root / "pods" / namespace / name

    async def start(self, pod: dict) -> RunningPod:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        spec = pod["spec"]
        container = spec["containers"][0]
        pod_dir = self.pod_dir(namespace, name)
        pod_dir.mkdir(parents=True, exist_ok=True)
        mounts = await self._mounts(pod, container, pod_dir)
        limits = (container.get("resources") or {}).get("limits") or {}
        share = cpu_share(limits.get("cpu"), self.node_cpus, [r.cpus for r in self.running.values()
                                                              if r.cpus != self.node_cpus])
        gpus = self._gpus(int(limits.get(self.gpu_resource, 0)))
        env = await self._environment(pod, container, mounts, pod_dir, share, gpus)
        argv = (container.get("command") or self.entrypoint) + [_translate(a, mounts, pod_dir)
                                                                for a in container.get("args", [])]
        with await asyncio.to_thread(open, pod_dir / "container.log", "ab") as out:
            # preexec_fn: a cpuset must hold from the first instruction, before the process starts
            # any thread (threads inherit it); there is no other portable way to set it for a child.
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=pod_dir, stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                preexec_fn=None if share.cpus == self.node_cpus else lambda: os.sched_setaffinity(0, share.cpus))
        (pod_dir / "pid").write_text(f"{process.pid} {_start_time(process.pid)}")
        running = RunningPod(namespace, name, process, pod_dir,
                             float(spec.get("terminationGracePeriodSeconds", 30)), share.cpus, gpus,
                             container.get("terminationMessagePolicy") == "FallbackToLogsOnError")
        self.running[(namespace, name)] = running
        log.info("pod %s/%s: started %s (log: %s)", namespace, name, " ".join(argv), pod_dir / "container.log")
        return running

    def _gpus(self, wanted: int) -> tuple[int, ...]:
        """The device plugin's part: distinct GPU indices for each pod that asks for GPUs."""
        taken = {gpu for r in self.running.values() for gpu in r.gpus}
        return tuple([gpu for gpu in range(self.gpus) if gpu not in taken][:wanted])

    async def stop(self, running: RunningPod, grace_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL after the grace period, as the kubelet stops a container."""
        grace = running.grace_s if grace_s is None else grace_s
        if not running.exited:
            try:
                os.killpg(running.process.pid, signal.SIGTERM)
                await asyncio.wait_for(running.process.wait(), grace)
            except TimeoutError:
                log.warning("pod %s/%s: still running %.0f s after SIGTERM: SIGKILL", running.namespace,
                            running.name, grace)
                os.killpg(running.process.pid, signal.SIGKILL)
                await running.process.wait()
            except ProcessLookupError:
                await running.process.wait()
        (running.pod_dir / "pid").unlink(missing_ok=True)

    def forget(self, running: RunningPod) -> Exit:
        """How an exited process ended, as a container runtime reports it; it no longer holds resources."""
        self.running.pop((running.namespace, running.name), None)
        (running.pod_dir / "pid").unlink(missing_ok=True)
        code = running.process.returncode
        assert code is not None, "forget() before the process exited"  # callers stop or wait first
        code = 128 - code if code < 0 else code  # killed by a signal
        try:
            message = running.termination_log.read_text(errors="replace")[:MAX_TERMINATION_MESSAGE]
        except OSError:
            message = ""
        if not message and code != 0 and running.fallback_to_logs:
            try:
                lines = (running.pod_dir / "container.log").read_text(errors="replace").splitlines()
                message = "\n".join(lines[-FALLBACK_LOG_LINES:])[-MAX_TERMINATION_MESSAGE:]
            except OSError:
                pass
        log.info("pod %s/%s: exited with %d", running.namespace, running.name, code)
        return Exit(code, message)

    def remove(self, namespace: str, name: str) -> None:
        shutil.rmtree(self.pod_dir(namespace, name), ignore_errors=True)

    # -- volumes --------------------------------------------------------------------------------
    async def _mounts(self, pod: dict, container: dict, pod_dir: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        sources: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                sources[volume["name"]] = await self.claim_dir(namespace, volume["persistentVolumeClaim"]["claimName"])
                continue
            target = pod_dir / "volumes" / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                _write_files(target, await self._configmap(namespace, volume["configMap"]))
            elif "secret" in volume:
                _write_files(target, await self._secret_files(namespace, volume["secret"]))
            elif "projected" in volume:
                for source in volume["projected"].get("sources") or []:
                    _write_files(target, await self._projected(pod, source))
            sources[volume["name"]] = target
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            host = sources[mount["name"]] / mount.get("subPath", "")
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = host
        # The view of the container's filesystem above its mount points: each one a link.
        view = pod_dir / "root"
        shutil.rmtree(view, ignore_errors=True)
        for mount_path in sorted(mounts, key=len):
            link = view / mount_path.strip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(mounts[mount_path], target_is_directory=True)
        return mounts

    async def _configmap(self, namespace: str, source: dict) -> dict[str, bytes]:
        name = source["name"]
        configmap = await self.client.get(path_for("v1", "configmaps", namespace, name))
        if configmap is None:
            if source.get("optional"):
                return {}
            raise CannotStart(f'configmap "{name}" not found')
        data = {k: v.encode() for k, v in (configmap.get("data") or {}).items()}
        data |= {k: base64.b64decode(v) for k, v in (configmap.get("binaryData") or {}).items()}
        return _items(data, source.get("items"), f'configmap "{name}"')

    async def _secret_files(self, namespace: str, source: dict) -> dict[str, bytes]:
        name = source["secretName"]
        secret = await self.client.get(path_for("v1", "secrets", namespace, name))
        if secret is None:
            if source.get("optional"):
                return {}
            raise CannotStart(f'secret "{name}" not found')
        data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        return _items(data, source.get("items"), f'secret "{name}"')

    async def _projected(self, pod: dict, source: dict) -> dict[str, bytes]:
        namespace = pod["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            return {token["path"]: (await self._token(pod, token)).encode()}
        if "configMap" in source:
            return await self._configmap(namespace, source["configMap"])
        if "secret" in source:
            return await self._secret_files(namespace, {**source["secret"], "secretName": source["secret"]["name"]})
        if "downwardAPI" in source:
            return {item["path"]: field_value(pod, item["fieldRef"]["fieldPath"]).encode()
                    for item in source["downwardAPI"].get("items") or [] if "fieldRef" in item}
        return {}

    async def _token(self, pod: dict, source: dict) -> str:
        """A token of the pod's ServiceAccount bound to the pod (TokenRequest), as the kubelet
        mounts it. Requested once per start: the API server extends a 3607-s kube-api-access
        token to a year, and trainer pods are shorter-lived than that."""
        meta = pod["metadata"]
        spec = {"expirationSeconds": int(source.get("expirationSeconds", TOKEN_SECONDS)),
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        account = pod["spec"].get("serviceAccountName", "default")
        response = await self.client.create(
            path_for("v1", "serviceaccounts", meta["namespace"], account, "token"),
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return response["status"]["token"]

    # -- environment ----------------------------------------------------------------------------
    async def _environment(self, pod: dict, container: dict, mounts: dict[str, Path], pod_dir: Path,
                           share: CpuShare, gpus: tuple[int, ...]) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "KUBETUNE_API_URL": self.api_url, "KUBETUNE_TERMINATION_LOG": str(pod_dir / "termination-log"),
               "OMP_NUM_THREADS": str(share.threads), "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
        if SERVICE_ACCOUNT_MOUNT in mounts:
            env["KUBETUNE_SERVICE_ACCOUNT_DIR"] = str(mounts[SERVICE_ACCOUNT_MOUNT])
        namespace, subdomain = pod["metadata"]["namespace"], pod["spec"].get("subdomain")
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = _translate(_resolve_pod_dns(var["value"], subdomain, namespace), mounts, pod_dir)
                continue
            source = var.get("valueFrom") or {}
            if "fieldRef" in source:
                env[var["name"]] = field_value(pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = await self.client.get(path_for("v1", "secrets", namespace, ref["name"]))
                data = (secret or {}).get("data") or {}
                if ref["key"] in data:
                    env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
                elif not ref.get("optional"):
                    what = f'secret "{ref["name"]}" not found' if secret is None else \
                        f'couldn\'t find key {ref["key"]} in Secret {namespace}/{ref["name"]}'
                    raise CannotStart(what)
        return env


def field_value(pod: dict, field_path: str) -> str:
    """A downward-API fieldRef: `metadata.name`, `spec.nodeName`, `metadata.annotations['k']`..."""
    if match := _FIELD.match(field_path):
        return str(((pod.get("metadata") or {}).get(match.group(2)) or {}).get(match.group(3), ""))
    value: Any = pod
    for part in field_path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _items(data: dict[str, bytes], items: list[dict] | None, what: str) -> dict[str, bytes]:
    if not items:
        return data
    missing = [i["key"] for i in items if i["key"] not in data]
    if missing:
        raise CannotStart(f"{what} has no key {', '.join(missing)}")
    return {item["path"]: data[item["key"]] for item in items}


def _write_files(target: Path, files: dict[str, bytes]) -> None:
    for relative, content in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def _resolve_pod_dns(value: str, subdomain: str | None, namespace: str) -> str:
    """A pod's name under its headless Service (HOST.SUBDOMAIN[.NAMESPACE[.svc[.cluster.local]]])
    is this machine, where every pod of the stack runs."""
    if not subdomain:
        return value
    host, _, rest = value.partition(".")
    names = {subdomain, f"{subdomain}.{namespace}", f"{subdomain}.{namespace}.svc",
             f"{subdomain}.{namespace}.svc.cluster.local"}
    return "127.0.0.1" if host and rest in names else value


def _translate(value: str, mounts: dict[str, Path], pod_dir: Path) -> str:
    """A container path as the host path the process can open: under a mount, that mount's
    directory; above mount points, the pod's view of them."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount.rstrip("/")):]
    if value.startswith("/") and any(m.startswith(value.rstrip("/") + "/") for m in mounts):
        return str(pod_dir / "root" / value.strip("/"))
    return value


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid it
    names one process, not whichever later reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def _zombie(pid: int) -> bool:
    """Exited, waiting for its parent to collect it: nothing left to stop."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def leftover_processes(root: Path) -> list[int]:
    """Processes of pods under `root` that are still running (by their pid files)."""
    found = []
    for pid_file in sorted((root / "pods").glob("*/*/pid")):
        try:
            pid, started = pid_file.read_text().split()
        except (OSError, ValueError):
            continue
        if _start_time(int(pid)) == started and not _zombie(int(pid)):
            found.append(int(pid))
    return found


def kill_leftovers(root: Path) -> list[int]:
    """SIGKILL every pod process still running under `root` (each in its own process group); the pids."""
    pids = leftover_processes(root)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids

