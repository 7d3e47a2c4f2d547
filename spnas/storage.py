"""Object storage for data sets, weights and results (S3 API: MinIO, SeaweedFS, AWS S3).

Locations are either plain local paths or URIs ``s3://bucket/key`` / ``minio://bucket/key``
(the two schemes mean the same thing). A URI names one object or, when no object has that
key, every object under the prefix ``key/`` (a "folder").

The client is configured from the environment only, with the variables a Kubernetes secret
sets through kfp-kubernetes ``use_secret_as_env``:

``SPNAS_S3_ENDPOINT``      ``host:port`` (plain HTTP), ``http://host:port`` or ``https://host:port``
``AWS_ACCESS_KEY_ID``      access key (required)
``AWS_SECRET_ACCESS_KEY``  secret key (required)
``AWS_REGION``             optional region (saves a bucket-location request per bucket)
``AWS_SESSION_TOKEN``      optional session token
``SPNAS_S3_RETRIES``       optional number of tries on connection errors (default 4)
``SPNAS_S3_RETRY_DELAY``   optional first backoff delay in seconds (default 0.5, doubled each try)
``SPNAS_CACHE``            optional cache folder for :func:`fetch` (default ``~/.cache/spnas``)

Contracts:

* :func:`fetch` returns a local path whose content matches the object store at the time of the
  call; files appear in the cache only by an atomic rename, under a per-object ``fcntl`` lock,
  so concurrent readers (threads or processes) never see a partial file. The cache is keyed by
  bucket/key and ETag: a warm fetch downloads 0 bytes (see :class:`FetchStats`).
* Connection errors and 5xx answers are retried with exponential backoff, then reported as
  :class:`StorageError` naming the endpoint and the URI. Credentials never appear in messages,
  logs or files written here.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar
from urllib.parse import urlsplit

from .errors import SpnasError

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMES = ("s3", "minio")
ENV_ENDPOINT = "SPNAS_S3_ENDPOINT"
ENV_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_REGION = "AWS_REGION"
ENV_SESSION_TOKEN = "AWS_SESSION_TOKEN"
ENV_RETRIES = "SPNAS_S3_RETRIES"
ENV_RETRY_DELAY = "SPNAS_S3_RETRY_DELAY"
ENV_CACHE = "SPNAS_CACHE"

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
           "InvalidSecurity", "AuthorizationHeaderMalformed"}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}
_CHUNK = 1 << 20


class StorageError(SpnasError):
    """An object-store operation failed: bad URI, missing configuration, unreachable endpoint,
    denied access, or a missing bucket/object. The message names the endpoint and/or URI and
    never contains credentials."""


# --------------------------------------------------------------------------------------------
# URIs


def is_uri(x: Any) -> bool:
    """True for a string ``s3://...`` or ``minio://...`` (scheme case-insensitive)."""
    if not isinstance(x, str):
        return False
    scheme, sep, _ = x.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (whole
    bucket) or end with ``/`` (a prefix). Raises :class:`StorageError` for anything else: another
    scheme, a bad bucket name, or a key with ``.``/``..``/empty segments (those cannot be
    mirrored to a local folder safely)."""
    if not isinstance(uri, str):
        raise StorageError(f"object URI must be a string, got {type(uri).__name__}")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise StorageError(f"{uri!r} is not an object URI: expected s3://bucket/key or minio://bucket/key")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"object URI {uri!r} has no bucket name")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StorageError(f"object URI {uri!r}: {bucket!r} is not a valid bucket name "
                           "(3-63 characters: lower-case letters, digits, '.', '-')")
    if "\x00" in key or "\\" in key:
        raise StorageError(f"object URI {uri!r}: the key contains a NUL or backslash character")
    segments = key.split("/")
    if key.endswith("/"):
        segments = segments[:-1]
    if key and any(s in ("", ".", "..") for s in segments):
        raise StorageError(f"object URI {uri!r}: the key has an empty, '.' or '..' path segment")
    return bucket, key


def _uri(scheme: str, bucket: str, key: str) -> str:
    return f"{scheme}://{bucket}/{key}"


def _scheme(uri: str) -> str:
    return uri.partition("://")[0].lower()


# --------------------------------------------------------------------------------------------
# Client


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

    def __init__(self, endpoint: str, access_key: str, secret_key: str, *, region: Optional[str] = None,
                 session_token: Optional[str] = None, retry: RetryPolicy = RetryPolicy(),
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
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **kwargs: Any) -> "Store":
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

    def __enter__(self) -> "Store":
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
        from minio.error import S3Error
        attempt = 1
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                if isinstance(exc, S3Error) and not _is_transient(exc):
                    raise self._error(exc, what, uri) from None
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

    def stat(self, bucket: str, key: str, uri: str = "") -> Optional[ObjectInfo]:
        """The object's info, or None when the key does not exist (a missing bucket raises)."""
        from minio.error import S3Error
        uri = uri or _uri("s3", bucket, key)

        def run() -> Optional[ObjectInfo]:
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
        uri = uri or _uri("s3", bucket, prefix)

        def run() -> list[ObjectInfo]:
            out = []
            for o in self.client.list_objects(bucket, prefix=prefix or None, recursive=True):
                if o.is_dir or o.object_name.endswith("/"):
                    continue
                out.append(ObjectInfo(o.object_name, (o.etag or "").strip('"'), int(o.size or 0)))
            return sorted(out, key=lambda i: i.key)
        return self.call("list", uri, run)

    def bucket_exists(self, bucket: str, uri: str = "") -> bool:
        return self.call("check bucket", uri or _uri("s3", bucket, ""), lambda: self.client.bucket_exists(bucket))

    def make_bucket(self, bucket: str, uri: str = "") -> bool:
        """Create ``bucket`` unless it exists; True when it was created."""
        uri = uri or _uri("s3", bucket, "")
        if self.bucket_exists(bucket, uri):
            return False
        self.call("create bucket", uri, lambda: self.client.make_bucket(bucket))
        return True

    def download(self, bucket: str, key: str, dest: Path, uri: str = "") -> tuple[str, int]:
        """Write the object to ``dest`` (truncated on each try, fsync'ed); returns the ETag and
        size of what was written. A short read is retried like a connection error."""
        uri = uri or _uri("s3", bucket, key)

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
        uri = uri or _uri("s3", bucket, key)
        res = self.call("upload", uri, lambda: self.client.fput_object(bucket, key, str(path)))
        return (res.etag or "").strip('"')


