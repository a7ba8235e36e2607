"""What verifying a LoraAdapter costs the operator: wall time, CPU seconds and peak memory of the
operator-side verify call (`kubetune.controller.adapters._verify`) on a 2 GiB artifact in a real S3
server (SeaweedFS, as the tests use), in a fresh process so that its peak RSS is the call's.

The artifact is one object of random bytes, listed with its size and sha256 in a RunManifest. With
`--content`, the verification Job's content check (`kubetune_trainer.verify_job.run_verify`) is
measured too: the data-plane work that moved out of the operator.

Usage: python bench/verify_memory.py --label after --content --out bench/results/cpu2-2026-12-01-verify-2gib.json
  before (the operator as of 896ee54): git archive 896ee54 operator | tar -x -C /tmp/before && python
  bench/verify_memory.py --label before --operator-code /tmp/before/operator --out ...
Results from several labels accumulate in the one file. The object is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kubetune.local.s3server import S3Server
from kubetune.storage.location import open_location
from kubetune.storage.manifest import Manifest, describe_dir, publish

BLOCK = 16 * 1024 * 1024

# Run in a child process: its peak RSS is then this call's, after the operator's imports. VmHWM, not
# ru_maxrss: Linux carries ru_maxrss across execve, so a child's would start at the parent's peak.
CHILD = r"""
import json, os, resource, sys, tempfile, threading, time

from kubetune.storage.config import StorageConfig

def peak_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024, 1)

def scratch_bytes():
    total = 0
    for root, _, files in os.walk(tempfile.gettempdir()):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # removed while counted
    return total

mode, uri, sha, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
storage = StorageConfig(**config)
if mode == "operator":
    from kubetune.controller.adapters import _verify
    call = lambda: _verify(uri, storage, sha).problems
else:
    from kubetune_trainer.verify_job import VerifySpec, run_verify
    call = lambda: run_verify(VerifySpec(artifactUri=uri, manifestSha256=sha), storage)["problems"]
# What the call writes to temporary files (TMPDIR is a fresh directory), sampled while it runs.
disk, done = [0], threading.Event()
def sample():
    while not done.wait(0.1):
        disk[0] = max(disk[0], scratch_bytes())
threading.Thread(target=sample, daemon=True).start()
imported = peak_mib()
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
problems = call()
wall = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
done.set()
print(json.dumps({"wallSeconds": round(wall, 3),
                  "cpuSeconds": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
                  "rssAfterImportsMiB": imported,
                  "peakRssMiB": peak_mib(),
                  "peakTempDiskMiB": round(disk[0] / 2**20, 1),
                  "problems": problems}))
"""


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for offset in range(0, size, BLOCK):
            fh.write(os.urandom(min(BLOCK, size - offset)))


def measure(mode: str, uri: str, sha: str, server: S3Server, code: Path | None) -> dict:
    config = server.config
    args = json.dumps({"endpoint": config.endpoint, "access_key": config.access_key,
                       "secret_key": config.secret_key, "secure": False, "region": config.region})
    scratch = Path(tempfile.mkdtemp(dir="/tmp", prefix="verify-bench-scratch-"))
    env = {**os.environ, "TMPDIR": str(scratch)} | ({"PYTHONPATH": str(code)} if code else {})
    out = subprocess.run([sys.executable, "-c", CHILD, mode, uri, sha, args], check=True, capture_output=True,
                         text=True, env=env)
    shutil.rmtree(scratch)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", required=True, help="before or after")
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--content", action="store_true", help="also measure the verification Job's content check")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--operator-code", type=Path,
                        help="another version's operator/ directory to measure, e.g. one exported with "
                             "`git archive COMMIT operator | tar -x -C DIR` (default: the installed package)")
    args = parser.parse_args()
    size = int(args.size_gib * 1024 ** 3)
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="verify-bench-") as tmp:
        root = Path(tmp)
        server = S3Server(root / "s3", root / "weed.log")
        server.start()
        try:
            run = root / "run"
            (run / "adapter").mkdir(parents=True)
            write_random(run / "adapter" / "adapter_model.safetensors", size)
            location = open_location("s3://bench/run", storage=server.config, volume_root=root)
            location.ensure_ready()
            sha = publish(location, Manifest("RunManifest", describe_dir(run), {"layout": {"adapter": "adapter"}}),
                          run)
            (run / "adapter" / "adapter_model.safetensors").unlink()
            result = {"operator": measure("operator", location.uri, sha, server, args.operator_code)}
            if args.content:
                result["verificationJob"] = measure("job", location.uri, sha, server, None)
            location.delete_prefix("")
        finally:
            server.stop()
    report = json.loads(args.out.read_text()) if args.out.exists() else {
        "machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "artifactBytes": size, "command": " ".join(sys.argv)}
    report[args.label] = result
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
