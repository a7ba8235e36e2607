"""`kubetune bundle OUT_DIR`: one directory that carries an install into an air-gapped cluster.

    images/NAME.oci.tar         each image as an OCI archive (from scripts/build-images' layouts)
    charts/kubetune-V.tgz       the chart, packaged by `helm package`
    crds/*.yaml                 the CustomResourceDefinitions (also inside the chart)
    models/NAME/...             optional base models, with models/NAME.manifest.json beside each
    bundle.json                 what is where: image references and digests, chart, models
    SHA256SUMS                  every file above, for `sha256sum -c SHA256SUMS`

The bundle is written beside OUT_DIR and renamed into place when complete: a failed run leaves no
half bundle, and an existing OUT_DIR is never touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

IMAGES = ("operator", "trainer")
REGISTRY = "ghcr.io/kubetune"  # the chart's default image names; a mirror replaces the host


class BundleImage(BaseModel):
    name: str
    archive: str  # relative to the bundle
    reference: str  # the name the chart expects, before a mirror replaces the registry
    digest: str  # of the image manifest: the same in every registry it is copied into


class BundleModel(BaseModel):
    name: str
    dir: str
    manifest: str
    files: int
    size: int


class BundleIndex(BaseModel):
    version: str
    images: list[BundleImage]
    chart: str
    crds: list[str]
    models: list[BundleModel]


@dataclass(frozen=True)
class BundleInputs:
    version: str
    chart_dir: Path
    crd_dir: Path
    layouts: dict[str, Path]  # image name -> OCI layout written by scripts/build-images
    models: tuple[Path, ...]
    helm: str


def problems(inputs: BundleInputs, out: Path) -> list[str]:
    """Everything wrong with the inputs, found before anything is written."""
    found = []
    if out.exists():
        found.append(f"{out}: exists; bundle into a new directory")
    for name, layout in inputs.layouts.items():
        if _tagged(layout, inputs.version) is None:
            found.append(f"{layout}: no OCI layout of the {name} image tagged {inputs.version} "
                         f"(scripts/build-images {name} writes it)")
    if not (inputs.chart_dir / "Chart.yaml").is_file():
        found.append(f"{inputs.chart_dir}: no Chart.yaml")
    if not sorted(inputs.crd_dir.glob("*.yaml")):
        found.append(f"{inputs.crd_dir}: no CRDs (*.yaml)")
    names = [model.name for model in inputs.models]
    for model in inputs.models:
        if not (model / "config.json").is_file():
            found.append(f"{model}: not a transformers model directory: no config.json")
        if names.count(model.name) > 1:
            found.append(f"{model}: another model directory has the same name {model.name!r}")
    if shutil.which(inputs.helm) is None:
        found.append(f"{inputs.helm}: not found; pass --helm or put helm on PATH")
    if inputs.layouts and shutil.which("skopeo") is None:
        found.append("skopeo: not found (apt-get install skopeo)")
    return sorted(set(found))


def _tagged(layout: Path, tag: str) -> str | None:
    """The manifest digest tagged `tag` in an OCI layout, or None."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return next((m["digest"] for m in index.get("manifests", [])
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag), None)


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(inputs: BundleInputs, out: Path) -> BundleIndex:
    """Writes the bundle at `out` (see the module's docstring); raises ValueError naming every
    problem with the inputs, RuntimeError when a tool fails."""
    found = problems(inputs, out)
    if found:
        raise ValueError("; ".join(found))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp's 0700 would travel with the bundle
    try:
        index = _fill(inputs, work)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return index