def _store(store: Optional[Store]) -> tuple[Store, bool]:
    """(store, owned): a new store from the environment when none is given."""
    if store is not None:
        return store, False
    return Store.from_env(), True


# --------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class FetchStats:
    """What fetches did: objects looked at, objects and bytes actually downloaded, seconds.
    Pass one to :func:`fetch` (``stats=``) or read the process-wide :func:`totals`."""
    objects: int = 0
    downloaded: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, objects: int = 0, downloaded: int = 0, nbytes: int = 0, seconds: float = 0.0) -> None:
        with self._lock:
            self.objects += objects
            self.downloaded += downloaded
            self.bytes_downloaded += nbytes
            self.seconds += seconds

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"objects": self.objects, "downloaded": self.downloaded,
                    "bytes_downloaded": self.bytes_downloaded, "seconds": self.seconds}


_TOTALS = FetchStats()


def totals() -> dict[str, Any]:
    """Process-wide fetch counters since start (or :func:`reset_totals`)."""
    return _TOTALS.as_dict()


def reset_totals() -> None:
    """Zero the process-wide fetch counters."""
    global _TOTALS
    _TOTALS = FetchStats()


# --------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """``$SPNAS_CACHE`` or ``~/.cache/spnas``."""
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spnas"


def _digest(bucket: str, key: str) -> str:
    return hashlib.sha256(f"{bucket}/{key}".encode("utf-8")).hexdigest()


