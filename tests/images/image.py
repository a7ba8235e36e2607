"""Running a built image as an image, with no container engine: umoci unpacks its OCI layout into a
root filesystem and an OCI runtime config (the image's user, environment, entrypoint and working
directory, as a runtime would take them), and bubblewrap runs the entrypoint inside that root, as
the image's user for real (setpriv drops root before bwrap starts), with the root read-only and
/tmp a fresh tmpfs, as the chart runs its pods. The network is this machine's: the servers the
tests start on 127.0.0.1 are reachable, nothing else is."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))


def layout(name: str) -> Path:
    """The OCI layout scripts/build-images wrote for image `name` (in build/images, or
    $KUBETUNE_IMAGE_DIR). The image tests are opt-in, per image (a build takes minutes; the
    trainer's far longer): they run for the images named in $KUBETUNE_IMAGE_TESTS (e.g.
    `operator,trainer`) and fail if such an image was not built; the others skip."""
    if name not in os.environ.get("KUBETUNE_IMAGE_TESTS", "").split(","):
        pytest.skip(f"opt-in: scripts/build-images {name}, then KUBETUNE_IMAGE_TESTS={name}")
    path = Path(os.environ.get("KUBETUNE_IMAGE_DIR") or REPO / "build" / "images").resolve() / name
    assert (path / "index.json").is_file(), f"{path}: no OCI layout; run scripts/build-images {name}"
    return path


@dataclass(frozen=True)
class UnpackedImage:
    rootfs: Path
    uid: int
    gid: int
    env: dict[str, str]
    args: list[str]  # ENTRYPOINT + CMD
    cwd: str

    def command(self, args: list[str] | None = None, *, env: dict[str, str] | None = None,
                binds: dict[Path, str] | None = None) -> list[str]:
        """argv that runs `args` (default: the image's own) in the image; binds maps host paths to
        paths in the sandbox (read-write: a pod's volumes), under /tmp or an existing directory."""
        command = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                   "bwrap", "--ro-bind", str(self.rootfs), "/", "--proc", "/proc", "--dev", "/dev",
                   "--tmpfs", "/tmp", "--unshare-pid", "--unshare-ipc", "--die-with-parent",
                   "--chdir", self.cwd, "--clearenv"]
        for host, target in (binds or {}).items():
            command += ["--bind", str(host), target]
        for key, value in {**self.env, **(env or {})}.items():
            command += ["--setenv", key, value]
        return command + ["--", *(self.args if args is None else args)]


def unpack(layout_dir: Path, dest: Path) -> UnpackedImage:
    """The image tagged with the project's version, unpacked by umoci into dest (which must not
    exist); dest is left readable by the image's user, as a node's image store is."""
    subprocess.run(["umoci", "unpack", "--image", f"{layout_dir}:{VERSION}", str(dest)], check=True,
                   capture_output=True, timeout=900)
    dest.chmod(0o755)
    process = json.loads((dest / "config.json").read_text())["process"]
    env = dict(item.split("=", 1) for item in process["env"])
    env.pop("TERM", None)  # umoci's addition for a terminal; a pod has none
    return UnpackedImage(dest / "rootfs", process["user"]["uid"], process["user"]["gid"], env,
                         process["args"], process.get("cwd") or "/")


def shared_dir(prefix: str) -> Path:
    """A fresh directory the image's user can reach (pytest's own tmp is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
