"""The S3 client (MinIO, SeaweedFS, AWS S3) with bounded retries, and the transfer functions
that need no cache: :func:`upload`, :func:`exists`, :func:`list_objects`.

The client is configured from the environment only, with the variables a Kubernetes secret
sets through kfp-kubernetes ``use_secret_as_env``:

``SPNAS_S3_ENDPOINT``      ``host:port`` (plain HTTP), ``http://host:port`` or ``https://host:port``
``AWS_ACCESS_KEY_ID``      access key (required)
``AWS_SECRET_ACCESS_KEY``  secret key (required)
``AWS_REGION``             optional region (saves a bucket-location request per bucket)
``AWS_SESSION_TOKEN``      optional session token
``SPNAS_S3_RETRIES``       optional number of tries on connection errors (default 4)
``SPNAS_S3_RETRY_DELAY``   optional first backoff delay in seconds (default 0.5, doubled each try)

Connection errors and 5xx answers are retried with exponential backoff, then reported as
:class:`~spnas.utils.errors.StorageError` naming the endpoint and the URI. Credentials never
appear in messages, logs or files written here.
"""
from __future__ import annotations

import dataclasses
import http.client
import io
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..utils.errors import StorageError
from .uri import is_uri, make_uri, parse_uri, scheme_of

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_ENDPOINT = "SPNAS_S3_ENDPOINT"
ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_REGION = "AWS_REGION"
ENV_SESSION_TOKEN = "AWS_SESSION_TOKEN"
ENV_RETRIES = "SPNAS_S3_RETRIES"
ENV_RETRY_DELAY = "SPNAS_S3_RETRY_DELAY"

_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
           "InvalidSecurity", "AuthorizationHeaderMalformed"}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}
_CHUNK = 1 << 20



@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``tries`` attempts in all; the wait before attempt n+1 is ``delay * 2**(n-1)`` capped
    at ``max_delay`` seconds."""
    tries: int = 4
    delay: float = 0.5
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.tries < 1 or self.delay < 0 or self.max_delay < 0:
            raise StorageError(f"invalid retry policy {self}")

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        return min(self.max_delay, self.delay * (2 ** (attempt - 1)))


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One object: its key, ETag (without quotes) and size in bytes."""
    key: str
    etag: str
    size: int


def _parse_endpoint(value: str) -> tuple[str, bool, str]:
    """``SPNAS_S3_ENDPOINT`` -> (``host:port``, secure, display URL). No scheme means HTTP."""
    raw = value.strip()
    if "@" in raw:  # user:password@host: refused before any message could echo the value
        raise StorageError(f"{ENV_ENDPOINT} must not contain credentials (user:password@); "
                           f"use {ENV_ACCESS_KEY}/{ENV_SECRET_KEY}")
    if "://" in raw:
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https"):
            raise StorageError(f"{ENV_ENDPOINT}={raw!r}: the scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise StorageError(f"{ENV_ENDPOINT}={raw!r} must be host[:port] without a path")
        netloc, secure = parts.netloc, parts.scheme == "https"
    else:
        if "/" in raw:
            raise StorageError(f"{ENV_ENDPOINT}={raw!r} must be host[:port] or http(s)://host[:port]")
        netloc, secure = raw, False
    if not netloc:
        raise StorageError(f"{ENV_ENDPOINT} is empty")
    host, _, port = netloc.rpartition(":") if netloc.count(":") == 1 else (netloc, "", "")
    if port and not port.isdigit():
        raise StorageError(f"{ENV_ENDPOINT}={raw!r}: port {port!r} is not a number")
    return netloc, secure, f"{'https' if secure else 'http'}://{netloc}"


def _is_transient(exc: BaseException) -> bool:
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return exc.code in _TRANSIENT_CODES or status >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):
        return True
    return isinstance(exc, (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError,
                            TimeoutError))


def _reason(exc: BaseException) -> str:
    """A one-line description of an error (no headers, no credentials)."""
    from minio.error import S3Error
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    inner = getattr(exc, "reason", None)
    if inner is not None and str(inner):
        text = str(inner).splitlines()[0]
    return f"{type(exc).__name__}: {text}"[:300]


