"""The local cache of objects: :func:`fetch` mirrors an object or a prefix into a folder keyed by
bucket/key and ETag.

Contracts: :func:`fetch` returns a local path whose content matches the object store at the time
of the call; files appear in the cache only by an atomic rename, under a per-object file lock
(``filelock``), so concurrent readers (threads or processes) never see a partial file. A warm
fetch downloads 0 bytes (see :class:`FetchStats`). ``SPNAS_CACHE`` sets the cache folder
(default ``~/.cache/spnas``). ``SPNAS_FETCH_LOG`` names a file to which every fetch of every
process appends one JSON line (``pid``, ``uri``, ``objects``, ``downloaded``, ``bytes``): how a
test or an operator counts a whole run's downloads across pods sharing a folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..utils.errors import StorageError
from ..utils.fileio import atomic_write_bytes
from .client import ObjectInfo, Store, open_store, walk_files
from .uri import is_uri, make_uri, parse_uri, scheme_of

log = logging.getLogger(__name__)

ENV_CACHE = "SPNAS_CACHE"
ENV_FETCH_LOG = "SPNAS_FETCH_LOG"



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
    """Process-wide fetch counters since the process started."""
    return _TOTALS.as_dict()


def default_cache_dir() -> Path:
    """``$SPNAS_CACHE`` or ``~/.cache/spnas``."""
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spnas"


def _digest(bucket: str, key: str) -> str:
    return hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()


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

    def lock(self, bucket: str, key: str) -> FileLock:
        """An exclusive lock of one object's cache entry (threads and processes)."""
        return FileLock(self.root / ".locks" / f"{_digest(bucket, key)}.lock", thread_local=False, preserve_lock_file=True)

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
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def ensure(self, store: Store, scheme: str, obj: ObjectInfo, bucket: str, stats: FetchStats) -> Path:
        """The local copy of ``obj``: reused when its ETag matches, else downloaded to a temp
        file and renamed into place, all under the object's lock."""
        uri = make_uri(scheme, bucket, obj.key)
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
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            st = dest.stat()
            meta = self._meta(bucket, obj.key)
            meta.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(meta, json.dumps({"bucket": bucket, "key": obj.key, "etag": etag or obj.etag,
                                           "size": st.st_size, "ino": st.st_ino,
                                           "mtime_ns": st.st_mtime_ns}).encode("utf-8"), fsync=False)
            seconds = time.perf_counter() - t0
            stats.add(objects=1, downloaded=1, nbytes=size, seconds=seconds)
            log.debug("downloaded %s (%d bytes, %.3f s)", uri, size, seconds)
            return dest


def fetch(uri_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, *,
          store: Store | None = None, stats: FetchStats | None = None, workers: int = 4) -> Path:
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
    scheme = scheme_of(uri)
    cache = _Cache(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    local = FetchStats()
    st, owned = open_store(store)
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
        _log_fetch(uri, local)
        if owned:
            st.close()


def _log_fetch(uri: str, stats: FetchStats) -> None:
    """One JSON line for this fetch in ``$SPNAS_FETCH_LOG`` (when set): a single ``O_APPEND``
    write, so concurrent processes never interleave their lines."""
    target = os.environ.get(ENV_FETCH_LOG, "").strip()
    if not target:
        return
    line = json.dumps({"pid": os.getpid(), "uri": uri, "objects": stats.objects, "downloaded": stats.downloaded,
                       "bytes": stats.bytes_downloaded}) + "\n"
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:  # statistics must never fail a fetch
        log.warning("%s %s: %s", ENV_FETCH_LOG, target, exc)


def _prune(cache: _Cache, bucket: str, prefix: str, folder: Path, keys: set[str], started: float) -> None:
    """Remove mirrored files under ``folder`` that are no longer in the store (only files older
    than this fetch, so a concurrent fetch's fresh downloads are kept)."""
    for path in walk_files(folder):
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


def local_path(uri_or_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """:func:`fetch` for a URI, ``Path(x)`` for a local path."""
    return fetch(uri_or_path, cache_dir)
