"""How the operator copes with many FineTuneJobs, on the real control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler from `scripts/control-plane build`).

N FineTuneJobs are created at once; the operator (`kubetune operator`, its own process, in-cluster
style under a ServiceAccount token) must create each Job (or hold it `Queued` under a per-namespace
limit) and record each status. No node is registered: the pods stay Pending, so what is measured is
the operator and the API server, not training.

Reported: apply -> Job latency (p50, p99; from a watch on Jobs), the time until every FineTuneJob
has a phase, the operator's CPU seconds and peak memory, and the API requests the operator made,
from the API server's audit log (its ServiceAccount's requests, split by user agent: Kopf's
`kopf/...` and kubetune's own `kubetune/...`): per second while the jobs are taken in and in the
steady state after (`--steady-s`), when waiting jobs must not keep polling the API server.

Usage: python bench/operator_scale.py --jobs 1000 [--max-running 100] [--out bench/results/X.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from kubetune.controller.jobs import job_name
from kubetune.controller.kube import KubeClient, KubeConfig, path_for
from kubetune.local.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[1]
NS = "scale"
ACCOUNT = "kubetune"
FTJ_API = "kubetune.dev/v1alpha1"
APPLY_CONCURRENCY = 8


def _ftj(i: int) -> dict:
    return {"apiVersion": FTJ_API, "kind": "FineTuneJob", "metadata": {"name": f"job-{i:04d}", "namespace": NS},
            "spec": {"baseModel": {"uri": "pvc://models/base"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                     "method": "lora", "output": {"uri": "pvc://runs/out"}}}


def _proc(pid: int) -> tuple[float, float]:
    """CPU seconds so far and peak resident memory (MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu_s, peak


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 2)


def _operator_requests(plane: ControlPlane, user: str, start: float, end: float) -> dict:
    """The operator's requests that finished in [start, end] (wall clock), from the audit log."""
    agents, calls, total, seen = collections.Counter(), collections.Counter(), 0, set()
    for line in plane.audit_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("user", {}).get("username") != user or event["auditID"] in seen:
            continue  # a watch is logged when it starts and again when it ends
        seen.add(event["auditID"])
        stamp = datetime.datetime.fromisoformat(event["stageTimestamp"].replace("Z", "+00:00")).timestamp()
        if not start <= stamp <= end:
            continue
        total += 1
        agents[event.get("userAgent", "").split(" ")[0].split("/")[0]] += 1
        ref = event.get("objectRef", {})
        calls[f"{event['verb']} {ref.get('resource', '')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"] += 1
    seconds = max(end - start, 1e-9)
    return {"seconds": round(seconds, 1), "requests": total, "per_s": round(total / seconds, 2),
            "per_s_by_agent": {a: round(c / seconds, 2) for a, c in agents.most_common()},
            "top": {k: c for k, c in calls.most_common(6)}}


async def _watch(client: KubeClient, path: str, seen: dict[str, float], wanted) -> None:
    """Records when each object first satisfies `wanted`, from a watch of `path`. Watched again from
    the start when the server ends the stream, refuses it (429 while etcd's storage initialises) or
    sends an ERROR event (410 Gone): a watch without a resourceVersion lists every object first, so
    nothing is missed."""
    url = client.config.server + path
    headers = {"Authorization": client.config.authorization()} if client.config.authorization() else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as session:
        while True:
            async with session.get(url, params={"watch": "true"}, ssl=client.config.ssl_context()) as response:
                if response.status != 200:
                    await asyncio.sleep(1)  # the server asks to retry later; there is no event to wait on
                    continue
                async for line in response.content:
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        break
                    name = event["object"]["metadata"]["name"]
                    if name not in seen and wanted(event["object"]):
                        seen[name] = time.monotonic()