def _write_small(path: Path, data: bytes) -> None:
    """Atomic write of a small bookkeeping file (temp file + rename, no fsync)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _Cache:
    """Local mirror ``root/<bucket>/<key>``; bookkeeping in ``root/.meta`` (ETag, size, inode,
    mtime per object), ``root/.locks`` (one flock file per object) and ``root/.tmp`` (downloads
    in progress). Bucket names cannot start with '.', so these never clash with a bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in (".meta", ".locks", ".tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    def _meta(self, bucket: str, key: str) -> Path:
        d = _digest(bucket, key)
        return self.root / ".meta" / d[:2] / f"{d}.json"

    def lock(self, bucket: str, key: str) -> "_FileLock":
        return _FileLock(self.root / ".locks" / f"{_digest(bucket, key)}.lock")

    def fresh(self, bucket: str, key: str, etag: str) -> bool:
        """True when the local copy is the object with ``etag``, untouched since downloaded."""
        try:
            meta = json.loads(self._meta(bucket, key).read_text("utf-8"))
            st = self.path(bucket, key).stat()
        except (OSError, ValueError):
            return False
        return (meta.get("etag") == etag and meta.get("size") == st.st_size and meta.get("ino") == st.st_ino
                and meta.get("mtime_ns") == st.st_mtime_ns)

    def forget(self, bucket: str, key: str) -> None:
        for p in (self._meta(bucket, key), self.path(bucket, key)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def ensure(self, store: Store, scheme: str, obj: ObjectInfo, bucket: str, stats: FetchStats) -> Path:
        """The local copy of ``obj``: reused when its ETag matches, else downloaded to a temp
        file and renamed into place, all under the object's lock."""
        uri = _uri(scheme, bucket, obj.key)
        dest = self.path(bucket, obj.key)
        with self.lock(bucket, obj.key):
            if self.fresh(bucket, obj.key, obj.etag):
                stats.add(objects=1)
                return dest
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise StorageError(f"fetch {uri}: cannot mirror it locally, a parent folder of {dest} is a file "
                                   "(an object key is also used as a prefix)") from None
            tmp = self.root / ".tmp" / f"{_digest(bucket, obj.key)[:16]}.{secrets.token_hex(6)}.part"
            t0 = time.perf_counter()
            try:
                etag, size = store.download(bucket, obj.key, tmp, uri)
                try:
                    os.replace(tmp, dest)
                except IsADirectoryError:
                    raise StorageError(f"fetch {uri}: cannot mirror it locally, {dest} is a folder "
                                       "(an object key is also used as a prefix)") from None
                except OSError as exc:
                    if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise StorageError(f"fetch {uri}: cannot mirror it locally, {dest} is a folder") from None
            finally:
                try:
                    tmp.unlink()
                except FileNotFoundError:
                    pass
            st = dest.stat()
            meta = self._meta(bucket, obj.key)
            meta.parent.mkdir(parents=True, exist_ok=True)
            _write_small(meta, json.dumps({"bucket": bucket, "key": obj.key, "etag": etag or obj.etag,
                                           "size": st.st_size, "ino": st.st_ino,
                                           "mtime_ns": st.st_mtime_ns}).encode("utf-8"))
            seconds = time.perf_counter() - t0
            stats.add(objects=1, downloaded=1, nbytes=size, seconds=seconds)
            log.debug("downloaded %s (%d bytes, %.3f s)", uri, size, seconds)
            return dest


class _FileLock:
    """An exclusive ``fcntl.flock`` on a lock file (works across threads and processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def __enter__(self) -> "_FileLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# Public API


def fetch(uri_or_path: "str | os.PathLike[str]", cache_dir: "str | os.PathLike[str] | None" = None, *,
          store: Optional[Store] = None, stats: Optional[FetchStats] = None, workers: int = 4) -> Path:
    """A local path for ``uri_or_path``.

    A local path is returned as it is (not checked). An object URI becomes a cached local file;
    a prefix URI (ending in ``/``, or a key that is no object but has objects under ``key/``)
    becomes a cached local folder mirroring every object under it (local files no longer in
    the store are removed). Unchanged objects (same ETag) are not downloaded again. Missing
    buckets, keys and prefixes raise :class:`StorageError` naming the URI."""
    if not is_uri(uri_or_path):
        return Path(uri_or_path)
    uri = str(uri_or_path)
    bucket, key = parse_uri(uri)
    scheme = _scheme(uri)
    cache = _Cache(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    local = FetchStats()
    st, owned = _store(store)
    t0 = time.perf_counter()
    try:
        if key and not key.endswith("/"):
            info = st.stat(bucket, key, uri)
            if info is not None:
                path = cache.ensure(st, scheme, info, bucket, local)
                return path
            prefix = key + "/"
        else:
            prefix = key
        objects = st.list(bucket, prefix, uri)
        if not objects:
            if not st.bucket_exists(bucket, uri):
                raise StorageError(f"fetch {uri}: bucket {bucket!r} does not exist at {st.endpoint}")
            raise StorageError(f"fetch {uri}: no object or folder with that name at {st.endpoint}")
        started = time.time()
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(lambda o: cache.ensure(st, scheme, o, bucket, local), objects))
        folder = cache.path(bucket, prefix) if prefix else cache.root / bucket
        _prune(cache, bucket, prefix, folder, {o.key for o in objects}, started)
        return folder
    finally:
        local.seconds = time.perf_counter() - t0
        _TOTALS.add(local.objects, local.downloaded, local.bytes_downloaded, local.seconds)
        if stats is not None:
            stats.add(local.objects, local.downloaded, local.bytes_downloaded, local.seconds)
        if owned:
            st.close()


def _prune(cache: _Cache, bucket: str, prefix: str, folder: Path, keys: set[str], started: float) -> None:
    """Remove mirrored files under ``folder`` that are no longer in the store (only files older
    than this fetch, so a concurrent fetch's fresh downloads are kept)."""
    for path in _walk_files(folder):
        key = prefix + path.relative_to(folder).as_posix()
        if key in keys:
            continue
        with cache.lock(bucket, key):
            try:
                if path.stat().st_mtime >= started:
                    continue
            except FileNotFoundError:
                continue
            log.debug("removing %s from the cache: no longer in the store", path)
            cache.forget(bucket, key)


def _walk_files(folder: Path) -> Iterator[Path]:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            yield Path(dirpath) / name


def local_path(uri_or_path: "str | os.PathLike[str]", cache_dir: "str | os.PathLike[str] | None" = None) -> Path:
    """:func:`fetch` for a URI, ``Path(x)`` for a local path."""
    return fetch(uri_or_path, cache_dir)


def upload(local_path: "str | os.PathLike[str]", uri: str, *, store: Optional[Store] = None,
           create_bucket: bool = False) -> list[str]:
    """Upload a file or a whole folder; returns the URIs written, sorted.

    A file goes to the URI's key (or to ``key/<file name>`` when the URI ends with ``/`` or
    names a bucket only); a folder's files go under ``key/`` with their relative paths kept.
    The bucket must exist (else :class:`StorageError` naming the URI) unless
    ``create_bucket``."""
    src = Path(local_path)
    bucket, key = parse_uri(uri)
    scheme = _scheme(uri)
    if src.is_file():
        pairs = [(src, key + src.name if (not key or key.endswith("/")) else key)]
    elif src.is_dir():
        base = key.rstrip("/") + "/" if key else ""
        pairs = [(p, base + p.relative_to(src).as_posix()) for p in sorted(_walk_files(src)) if p.is_file()]
    else:
        raise StorageError(f"upload to {uri}: local path {str(src)!r} does not exist")
    st, owned = _store(store)
    try:
        if create_bucket:
            if st.make_bucket(bucket, uri):
                log.info("created bucket %s at %s", bucket, st.endpoint)
        elif not st.bucket_exists(bucket, uri):
            raise StorageError(f"upload to {uri}: bucket {bucket!r} does not exist at {st.endpoint}")
        out = []
        for path, k in pairs:
            target = _uri(scheme, bucket, k)
            parse_uri(target)  # refuse keys that could not be fetched back
            st.put_file(bucket, k, path, target)
            out.append(target)
        log.info("uploaded %d file(s) from %s to %s", len(out), src, uri)
        return sorted(out)
    finally:
        if owned:
            st.close()


def exists(uri: str, *, store: Optional[Store] = None) -> bool:
    """True when ``uri`` is an object, a non-empty prefix, or (key empty) an existing bucket.
    A missing bucket gives False."""
    bucket, key = parse_uri(uri)
    st, owned = _store(store)
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


def list_objects(uri: str, *, store: Optional[Store] = None) -> list[str]:
    """URIs (same scheme) of the objects at ``uri``, sorted: the object itself and everything
    under ``key/`` (for a key ending in ``/`` or a bucket: everything under it); ``[]`` when
    there are none. A missing bucket raises :class:`StorageError` naming the URI."""
    bucket, key = parse_uri(uri)
    scheme = _scheme(uri)
    st, owned = _store(store)
    try:
        found = st.list(bucket, key, uri)
        if key and not key.endswith("/"):
            found = [o for o in found if o.key == key or o.key.startswith(key + "/")]
        return [_uri(scheme, bucket, o.key) for o in found]
    finally:
        if owned:
            st.close()


def make_bucket(uri: str, *, store: Optional[Store] = None) -> bool:
    """Create the URI's bucket unless it exists; True when created."""
    bucket, _ = parse_uri(uri)
    st, owned = _store(store)
    try:
        return st.make_bucket(bucket, uri)
    finally:
        if owned:
            st.close()