class Store:
    """An S3 client bound to one endpoint, with bounded retries. Use as a context manager (or
    call :meth:`close`) so keep-alive connections do not outlive the work."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, *, region: str | None = None,
                 session_token: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 connect_timeout: float = 5.0, read_timeout: float = 60.0, max_connections: int = 8) -> None:
        import certifi
        import urllib3
        from minio import Minio
        self.netloc, self.secure, self.endpoint = _parse_endpoint(endpoint)
        self.retry = retry
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), maxsize=max_connections,
            retries=False, cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where())
        self.client = Minio(self.netloc, access_key=access_key, secret_key=secret_key, session_token=session_token,
                            secure=self.secure, region=region or None, http_client=self._http)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Store:
        """A store configured from ``environ`` (default ``os.environ``); a missing variable raises
        :class:`StorageError` naming it. ``kwargs`` override the constructor's options."""
        env = os.environ if environ is None else environ
        values = {}
        for name in (ENV_ENDPOINT, ENV_ACCESS_KEY, ENV_SECRET_KEY):
            val = env.get(name, "").strip()
            if not val:
                raise StorageError(f"object storage is not configured: environment variable {name} is not set "
                                   f"(need {ENV_ENDPOINT}, {ENV_ACCESS_KEY}, {ENV_SECRET_KEY})")
            values[name] = val
        if "retry" not in kwargs:
            try:
                tries = int(env.get(ENV_RETRIES, "") or RetryPolicy.tries)
                delay = float(env.get(ENV_RETRY_DELAY, "") or RetryPolicy.delay)
            except ValueError:
                raise StorageError(f"{ENV_RETRIES} must be an integer and {ENV_RETRY_DELAY} a number of seconds") from None
            kwargs["retry"] = RetryPolicy(tries=tries, delay=delay)
        kwargs.setdefault("region", env.get(ENV_REGION) or None)
        kwargs.setdefault("session_token", env.get(ENV_SESSION_TOKEN) or None)
        return cls(values[ENV_ENDPOINT], values[ENV_ACCESS_KEY], values[ENV_SECRET_KEY], **kwargs)

    def __repr__(self) -> str:  # never show credentials
        return f"Store({self.endpoint!r})"

    def close(self) -> None:
        """Close the pooled keep-alive connections."""
        self._http.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- error handling ------------------------------------------------------------------------

    def _error(self, exc: BaseException, what: str, uri: str) -> StorageError:
        from minio.error import S3Error
        if isinstance(exc, S3Error):
            if exc.code in _DENIED:
                return StorageError(f"access denied at {self.endpoint}: check {ENV_ACCESS_KEY}/{ENV_SECRET_KEY} "
                                    f"(and the bucket's permissions) [{exc.code} on {what} {uri}]")
            if exc.code == "NoSuchBucket":
                return StorageError(f"{what} {uri}: bucket {exc.bucket_name or parse_uri(uri)[0]!r} "
                                    f"does not exist at {self.endpoint}")
            if exc.code == "NoSuchKey":
                return StorageError(f"{what} {uri}: no such object at {self.endpoint}")
        return StorageError(f"{what} {uri} failed at {self.endpoint}: {_reason(exc)}")

    def call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on connection errors and 5xx answers; any failure becomes a
        :class:`StorageError` naming ``what``, ``uri`` and the endpoint."""
        attempt = 1
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                if not _is_transient(exc):
                    raise self._error(exc, what, uri) from None
                if attempt >= self.retry.tries:
                    raise StorageError(
                        f"{what} {uri}: object store at {self.endpoint} unreachable or failing after "
                        f"{attempt} attempt(s): {_reason(exc)}") from None
                wait = self.retry.wait(attempt)
                log.warning("%s %s: attempt %d/%d at %s failed (%s); retrying in %.2f s", what, uri, attempt,
                            self.retry.tries, self.endpoint, _reason(exc), wait)
                time.sleep(wait)
                attempt += 1

    # -- operations ----------------------------------------------------------------------------

    def stat(self, bucket: str, key: str, uri: str = "") -> ObjectInfo | None:
        """The object's info, or None when the key does not exist (a missing bucket raises)."""
        from minio.error import S3Error
        uri = uri or make_uri("s3", bucket, key)

        def run() -> ObjectInfo | None:
            try:
                st = self.client.stat_object(bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return None
                raise
            if st.is_dir:
                return None
            return ObjectInfo(key, (st.etag or "").strip('"'), int(st.size or 0))
        return self.call("stat", uri, run)

    def list(self, bucket: str, prefix: str, uri: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursive, sorted by key; folder markers skipped)."""
        uri = uri or make_uri("s3", bucket, prefix)

        def run() -> list[ObjectInfo]:
            out = []
            for o in self.client.list_objects(bucket, prefix=prefix or None, recursive=True):
                if o.is_dir or o.object_name.endswith("/"):
                    continue
                out.append(ObjectInfo(o.object_name, (o.etag or "").strip('"'), int(o.size or 0)))
            return sorted(out, key=lambda i: i.key)
        return self.call("list", uri, run)

    def bucket_exists(self, bucket: str, uri: str = "") -> bool:
        return self.call("check bucket", uri or make_uri("s3", bucket, ""), lambda: self.client.bucket_exists(bucket))

    def make_bucket(self, bucket: str, uri: str = "") -> bool:
        """Create ``bucket`` unless it exists; True when it was created."""
        uri = uri or make_uri("s3", bucket, "")
        if self.bucket_exists(bucket, uri):
            return False
        self.call("create bucket", uri, lambda: self.client.make_bucket(bucket))
        return True

    def download(self, bucket: str, key: str, dest: Path, uri: str = "") -> tuple[str, int]:
        """Write the object to ``dest`` (truncated on each try, fsync'ed); returns the ETag and
        size of what was written. A short read is retried like a connection error."""
        uri = uri or make_uri("s3", bucket, key)

        def run() -> tuple[str, int]:
            resp = self.client.get_object(bucket, key)
            try:
                etag = (resp.headers.get("ETag") or "").strip('"')
                expected = resp.headers.get("Content-Length")
                n = 0
                with open(dest, "wb") as fh:
                    for chunk in resp.stream(_CHUNK):
                        fh.write(chunk)
                        n += len(chunk)
                    fh.flush()
                    os.fsync(fh.fileno())
                if expected is not None and int(expected) != n:
                    raise http.client.IncompleteRead(b"", int(expected) - n)
                return etag, n
            finally:
                resp.close()
                resp.release_conn()
        return self.call("download", uri, run)

    def put_file(self, bucket: str, key: str, path: Path, uri: str = "") -> str:
        """Upload one local file (multipart when large); returns the new ETag."""
        uri = uri or make_uri("s3", bucket, key)
        res = self.call("upload", uri, lambda: self.client.fput_object(bucket, key, str(path)))
        return (res.etag or "").strip('"')

    def put_bytes(self, bucket: str, key: str, data: bytes, uri: str = "") -> str:
        """Upload ``data`` as one object; returns the new ETag."""
        uri = uri or make_uri("s3", bucket, key)
        res = self.call("upload", uri, lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data)))
        return (res.etag or "").strip('"')

    def remove(self, bucket: str, key: str, uri: str = "") -> None:
        """Delete one object (a missing one is no error, as in S3)."""
        uri = uri or make_uri("s3", bucket, key)
        self.call("delete", uri, lambda: self.client.remove_object(bucket, key))


def open_store(store: Store | None) -> tuple[Store, bool]:
    """(store, owned): a new store from the environment when none is given."""
    if store is not None:
        return store, False
    return Store.from_env(), True


def walk_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` (recursive, unsorted)."""
    for dirpath, _, files in os.walk(folder):
        for name in files:
            yield Path(dirpath) / name


def upload(local_path: str | os.PathLike[str], uri: str, *, store: Store | None = None,
           create_bucket: bool = False) -> list[str]:
    """Upload a file or a whole folder; returns the URIs written, sorted.

    A file goes to the URI's key (or to ``key/<file name>`` when the URI ends with ``/`` or
    names a bucket only); a folder's files go under ``key/`` with their relative paths kept.
    The bucket must exist (else :class:`StorageError` naming the URI) unless
    ``create_bucket``."""
    src = Path(local_path)
    bucket, key = parse_uri(uri)
    scheme = scheme_of(uri)
    if src.is_file():
        pairs = [(src, key + src.name if (not key or key.endswith("/")) else key)]
    elif src.is_dir():
        base = key.rstrip("/") + "/" if key else ""
        pairs = [(p, base + p.relative_to(src).as_posix()) for p in sorted(walk_files(src)) if p.is_file()]
    else:
        raise StorageError(f"upload to {uri}: local path {str(src)!r} does not exist")
    st, owned = open_store(store)
    try:
        if create_bucket:
            if st.make_bucket(bucket, uri):
                log.info("created bucket %s at %s", bucket, st.endpoint)
        elif not st.bucket_exists(bucket, uri):
            raise StorageError(f"upload to {uri}: bucket {bucket!r} does not exist at {st.endpoint}")
        out = []
        for path, k in pairs:
            target = make_uri(scheme, bucket, k)
            parse_uri(target)  # refuse keys that could not be fetched back
            st.put_file(bucket, k, path, target)
            out.append(target)
        log.info("uploaded %d file(s) from %s to %s", len(out), src, uri)
        return sorted(out)
    finally:
        if owned:
            st.close()


def exists(uri: str, *, store: Store | None = None) -> bool:
    """True when ``uri`` is an object, a non-empty prefix, or (key empty) an existing bucket.
    A missing bucket gives False."""
    bucket, key = parse_uri(uri)
    st, owned = open_store(store)
    try:
        if not st.bucket_exists(bucket, uri):
            return False
        if not key:
            return True
        if not key.endswith("/") and st.stat(bucket, key, uri) is not None:
            return True
        prefix = key if key.endswith("/") else key + "/"
        return bool(st.call("list", uri, lambda: next(iter(
            st.client.list_objects(bucket, prefix=prefix, recursive=True)), None) is not None))
    finally:
        if owned:
            st.close()


def list_objects(uri: str, *, store: Store | None = None) -> list[str]:
    """URIs (same scheme) of the objects at ``uri``, sorted: the object itself and everything
    under ``key/`` (for a key ending in ``/`` or a bucket: everything under it); ``[]`` when
    there are none. A missing bucket raises :class:`StorageError` naming the URI."""
    bucket, key = parse_uri(uri)
    scheme = scheme_of(uri)
    st, owned = open_store(store)
    try:
        found = st.list(bucket, key, uri)
        if key and not key.endswith("/"):
            found = [o for o in found if o.key == key or o.key.startswith(key + "/")]
        return [make_uri(scheme, bucket, o.key) for o in found]
    finally:
        if owned:
            st.close()


def check_writable(location: str, *, store: Store | None = None) -> str:
    """Prove that ``location`` (a URI prefix or a local folder) takes new files: write a small
    marker object under it and delete it again. Returns the marker's URI or path. Raises
    :class:`StorageError` naming the location (a missing bucket, access denied, a path that is
    not a folder)."""
    name = f".spnas-write-check-{secrets.token_hex(6)}"
    if not is_uri(location):
        folder = Path(location)
        marker = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_bytes(b"spnas")
            marker.unlink()
        except OSError as exc:
            raise StorageError(f"results location {location!r} is not writable: {exc.strerror or exc}") from None
        return str(marker)
    bucket, key = parse_uri(location)
    target = make_uri(scheme_of(location), bucket, (key.rstrip("/") + "/" if key else "") + name)
    st, owned = open_store(store)
    try:
        if not st.bucket_exists(bucket, location):
            raise StorageError(f"results location {location}: bucket {bucket!r} does not exist at {st.endpoint}")
        _, marker_key = parse_uri(target)
        st.put_bytes(bucket, marker_key, b"spnas", target)
        st.remove(bucket, marker_key, target)
        return target
    finally:
        if owned:
            st.close()
