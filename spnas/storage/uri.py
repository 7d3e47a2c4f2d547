"""Object URIs: ``s3://bucket/key`` and ``minio://bucket/key`` (the two schemes mean the same).

A URI names one object or, when no object has that key, every object under the prefix ``key/``
(a "folder"). Keys with empty, ``.`` or ``..`` segments are refused: they could not be mirrored to a
local folder safely.
"""
from __future__ import annotations

import re
from typing import Any

from ..utils.errors import StorageError

SCHEMES = ("s3", "minio")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


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


def make_uri(scheme: str, bucket: str, key: str) -> str:
    """``("s3", "bucket", "a/b")`` -> ``"s3://bucket/a/b"``."""
    return f"{scheme}://{bucket}/{key}"


def scheme_of(uri: str) -> str:
    """The URI's scheme, lower-cased (``s3`` or ``minio``)."""
    return uri.partition("://")[0].lower()
