"""`kubetune local up` / `down`: the stack as a background process that outlives the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubetune.local.podruntime import kill_leftovers, leftover_processes


def start(state: Path, port: int, gpus: int, timeout_s: float = 600, control_plane: str = "emulator") -> int:
    state.mkdir(parents=True, exist_ok=True)
    pid_file, ready = state / "stack.pid", state / "ready"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"already up: KUBECONFIG={state.resolve() / 'kubeconfig'}")
        return 0
    ready.unlink(missing_ok=True)
    with open(state / "stack.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "local", "serve", "--state", str(state),
                                    "--port", str(port), "--gpus", str(gpus), "--control-plane", control_plane],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(process.pid))
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            print(f"the stack did not come up; see {state / 'stack.log'}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"local stack up at {ready.read_text()}\n  export KUBECONFIG={state.resolve() / 'kubeconfig'}\n"
          f"  kubectl apply -f examples/local/finetunejob.yaml && kubectl get ftj -w\n"
          f"  kubetune local down   # stops it")
    return 0


def stop(state: Path, timeout_s: float = 60) -> int:
    """SIGTERM to the stack, which stops its pods (SIGTERM, SIGKILL after its shutdown grace period);
    then whatever outlived it is killed: the stack after `timeout_s`, any pod process at once."""
    pid_file = state / "stack.pid"
    if not pid_file.exists():
        print("no local stack is up")
        return 0
    pid = int(pid_file.read_text())
    if _alive(pid):
        running = len(leftover_processes(state))
        print(f"stopping the local stack{f' and its {running} pod(s)' if running else ''}...", flush=True)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            print(f"the stack did not stop within {timeout_s:.0f} s: killed", file=sys.stderr)
            os.killpg(pid, signal.SIGKILL)
    killed = kill_leftovers(state)
    if killed:
        print(f"killed {len(killed)} pod process(es) that outlived the stack: {' '.join(map(str, killed))}",
              file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while leftover_processes(state) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = leftover_processes(state)
    pid_file.unlink()
    if left:
        print(f"pod process(es) still running after SIGKILL: {' '.join(map(str, left))}", file=sys.stderr)
        return 1
    print("local stack down")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
