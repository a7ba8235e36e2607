"""How the operator copes with many FineTuneJobs: N are created at once against the local API server;
the operator (`kubetune operator`, a separate process) must create every Job and record every status.
Reports the time until all are reconciled, apply -> Job latency, and the operator's peak memory.

Usage: python bench/operator_scale.py --jobs 1000 [--out bench/results/operator-scale.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import kmock

from kubetune.api import FineTuneJob, LoraAdapter
from kubetune.api.crd import build_crd
from kubetune.local.apiserver import ApiServer
from kubetune.local.stack import write_kubeconfig

NS = "scale"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # peak resident set size
            return int(line.split()[1]) / 1024
    return float("nan")


def _ftj(i: int) -> dict:
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": f"job-{i:04d}", "namespace": NS},
            "spec": {"baseModel": {"uri": "pvc://models/base"}, "dataset": {"uri": "pvc://data/train.jsonl"},
                     "method": "lora", "output": {"uri": "pvc://runs/out"}}}


async def main(n: int, out: Path | None) -> None:
    async with ApiServer() as api, kmock.Server(api) as server:
        api.request_log_limit = 32
        api.history_limit = 4
        url = str(server.url).rstrip("/")
        for kind in (FineTuneJob, LoraAdapter):
            api.serve_crd(build_crd(kind))
        await api.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        config = Path(f"/tmp/kubetune-scale-{os.getpid()}.kubeconfig")
        write_kubeconfig(config, url)
        env = {**os.environ, "KUBECONFIG": str(config)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        log = open(f"/tmp/kubetune-scale-{os.getpid()}.log", "wb")
        operator = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "operator", "--standalone", "-n", NS],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            baseline_mib = 0.0
            while not any(r.action is not None and r.action.name == "WATCH" for r in list(api)):
                if operator.poll() is not None:
                    raise RuntimeError(f"the operator exited with {operator.returncode}; see {log.name}")
                await asyncio.sleep(0.1)
            baseline_mib = _rss_mib(operator.pid)
            start = time.monotonic()
            created_at: dict[str, float] = {}
            job_seen: dict[str, float] = {}
            peak_mib = baseline_mib

            async def watch() -> None:
                # Polls what the API server holds while the jobs are being applied, so each Job's
                # appearance is timed from its own FineTuneJob's creation.
                nonlocal peak_mib
                last_report = 0.0
                while True:
                    now = time.monotonic()
                    for (resource, _, name), obj in list(api.objects.items()):
                        if resource.plural == "jobs" and name not in job_seen and not obj.deleted:
                            job_seen[name] = now
                    done = sum(1 for (resource, _, _), obj in list(api.objects.items())
                               if resource.plural == "finetunejobs" and not obj.deleted
                               and (obj.raw.get("status") or {}).get("phase"))
                    peak_mib = max(peak_mib, _rss_mib(operator.pid))
                    if done == n and len(job_seen) == n:
                        return
                    if now - last_report >= 30:
                        last_report = now
                        print(f"{now - start:5.0f}s: {len(created_at)} applied, {len(job_seen)} Jobs, "
                              f"{done} statuses, operator {peak_mib:.0f} MiB", flush=True)
                    if now - start > 1800:
                        raise TimeoutError(f"{done}/{n} reconciled after 30 min")
                    await asyncio.sleep(0.2)

            watcher = asyncio.create_task(watch())
            for i in range(n):
                await api.post(f"/apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs", json=_ftj(i))
                created_at[f"job-{i:04d}"] = time.monotonic()
            applied = time.monotonic() - start
            await watcher
            total = time.monotonic() - start
            latencies = sorted(job_seen[f"{name}-train"] - t for name, t in created_at.items())
            result = {"jobs": n, "apply_all_s": round(applied, 1), "all_reconciled_s": round(total, 1),
                      "apply_to_job_p50_s": round(latencies[n // 2], 2),
                      "apply_to_job_p99_s": round(latencies[int(n * 0.99) - 1], 2),
                      "operator_rss_idle_mib": round(baseline_mib, 1),
                      "operator_rss_peak_mib": round(peak_mib, 1),
                      "machine": f"{os.cpu_count()} CPU cores (API server, load generator and operator share them)"}
            print(json.dumps(result))
            if out:
                out.write_text(json.dumps(result, indent=2) + "\n")
        finally:
            operator.terminate()
            operator.wait(30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    asyncio.run(main(a.jobs, a.out))
