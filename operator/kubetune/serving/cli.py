"""`kubetune adapters serve-manifest` and `kubetune adapters pull`: a LoraAdapter's serving
manifests as YAML, and its files (adapter, merged model, GGUF) copied to a local directory
through its run manifest, each checked against its sha256.

A LoraAdapter is named by its name in the cluster (kubeconfig), or given as a file
(`kubectl get lora NAME -o yaml`); `pull` also takes an artifact URI (s3://..., pvc://...) and a
base model's URI (its ModelManifest). Store credentials come from the environment, as for
`kubetune models import`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune.contract import MERGED_DIR
from kubetune.serving.manifests import TARGETS, NotServable, ServeSource, aibrix_secret_note, serve_manifests, to_yaml
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import IntegrityError, Location, ObjectMissing, open_location, sha256_file
from kubetune.storage.manifest import FileEntry, Manifest, read_manifest

PARTS = ("adapter", "merged", "gguf")


class PullError(Exception):
    """What could not be pulled, and why."""


def selected(manifest: Manifest, only: str | None, uri: str) -> list[FileEntry]:
    """The files of a run manifest's parts (all it published, or `only` one), or all of a model's."""
    if manifest.kind == "ModelManifest":
        if only:
            raise PullError(f"{uri} is a model (ModelManifest): --only applies to runs")
        return list(manifest.files)
    if manifest.kind != "RunManifest":
        raise PullError(f"{uri}: a {manifest.kind}, neither a run nor a model")
    layout = manifest.metadata.get("layout") or {}
    if only and not layout.get(only) and only != "merged":  # a merge Job's model is not in the run's manifest
        raise PullError(f"{uri}: the run published no {only} files")
    prefixes = [layout[p].rstrip("/") + "/" for p in ((only,) if only else PARTS) if layout.get(p)]
    return [f for f in manifest.files if f.path.startswith(tuple(prefixes))]


def merge_job_model(location: Location, manifest: Manifest, only: str | None) -> Manifest | None:
    """The merged model a merge Job published under the artifact (ARTIFACT/merged/, with its own
    ModelManifest) when the run itself published none and merged files are wanted."""
    if manifest.kind != "RunManifest" or (manifest.metadata.get("layout") or {}).get("merged") \
            or only not in (None, "merged"):
        return None
    try:
        merged = read_manifest(location.child(MERGED_DIR))
    except ObjectMissing:
        return None
    return merged if merged.kind == "ModelManifest" else None


def _target(dest: Path, entry: FileEntry) -> Path:
    target = (dest / entry.path).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise PullError(f"{entry.path}: the manifest names a path outside {dest}")
    return target


def pull_files(location: Location, entries: list[FileEntry], dest: Path) -> int:
    """Download each entry under dest, checked against its size and sha256; the bytes written. A
    file is downloaded under a temporary name and renamed once it matches, so a mismatch leaves
    nothing under dest; a file already there with the right sha256 is kept."""
    written = 0
    for entry in entries:
        target = _target(dest, entry)
        if target.is_file() and target.stat().st_size == entry.size and sha256_file(target) == entry.sha256:
            continue
        temporary = target.with_name(f".{target.name}.pulling")
        try:
            location.get_file(entry.path, temporary, size=entry.size, sha256=entry.sha256)
        except IntegrityError as exc:
            temporary.unlink(missing_ok=True)
            raise PullError(f"{exc}: {entry.path} was not written") from exc
        except ObjectMissing as exc:
            raise PullError(f"{exc}: listed in the manifest but missing from the store") from exc
        os.replace(temporary, target)
        written += entry.size
    return written


def pull(uri: str, dest: Path, only: str | None, storage: StorageConfig | None,
         volume_root: Path = Path("/")) -> tuple[list[FileEntry], int]:
    location = open_location(uri, storage=storage, volume_root=volume_root, retry_budget_s=30)
    try:
        manifest = read_manifest(location)
    except ObjectMissing as exc:
        raise PullError(f"{uri}: no manifest.json (a run publishes it last, once it succeeded)") from exc
    entries = selected(manifest, only, uri)
    written = pull_files(location, entries, dest)
    merged = merge_job_model(location, manifest, only)
    if merged is not None:
        written += pull_files(location.child(MERGED_DIR), merged.files, dest / MERGED_DIR)
        entries += [FileEntry(f"{MERGED_DIR}/{f.path}", f.size, f.sha256) for f in merged.files]
    elif only == "merged" and not entries:
        raise PullError(f"{uri}: no merged model, neither in the run nor from a merge Job")
    return entries, written


def _adapter(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        with open(args.file, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        if not isinstance(doc, dict) or doc.get("kind") != "LoraAdapter":
            raise NotServable(f"{args.file}: not a LoraAdapter")
        return doc
    if not args.name:
        raise NotServable("name a LoraAdapter, or give one with --file")
    import asyncio

    from kubetune.controller.adapters import adapter_path
    from kubetune.controller.kube import KubeClient, KubeConfig

    async def fetch() -> dict | None:
        client = KubeClient(KubeConfig.load())
        try:
            return await client.get(adapter_path(args.namespace, args.name))
        finally:
            await client.close()
    adapter = asyncio.run(fetch())
    if adapter is None:
        raise NotServable(f"no LoraAdapter {args.namespace}/{args.name}")
    return adapter


def _cmd_serve_manifest(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {}
    if args.target in ("vllm", "kserve"):
        options["gpus"] = args.gpus
    if args.target == "aibrix" and args.base_name:
        options["base_name"] = args.base_name
    if args.target == "ollama":
        options["claim"] = args.ollama_claim
    try:
        adapter = _adapter(args)
        docs = serve_manifests(adapter, args.target, **options)
    except (NotServable, OSError, ValueError) as exc:
        print(f"kubetune adapters serve-manifest: {exc}", file=sys.stderr)
        return 1
    print(to_yaml(docs), end="")
    source = ServeSource.from_adapter(adapter)
    if args.target == "aibrix" and source.storage_secret:
        print(f"# {aibrix_secret_note(source.storage_secret, source.namespace)}", file=sys.stderr)
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from kubetune.runs_cli import RunError, resolve

    try:
        (uri,) = resolve([args.ref], args.namespace)
        storage = StorageConfig.from_env() if uri.startswith("s3://") else None
        entries, written = pull(uri, Path(args.dir), args.only, storage, Path(args.volume_root))
    except (PullError, RunError, StorageUnavailable, ValueError) as exc:
        print(f"kubetune adapters pull: {exc}", file=sys.stderr)
        return 1
    print(f"{len(entries)} files of {uri} in {args.dir} match their sha256 ({written:,d} bytes downloaded)")
    return 0


def register(adapters) -> None:
    """Adds `serve-manifest` and `pull` to `kubetune adapters`."""
    serve = adapters.add_parser("serve-manifest", help="print ready-to-apply manifests serving a verified adapter")
    serve.add_argument("name", nargs="?", help="the LoraAdapter (kubeconfig)")
    serve.add_argument("--file", "-f", help="a LoraAdapter with its status, e.g. `kubectl get lora NAME -o yaml`")
    serve.add_argument("--for", dest="target", choices=TARGETS, required=True)
    serve.add_argument("--namespace", "-n", default="default")
    serve.add_argument("--gpus", type=int, default=1, help="vllm, kserve: GPUs per replica")
    serve.add_argument("--base-name", help="aibrix: the base model's model.aibrix.ai/name (default: from its URI)")
    serve.add_argument("--ollama-claim", default="ollama-models", help="ollama: the claim Ollama keeps models on")
    serve.set_defaults(run=_cmd_serve_manifest)
    pull_cmd = adapters.add_parser("pull", help="download an adapter's files through its manifest, checking each "
                                                "sha256 (credentials from KUBETUNE_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY)")
    pull_cmd.add_argument("ref", metavar="NAME", help="LoraAdapter or FineTuneJob name, an artifact URI, or a base "
                                                      "model's URI")
    pull_cmd.add_argument("dir", metavar="DIR")
    pull_cmd.add_argument("--only", choices=PARTS, help="only these files of the run (default: all it published)")
    pull_cmd.add_argument("--namespace", "-n", default="default")
    pull_cmd.add_argument("--volume-root", default="/", help="where pvc:// claims are mounted on this machine")
    pull_cmd.set_defaults(run=_cmd_pull)
