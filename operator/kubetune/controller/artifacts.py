"""What a LoraAdapter owns in the object store, and how to tell cheaply that it changed: pure functions.

An adapter owns the objects its verified run manifest lists and that manifest; nothing else under
its prefix (checkpoints, other runs sharing a prefix string, a bucket's other contents).
"""

from __future__ import annotations

import hashlib

from kubetune.storage.location import ObjectInfo
from kubetune.storage.manifest import MANIFEST, FileEntry, Manifest

RUN_MANIFEST = "RunManifest"


class UnsafeManifest(ValueError):
    pass


def _unsafe(path: str) -> bool:
    parts = path.split("/")
    return not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts)


def deletion_keys(manifest: Manifest) -> list[str]:
    """The keys to delete, relative to the artifact: the manifest first (from then on no reader
    trusts what remains, even if the rest fails half-way), then exactly the files it lists."""
    if manifest.kind != RUN_MANIFEST:
        raise UnsafeManifest(f"{MANIFEST} is a {manifest.kind}, not a {RUN_MANIFEST}: the objects are not an "
                             "adapter's run")
    unsafe = [f.path for f in manifest.files if _unsafe(f.path)]
    if unsafe:
        listed = ", ".join(repr(f.path) for f in manifest.files[:5])
        raise UnsafeManifest(f"{MANIFEST} names objects outside its run ({', '.join(map(repr, unsafe[:5]))}); "
                             f"it lists {listed}")
    return [MANIFEST, *(f.path for f in manifest.files if f.path != MANIFEST)]


def fingerprint(manifest_sha256: str, files: list[FileEntry], listing: list[ObjectInfo]) -> str:
    """A digest of the manifest and, for each file it lists, the size and ETag the store reports (or
    its absence). A listed object whose content changes gets another ETag (an MD5, or a digest of
    its parts), so a changed digest means something must be verified again; computing it needs one
    listing, no download."""
    present = {o.rel: o for o in listing}
    digest = hashlib.sha256(manifest_sha256.encode())
    for entry in sorted(files, key=lambda f: f.path):
        found = present.get(entry.path)
        line = f"{entry.path}\t{found.size}\t{found.etag}" if found else f"{entry.path}\tmissing"
        digest.update(b"\n" + line.encode())
    return digest.hexdigest()
