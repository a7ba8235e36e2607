"""The HTTP API (aiohttp.web): OpenAI's fine-tuning paths over FineTuneJobs and the object store.

Every path is served twice: `/v1/...` works in the caller's own namespace (a service account's
namespace, or the server's default namespace), `/namespaces/{namespace}/v1/...` in the one named,
so an OpenAI client addresses a namespace through its `base_url` alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import BodyPartReader, web
from pydantic import ValidationError

from kubetune.api import API_VERSION, FineTuneJob
from kubetune.api.meta import DNS1123_LABEL, DNS1123_SUBDOMAIN, now_rfc3339
from kubetune.contract import HISTORY_FILE
from kubetune.controller.jobs import run_output_uri
from kubetune.controller.kube import ApiError, KubeClient, path_for
from kubetune.openai_api import mapping
from kubetune.openai_api.auth import Authorizer
from kubetune.openai_api.catalog import lookup, parse_catalog
from kubetune.openai_api.errors import OpenAIError, from_validation, not_found
from kubetune.openai_api.files import FileStore, new_file_id
from kubetune.openai_api.models import FileObject, JobCreate, page
from kubetune.openai_api.uploads import check_dataset, suffix_of
from kubetune.storage.client import StorageUnavailable
from kubetune.storage.config import StorageConfig
from kubetune.storage.location import ObjectMissing, open_location
from kubetune.storage.manifest import MANIFEST, read_manifest
from kubetune_trainer.records import DatasetError

log = logging.getLogger(__name__)
FTJ = "finetunejobs"
CHUNK = 1 << 20
JSON_BODY_LIMIT = 1 << 20


@dataclass
class Service:
    client: KubeClient
    auth: Authorizer
    files: FileStore
    storage: StorageConfig | None
    placement: mapping.Placement
    catalog_ref: tuple[str, str]  # namespace, name of the catalog ConfigMap
    default_namespace: str = "default"
    max_upload_bytes: int = 512 * 1024 * 1024


SERVICE = web.AppKey("service", Service)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OpenAIError as exc:
        return _json(exc.body(), exc.status)
    except web.HTTPRequestEntityTooLarge as exc:
        return _json(OpenAIError(413, f"request body too large: {exc.text}", code="request_too_large").body(), 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json(OpenAIError(exc.status, f"{request.method} {request.path}: {exc.reason}").body(), exc.status)
    except StorageUnavailable as exc:
        log.error("%s %s: %s", request.method, request.path, exc)
        return _json(OpenAIError(503, "the object store is unavailable; try again", code="storage_unavailable").body(),
                     503)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _json(OpenAIError(500, "internal error; the server's log has the details", code="internal").body(), 500)


async def _caller_namespace(request: web.Request, verb: str) -> str:
    """Authenticate, pick the namespace, and check the caller may `verb` FineTuneJobs there."""
    service = request.app[SERVICE]
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    caller = await service.auth.identify(token)
    namespace = request.match_info.get("namespace") or caller.own_namespace or service.default_namespace
    if re.fullmatch(DNS1123_LABEL, namespace) is None or len(namespace) > 63:
        raise OpenAIError(400, f"{namespace!r} is not a namespace name", param="namespace")
    await service.auth.check(caller, namespace, verb)
    return namespace


def _limit(request: web.Request, default: int, most: int = 10_000) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise OpenAIError(400, f"limit must be an integer from 1 to {most}, got {raw!r}", param="limit")
    return int(raw)


# ---- files -------------------------------------------------------------------------------------

async def _receive_upload(request: web.Request, limit: int, work: Path) -> tuple[str | None, str, Path]:
    """The multipart form's purpose and file, the file streamed to disk; 413 past `limit` bytes."""
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise OpenAIError(413, f"the upload is larger than this server's limit of {limit} bytes", param="file",
                          code="file_too_large")
    if not request.content_type.startswith("multipart/"):
        raise OpenAIError(400, "upload a file as multipart/form-data with fields purpose and file", param="file")
    reader = await request.multipart()
    purpose, filename, target = None, None, None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):  # a nested multipart/* part: no field of this form
            raise OpenAIError(400, "upload a flat multipart/form-data form with fields purpose and file",
                              param="file")
        if part.name == "purpose":
            purpose = (await part.read_chunk(256)).decode(errors="replace")
            if not part.at_eof():
                raise OpenAIError(400, "purpose is not a purpose: it is longer than 256 bytes", param="purpose")
        elif part.name == "file":
            filename = Path(part.filename or "upload.jsonl").name
            target = work / f"upload{Path(filename).suffix.lower()}"
            size = 0
            # file I/O off the event loop, like the rest of this module's storage calls
            fh = await asyncio.to_thread(target.open, "wb")
            with fh:
                while block := await part.read_chunk(CHUNK):
                    size += len(block)
                    if size > limit:
                        raise OpenAIError(413, f"the upload is larger than this server's limit of {limit} bytes",
                                          param="file", code="file_too_large")
                    await asyncio.to_thread(fh.write, block)
        else:
            raise OpenAIError(400, f"unknown form field {part.name!r}; send purpose and file", param=part.name)
    if target is None or filename is None:
        raise OpenAIError(400, "the form has no file field", param="file")
    return purpose, filename, target


