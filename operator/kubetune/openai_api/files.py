"""Uploaded files in the object store, one prefix per namespace: `<files-uri>/<namespace>/<file-id>/`
holds the content (`data.<suffix>`, the URI a FineTuneJob's dataset points at) and `meta/file.json`.

The meta object is written after the content and removed before it, so a file exists exactly when its
meta object does: a failed upload or a half-done delete never shows a file that cannot be read.
Blocking (the minio SDK); the app calls these from a thread.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from kubetune.openai_api.models import FileObject
from kubetune.storage.location import Location, ObjectMissing

META_DIR = "meta"  # a prefix of its own: Location deletes by prefix
META = f"{META_DIR}/file.json"


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileStore:
    def __init__(self, root: Location):
        self.root = root

    def _dir(self, namespace: str, file_id: str) -> Location:
        return self.root.child(namespace).child(file_id)

    def content_uri(self, namespace: str, file_id: str, suffix: str) -> str:
        return f"{self._dir(namespace, file_id).uri}/data{suffix}"

    def put(self, namespace: str, file: FileObject, local: Path, suffix: str, details: dict) -> None:
        self.root.ensure_ready()
        where = self._dir(namespace, file.id)
        meta = file.model_dump(mode="json") | {"suffix": suffix, "details": details}
        try:
            where.put_file(f"data{suffix}", local)
            where.put_bytes(META, json.dumps(meta).encode())
        except BaseException:
            where.delete_prefix("")  # the content of an upload that never became a file
            raise

    def _meta(self, namespace: str, file_id: str) -> dict | None:
        if not file_id.startswith("file-") or "/" in file_id:
            return None
        try:
            return json.loads(self._dir(namespace, file_id).get_bytes(META))
        except ObjectMissing:
            return None

    def get(self, namespace: str, file_id: str) -> FileObject | None:
        meta = self._meta(namespace, file_id)
        return FileObject.model_validate({k: meta[k] for k in FileObject.model_fields if k in meta}) if meta else None

    def kind(self, namespace: str, file_id: str) -> tuple[str, str | None] | None:
        """A stored file's suffix and the dataset format its upload check detected (None for files
        stored before it was kept); None when there is no such file."""
        meta = self._meta(namespace, file_id)
        return (meta["suffix"], (meta.get("details") or {}).get("format")) if meta else None

    def list(self, namespace: str) -> list[FileObject]:
        ids = {o.rel.split("/")[0] for o in self.root.child(namespace).list() if o.rel.endswith("/" + META)}
        found = [f for f in (self.get(namespace, i) for i in ids) if f is not None]
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    def content(self, namespace: str, file_id: str) -> bytes | None:
        meta = self._meta(namespace, file_id)
        return self._dir(namespace, file_id).get_bytes(f"data{meta['suffix']}") if meta else None

    def delete(self, namespace: str, file_id: str) -> bool:
        if self._meta(namespace, file_id) is None:
            return False
        where = self._dir(namespace, file_id)
        where.delete_prefix(META_DIR)
        where.delete_prefix("")
        return True
