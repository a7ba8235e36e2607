"""A `minio.Minio` client with timeouts, TLS (custom CA for on-prem MinIO) and a retry helper."""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from kubetune.storage.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes worth another try; everything else (NoSuchKey, AccessDenied, ...) is final.
_TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "OperationAborted"}


class StorageUnavailable(RuntimeError):
    """The object store did not answer within the retry budget."""


def make_client(config: StorageConfig, *, connect_timeout: float = 5, read_timeout: float = 60) -> Minio:
    context = ssl.create_default_context(cafile=certifi.where())
    if config.ca_bundle_pem:
        context.load_verify_locations(cadata=config.ca_bundle_pem)
    # urllib3 retries only the connection itself; whole operations are retried by `with_retries`.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), maxsize=16,
        retries=urllib3.Retry(total=2, connect=2, read=0, backoff_factor=0.2, status_forcelist=()),
        ssl_context=context if config.secure else None,
    )
    return Minio(config.endpoint, access_key=config.access_key, secret_key=config.secret_key,
                 region=config.region, secure=config.secure, http_client=http)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT_CODES
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def with_retries(what: str, op: Callable[[], T], *, budget_s: float = 120, base_delay: float = 0.5,
                 max_delay: float = 8) -> T:
    """Run `op`, retrying transient failures with jittered exponential backoff for up to `budget_s`."""
    deadline = time.monotonic() + budget_s
    delay = base_delay
    while True:
        try:
            return op()
        except Exception as exc:  # classified right below
            if not is_transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise StorageUnavailable(f"{what}: object store unavailable for {budget_s:.0f}s ({exc})") from exc
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, max_delay)