async def create_file(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "create")
    with tempfile.TemporaryDirectory(prefix="kubetune-upload-") as tmp:
        purpose, filename, local = await _receive_upload(request, service.max_upload_bytes, Path(tmp))
        if purpose != "fine-tune":
            raise OpenAIError(400, f"purpose must be 'fine-tune' on this server, got {purpose!r}", param="purpose",
                              code="invalid_purpose")
        try:
            suffix = suffix_of(filename)
            fmt, records = await asyncio.to_thread(check_dataset, local, filename)
        except DatasetError as exc:
            raise OpenAIError(400, str(exc), param="file", code="invalid_file") from exc
        file = FileObject(id=new_file_id(), bytes=local.stat().st_size, created_at=_now(), filename=filename)
        await asyncio.to_thread(service.files.put, namespace, file, local, suffix,
                                {"format": fmt, "records": records})
    log.info("file %s/%s stored: %s, %d bytes, %d %s records", namespace, file.id, filename, file.bytes, records, fmt)
    return _json(file.model_dump(mode="json"))


def _now() -> int:
    return mapping.epoch_seconds(now_rfc3339()) or 0


async def list_files(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "list")
    purpose = request.query.get("purpose")
    found = [f for f in await asyncio.to_thread(service.files.list, namespace) if purpose in (None, f.purpose)]
    if request.query.get("order") == "asc":
        found.reverse()
    items, more = mapping.paginate(found, lambda f: f.id, request.query.get("after"), _limit(request, 10_000))
    return _json(page(items, more))


async def _result_file(request: web.Request, namespace: str, file_id: str) -> tuple[FileObject, bytes]:
    """A succeeded job's result file: its training history if the run kept one, else its run manifest."""
    service = request.app[SERVICE]
    job = await _job(service, namespace, file_id.removeprefix(mapping.RESULT_FILE_PREFIX), param="file_id")
    uri = ((job.get("status") or {}).get("adapterRef") or {}).get("uri")
    if mapping.job_status(job) != "succeeded" or not uri:
        raise not_found("file", file_id, "file_id")

    def fetch() -> tuple[str, bytes]:
        location = open_location(uri, storage=service.storage, volume_root=Path("/"))
        manifest = read_manifest(location)
        name = HISTORY_FILE if any(f.path == HISTORY_FILE for f in manifest.files) else MANIFEST
        return name, location.get_bytes(name)
    name, data = await asyncio.to_thread(fetch)
    created = mapping.epoch_seconds((job.get("status") or {}).get("completionTime")) or 0
    return FileObject(id=file_id, bytes=len(data), created_at=created, filename=f"{job['metadata']['name']}-{name}",
                      purpose="fine-tune-results"), data