async def _load(plane: ControlPlane, n: int, operator: subprocess.Popen, steady_s: float, user: str) -> dict:
    client = KubeClient(KubeConfig.from_kubeconfig(plane.admin_kubeconfig))
    jobs_seen: dict[str, float] = {}
    recorded: dict[str, float] = {}
    watchers = [asyncio.create_task(_watch(client, path_for("batch/v1", "jobs", NS), jobs_seen, lambda _: True)),
                asyncio.create_task(_watch(client, path_for(FTJ_API, "finetunejobs", NS), recorded,
                                           lambda o: (o.get("status") or {}).get("phase")))]
    cpu_before, idle_mib = _proc(operator.pid)
    created: dict[str, float] = {}
    slots = asyncio.Semaphore(APPLY_CONCURRENCY)
    wall_start, start = time.time(), time.monotonic()

    async def create(i: int) -> None:
        async with slots:
            doc = _ftj(i)
            await client.create(path_for(FTJ_API, "finetunejobs", NS), doc)
            created[doc["metadata"]["name"]] = time.monotonic()

    try:
        await asyncio.gather(*(create(i) for i in range(n)))
        applied = time.monotonic() - start
        last_report = 0.0
        while len(recorded) < n:
            if operator.poll() is not None:
                raise RuntimeError(f"the operator exited with {operator.returncode}")
            for watcher in watchers:
                if watcher.done():
                    watcher.result()  # a watcher that died would leave the count short forever: say why
            if time.monotonic() - last_report >= 30:
                last_report = time.monotonic()
                print(f"{last_report - start:5.0f}s: {len(created)} applied, {len(jobs_seen)} Jobs, "
                      f"{len(recorded)} statuses", flush=True)
            if time.monotonic() - start > 1800:
                raise TimeoutError(f"{len(recorded)}/{n} recorded after 30 min")
            await asyncio.sleep(0.5)
        all_recorded = time.monotonic() - start
        wall_recorded = time.time()
        cpu_intake, _ = _proc(operator.pid)
        await asyncio.sleep(steady_s)  # the steady state: what waiting jobs cost while nothing changes
        cpu_after, peak_mib = _proc(operator.pid)
        wall_end = time.time()
    finally:
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await client.close()
    latencies = [jobs_seen[job_name(name)] - t for name, t in created.items() if job_name(name) in jobs_seen]
    return {
        "apply_all_s": round(applied, 1), "all_recorded_s": round(all_recorded, 1),
        "jobs_created": len(latencies),
        "apply_to_job_p50_s": _percentile(latencies, 0.5) if latencies else None,
        "apply_to_job_p99_s": _percentile(latencies, 0.99) if latencies else None,
        "operator_cpu_s_intake": round(cpu_intake - cpu_before, 1),
        "operator_cpu_cores_steady": round((cpu_after - cpu_intake) / steady_s, 3),
        "operator_rss_idle_mib": round(idle_mib, 1), "operator_rss_peak_mib": round(peak_mib, 1),
        "operator_requests_intake": await asyncio.to_thread(_operator_requests, plane, user, wall_start, wall_recorded),
        "operator_requests_steady": await asyncio.to_thread(_operator_requests, plane, user, wall_recorded, wall_end),
    }


def _start_operator(plane: ControlPlane, work: Path, max_running: int) -> subprocess.Popen:
    """The operator as in a pod: a ServiceAccount token and CA in a directory, KUBERNETES_SERVICE_*."""
    plane.kubectl("create", "serviceaccount", ACCOUNT, "-n", NS)
    # The benchmark measures load, not permissions (tests/realplane/test_operator_rbac.py does those).
    plane.kubectl("create", "clusterrolebinding", "kubetune-bench", "--clusterrole=cluster-admin",
                  f"--serviceaccount={NS}:{ACCOUNT}")
    sa_dir = work / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(plane.token_for(NS, ACCOUNT, expiration_s=7200))
    (sa_dir / "ca.crt").write_bytes(Path(plane.ca_file).read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_SERVICE_", "KUBECONFIG"))}
    env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(plane.port),
               KUBETUNE_SERVICE_ACCOUNT_DIR=str(sa_dir), KUBETUNE_MAX_RUNNING_PER_NAMESPACE=str(max_running))
    log = open(work / "operator.log", "wb")
    return subprocess.Popen([str(Path(sys.executable).parent / "kubetune"), "operator", "--standalone", "-n", NS],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _operator_watching(plane: ControlPlane, user: str) -> bool:
    return plane.audit_log.exists() and any(
        f'"{user}"' in line and '"verb":"watch"' in line and '"resource":"finetunejobs"' in line
        for line in plane.audit_log.read_text().splitlines())


def main(n: int, max_running: int, steady_s: float, out: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="kubetune-scale-") as tmp, ControlPlane(Path(tmp) / "plane") as plane:
        work = Path(tmp)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.dev",
                      "crd/loraadapters.kubetune.dev")
        plane.kubectl("create", "namespace", NS)
        user = f"system:serviceaccount:{NS}:{ACCOUNT}"
        operator = _start_operator(plane, work, max_running)
        try:
            deadline = time.monotonic() + 120
            while not _operator_watching(plane, user):
                if operator.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator is not watching: {(work / 'operator.log').read_text()[-2000:]}")
                time.sleep(0.5)  # polling the audit log of another process; nothing to wait on
            result = {"jobs": n, "max_running_per_namespace": max_running,
                      "plane": Path(plane.components["kube-apiserver"].argv[0]).parent.name,
                      **asyncio.run(_load(plane, n, operator, steady_s, user)),
                      "machine": f"{os.cpu_count()} CPU cores (control plane, load generator and operator share them)"}
        finally:
            operator.terminate()
            operator.wait(30)
    print(json.dumps(result, indent=1))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--max-running", type=int, default=0, help="KUBETUNE_MAX_RUNNING_PER_NAMESPACE (0: no limit)")
    ap.add_argument("--steady-s", type=float, default=60, help="how long the steady state is measured")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    main(a.jobs, a.max_running, a.steady_s, a.out)
