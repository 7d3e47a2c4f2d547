"""Object storage for data sets, weights and results over the S3 API (MinIO, SeaweedFS, AWS S3).

Locations are plain local paths or URIs ``s3://bucket/key`` / ``minio://bucket/key``. Layers:
:mod:`.uri` (the URI grammar), :mod:`.client` (the S3 client with retries; upload, exists,
list) and :mod:`.cache` (fetch through an ETag-keyed local cache). No torch.
"""
from __future__ import annotations

from ..utils.errors import StorageError
from .cache import ENV_CACHE, ENV_FETCH_LOG, FetchStats, default_cache_dir, fetch, local_path, totals
from .client import (
                     ENV_ACCESS_KEY,
                     ENV_ENDPOINT,
                     ENV_REGION,
                     ENV_RETRIES,
                     ENV_RETRY_DELAY,
                     ENV_SECRET_KEY,
                     ENV_SESSION_TOKEN,
                     ObjectInfo,
                     RetryPolicy,
                     Store,
                     check_writable,
                     exists,
                     list_objects,
                     upload,
)
from .uri import SCHEMES, is_uri, make_uri, parse_uri

__all__ = ["StorageError", "FetchStats", "fetch", "local_path", "totals", "default_cache_dir", "Store",
           "RetryPolicy", "ObjectInfo", "upload", "check_writable", "exists", "list_objects", "is_uri", "parse_uri", "make_uri",
           "SCHEMES", "ENV_CACHE", "ENV_FETCH_LOG", "ENV_ENDPOINT", "ENV_ACCESS_KEY", "ENV_SECRET_KEY", "ENV_REGION",
           "ENV_SESSION_TOKEN", "ENV_RETRIES", "ENV_RETRY_DELAY"]