def _fill(inputs: BundleInputs, work: Path) -> BundleIndex:
    images = []
    (work / "images").mkdir()
    for name, layout in inputs.layouts.items():
        archive = f"images/{name}.oci.tar"
        # skopeo writes the archive itself: the same blobs, so the digest stays the layout's.
        _run(["skopeo", "copy", "--quiet", f"oci:{layout}:{inputs.version}",
              f"oci-archive:{work / archive}:{inputs.version}"])
        images.append(BundleImage(name=name, archive=archive, reference=f"{REGISTRY}/{name}:{inputs.version}",
                                  digest=_tagged(layout, inputs.version) or ""))
    (work / "charts").mkdir()
    _run([inputs.helm, "package", str(inputs.chart_dir), "--destination", str(work / "charts")])
    chart = next((work / "charts").glob("*.tgz")).relative_to(work).as_posix()
    (work / "crds").mkdir()
    crds = []
    for crd in sorted(inputs.crd_dir.glob("*.yaml")):
        shutil.copyfile(crd, work / "crds" / crd.name)
        crds.append(f"crds/{crd.name}")
    models = [_export_model(model, work / "models") for model in inputs.models]
    index = BundleIndex(version=inputs.version, images=images, chart=chart, crds=crds, models=models)
    (work / "bundle.json").write_text(index.model_dump_json(indent=2) + "\n")
    files = sorted(p for p in work.rglob("*") if p.is_file())
    (work / "SHA256SUMS").write_text("".join(f"{_sha256(p)}  {p.relative_to(work).as_posix()}\n" for p in files))
    return index


def _export_model(model: Path, models: Path) -> BundleModel:
    """The model's files and, beside them, the ModelManifest that `kubetune models import` writes
    (the same description of every file, size and sha256) to check them by after the carry."""
    # Here, not at the top: the CLI imports this module for every command, and the storage
    # package needs the minio client, which the base install (`kubetune validate`) lacks.
    from kubetune.storage.manifest import Manifest, describe_dir

    shutil.copytree(model, models / model.name)
    config = json.loads((model / "config.json").read_text())
    manifest = Manifest("ModelManifest", describe_dir(models / model.name), {
        "model": {"architectures": config.get("architectures"), "modelType": config.get("model_type")}})
    (models / f"{model.name}.manifest.json").write_bytes(manifest.to_json())
    return BundleModel(name=model.name, dir=f"models/{model.name}", manifest=f"models/{model.name}.manifest.json",
                       files=len(manifest.files), size=manifest.total_size)


def verify_bundle(bundle: Path) -> list[str]:
    """Files of a bundle that SHA256SUMS does not vouch for: missing, changed or unlisted."""
    listed = {}
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    found = [f"{name}: missing" for name in listed if not (bundle / name).is_file()]
    found += [f"{name}: sha256 mismatch" for name, digest in listed.items()
              if (bundle / name).is_file() and _sha256(bundle / name) != digest]
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    found += [f"{name}: not in SHA256SUMS" for name in sorted(present - listed.keys())]
    return found


# -- the command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="the bundle directory to create (must not exist)")
    parser.add_argument("--root", default=".", help="repository root (the chart and the CRDs)")
    parser.add_argument("--images-from", default="build/images",
                        help="where scripts/build-images wrote the OCI layouts (default: build/images)")
    parser.add_argument("--image", action="append", choices=IMAGES,
                        help="bundle only these images (repeatable; default: operator and trainer)")
    parser.add_argument("--model", action="append", default=[], type=Path,
                        help="a base model directory to carry (repeatable)")
    parser.add_argument("--helm", default=os.environ.get("KUBETUNE_HELM", "helm"),
                        help="the helm binary for `helm package` (default: $KUBETUNE_HELM, else helm on PATH)")


def run(args: argparse.Namespace) -> int:
    from kubetune import __version__

    root, images_from = Path(args.root), Path(args.images_from)
    inputs = BundleInputs(version=__version__, chart_dir=root / "charts" / "kubetune", crd_dir=root / "crds",
                          layouts={name: images_from / name for name in (args.image or IMAGES)},
                          models=tuple(args.model), helm=args.helm)
    out = Path(args.out)
    try:
        index = write_bundle(inputs, out)
    except (ValueError, RuntimeError) as exc:
        print(f"kubetune bundle: {exc}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundle {out}: {len(index.images)} image(s), {index.chart}, {len(index.crds)} CRD(s), "
          f"{len(index.models)} model(s); {size / 2**20:.0f} MiB; check with: cd {out} && sha256sum -c SHA256SUMS")
    return 0