async def get_file(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace, file_id = await _caller_namespace(request, "get"), request.match_info["file_id"]
    if file_id.startswith(mapping.RESULT_FILE_PREFIX):
        return _json((await _result_file(request, namespace, file_id))[0].model_dump(mode="json"))
    file = await asyncio.to_thread(service.files.get, namespace, file_id)
    if file is None:
        raise not_found("file", file_id, "file_id")
    return _json(file.model_dump(mode="json"))


async def file_content(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace, file_id = await _caller_namespace(request, "get"), request.match_info["file_id"]
    data: bytes | None
    if file_id.startswith(mapping.RESULT_FILE_PREFIX):
        data = (await _result_file(request, namespace, file_id))[1]
    else:
        data = await asyncio.to_thread(service.files.content, namespace, file_id)
    if data is None:
        raise not_found("file", file_id, "file_id")
    return web.Response(body=data, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace, file_id = await _caller_namespace(request, "delete"), request.match_info["file_id"]
    # A job that has not finished may still read its files (a retry, a resume re-reads them).
    users = [j["metadata"]["name"] for j in await service.client.list(path_for(API_VERSION, FTJ, namespace))
             if file_id in [(j["metadata"].get("annotations") or {}).get(a)
                            for a in (mapping.A_FILE, mapping.A_VALIDATION_FILE)]
             and mapping.job_status(j) not in ("succeeded", "failed", "cancelled")]
    if users:
        raise OpenAIError(409, f"file {file_id} is the training or validation file of unfinished job(s) "
                          f"{', '.join(users)}; delete it once they end", param="file_id", code="file_in_use")
    if not await asyncio.to_thread(service.files.delete, namespace, file_id):
        raise not_found("file", file_id, "file_id")
    return _json({"id": file_id, "object": "file", "deleted": True})


# ---- jobs --------------------------------------------------------------------------------------

async def _job(service: Service, namespace: str, job_id: str, param: str = "fine_tuning_job_id") -> dict:
    job = await service.client.get(path_for(API_VERSION, FTJ, namespace, job_id)) if _is_name(job_id) else None
    if job is None:
        raise not_found("fine-tuning job", job_id, param)
    return job


def _is_name(value: str) -> bool:
    return len(value) <= 253 and re.fullmatch(DNS1123_SUBDOMAIN, value) is not None


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from exc


async def _uploaded(service: Service, namespace: str, file_id: str, param: str) -> mapping.UploadedFile:
    """The stored upload a create request names in `param`; a 400 naming it when there is none."""
    kind = await asyncio.to_thread(service.files.kind, namespace, file_id)
    if kind is None:
        raise OpenAIError(400, f"invalid {param}: no file {file_id!r} in namespace {namespace}", param=param,
                          code=f"invalid_{param}")
    suffix, file_format = kind
    return mapping.UploadedFile(file_id, service.files.content_uri(namespace, file_id, suffix), file_format)


async def create_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "create")
    body = await _body(request)
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                          code="invalid_json")
    try:
        create = JobCreate.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc) from exc
    catalog_ns, catalog_name = service.catalog_ref
    catalog = parse_catalog(await service.client.get(path_for("v1", "configmaps", catalog_ns, catalog_name)),
                            f"{catalog_ns}/{catalog_name}")
    entry = lookup(catalog, create.model)
    training = await _uploaded(service, namespace, create.training_file, "training_file")
    validation = (await _uploaded(service, namespace, create.validation_file, "validation_file")
                  if create.validation_file is not None else None)
    job_id = "ftjob-" + secrets.token_hex(10)
    doc = mapping.build_job(create, entry, namespace, job_id, training, service.placement, validation)
    try:
        created = await service.client.create(path_for(API_VERSION, FTJ, namespace), doc)
    except ApiError as exc:
        message = exc.body.get("message") if isinstance(exc.body, dict) else str(exc.body)
        if exc.status in (400, 422):
            raise OpenAIError(400, f"the cluster refused the job: {message}", code="invalid_job") from exc
        log.error("creating FineTuneJob %s/%s failed: %s", namespace, job_id, exc)
        raise OpenAIError(503, f"the cluster could not create the job: {message}", code="cluster_error") from exc
    log.info("FineTuneJob %s/%s created for model %s", namespace, job_id, create.model)
    return _json(mapping.job_object(created).model_dump(mode="json"))


def _newest_first(jobs: list[dict]) -> list[dict]:
    return sorted(jobs, key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]),
                  reverse=True)


async def list_jobs(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "list")
    jobs = _newest_first(await service.client.list(path_for(API_VERSION, FTJ, namespace)))
    items, more = mapping.paginate(jobs, lambda j: j["metadata"]["name"], request.query.get("after"),
                                   _limit(request, 20, 100))
    return _json(page([mapping.job_object(j) for j in items], more))


def _trained_tokens(service: Service, job: dict) -> int | None:
    """Tokens the run trained on: the training split's tokens times the passes its steps made over
    the packed rows (the manifest records tokens per pass, rows, steps and the batch size)."""
    uri = ((job.get("status") or {}).get("adapterRef") or {}).get("uri")
    if not uri:
        return None
    try:
        meta = read_manifest(open_location(uri, storage=service.storage, volume_root=Path("/"))).metadata
    except (ObjectMissing, ValueError):
        return None
    train, data = (meta.get("metrics") or {}).get("train") or {}, meta.get("data") or {}
    batch = ((meta.get("spec") or {}).get("training") or {}).get("batchSize")
    if not (train.get("rows") and train.get("steps") and data.get("tokens") and batch):
        return None
    return round(data["tokens"] * train["steps"] * batch / train["rows"])


async def get_job(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "get")
    job = await _job(service, namespace, request.match_info["job_id"])
    tokens = await asyncio.to_thread(_trained_tokens, service, job) if mapping.job_status(job) == "succeeded" else None
    return _json(mapping.job_object(job, tokens).model_dump(mode="json"))


async def cancel_job(request: web.Request) -> web.Response:
    """Suspends the FineTuneJob (the operator stops its pods, the trainer checkpoints first) and marks
    it cancelled; its checkpoints stay where they are."""
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "update")
    job = await _job(service, namespace, request.match_info["job_id"])
    state = mapping.job_status(job)
    if state in ("succeeded", "failed", "cancelled"):
        raise OpenAIError(400, f"job {job['metadata']['name']} is already {state}; only running or queued jobs "
                          "can be cancelled", code="invalid_state")
    patched = await service.client.patch(path_for(API_VERSION, FTJ, namespace, job["metadata"]["name"]), {
        "metadata": {"annotations": {mapping.A_CANCELLED: now_rfc3339()}}, "spec": {"suspend": True}})
    log.info("FineTuneJob %s/%s cancelled", namespace, job["metadata"]["name"])
    return _json(mapping.job_object(patched).model_dump(mode="json"))


async def job_events(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "get")
    job = await _job(service, namespace, request.match_info["job_id"])
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={job['metadata']['name']}"
    kube_events = await service.client.list(f"{path_for('v1', 'events', namespace)}?fieldSelector={quote(selector)}")
    events = mapping.events_of(job, kube_events)
    items, more = mapping.paginate(events, lambda e: e.id, request.query.get("after"), _limit(request, 20, 1000))
    return _json(page(items, more))


def _checkpoints(service: Service, job: dict) -> list[tuple[int, str, str]]:
    """(step, createdAt, URI) of the run's complete checkpoints: those whose manifest was written."""
    uri = ((job.get("status") or {}).get("adapterRef") or {}).get("uri") or run_output_uri(FineTuneJob.model_validate(
        {k: v for k, v in job.items() if k != "status"}))
    location = open_location(uri, storage=service.storage, volume_root=Path("/")).child("checkpoints")
    found = []
    for obj in location.list():
        folder, _, name = obj.rel.partition("/")
        if name == "checkpoint.json" and folder.startswith("checkpoint-") and folder[11:].isdigit():
            try:
                manifest = read_manifest(location.child(folder), "checkpoint.json")
            except ObjectMissing:
                continue  # pruned while we listed
            found.append((int(folder[11:]), manifest.created_at, f"{location.uri}/{folder}"))
    return found


async def job_checkpoints(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    namespace = await _caller_namespace(request, "get")
    job = await _job(service, namespace, request.match_info["job_id"])
    found = mapping.checkpoints_of(job["metadata"]["name"], await asyncio.to_thread(_checkpoints, service, job))
    items, more = mapping.paginate(found, lambda c: c.id, request.query.get("after"), _limit(request, 10, 100))
    return _json(page(items, more))


ROUTES: tuple[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...] = (
    ("POST", "/files", create_file),
    ("GET", "/files", list_files),
    ("GET", "/files/{file_id}", get_file),
    ("GET", "/files/{file_id}/content", file_content),
    ("DELETE", "/files/{file_id}", delete_file),
    ("POST", "/fine_tuning/jobs", create_job),
    ("GET", "/fine_tuning/jobs", list_jobs),
    ("GET", "/fine_tuning/jobs/{job_id}", get_job),
    ("POST", "/fine_tuning/jobs/{job_id}/cancel", cancel_job),
    ("GET", "/fine_tuning/jobs/{job_id}/events", job_events),
    ("GET", "/fine_tuning/jobs/{job_id}/checkpoints", job_checkpoints),
)


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app(service: Service) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=JSON_BODY_LIMIT)
    app[SERVICE] = service
    for method, path, handler in ROUTES:
        app.router.add_route(method, "/v1" + path, handler)
        app.router.add_route(method, "/namespaces/{namespace}/v1" + path, handler)
    app.router.add_get("/healthz", healthz)
    return app
