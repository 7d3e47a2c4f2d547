"""``spnas objectstore ...`` and ``spnas data ...`` subcommands (wired in by :mod:`spnas.cli.main`).

``register(subparsers)`` adds:

* ``objectstore start|stop|status|env [--dir DIR] [--port P]``: the embedded S3 server of
  :mod:`spnas.devtools.objectstore`; ``env`` prints ``export VAR=...`` lines for a shell.
* ``data upload DIR URI`` and ``data fetch URI [--cache DIR]`` (:mod:`spnas.storage`).

Each subcommand's ``func(args) -> int``; library errors (``SpnasError``) are left to the
caller, which prints them as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path
from typing import Any

ENV_OBJECTSTORE_DIR = "SPNAS_OBJECTSTORE_DIR"


def default_objectstore_dir() -> str:
    """``$SPNAS_OBJECTSTORE_DIR`` or ``~/.local/share/spnas/objectstore``."""
    return os.environ.get(ENV_OBJECTSTORE_DIR) or str(Path.home() / ".local" / "share" / "spnas" / "objectstore")


def _print_status(info: dict[str, Any]) -> None:
    if info["running"]:
        ready = "ready" if info.get("ready") else "not answering yet"
        print(f"object store running ({ready}) at {info['endpoint']}  pid {info['pid']}  data {info['data_dir']}")
    else:
        where = f" (endpoint when running: {info['endpoint']})" if info.get("endpoint") else ""
        print(f"object store stopped{where}  data {info['data_dir']}")


def cmd_objectstore_start(args: argparse.Namespace) -> int:
    from ..devtools import objectstore
    buckets = args.bucket if args.bucket is not None else ["spnas"]
    info = objectstore.start(args.dir, port=args.port, buckets=buckets, ready_timeout=args.timeout)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    verb = "already running" if info["already_running"] else f"started in {info['seconds']:.1f} s"
    print(f"object store {verb} at {info['endpoint']}  pid {info['pid']}  data {info['data_dir']}")
    print(f"client variables: eval \"$(spnas objectstore env --dir {shlex.quote(info['data_dir'])})\"")
    return 0


def _check_port(args: argparse.Namespace) -> None:
    from ..devtools import objectstore
    from ..storage import StorageError
    if args.port is None:
        return
    port = objectstore.status(args.dir, probe=False)["port"]
    if port is not None and port != args.port:
        raise StorageError(f"the object store in {args.dir} uses port {port}, not {args.port}")


def cmd_objectstore_stop(args: argparse.Namespace) -> int:
    from ..devtools import objectstore
    _check_port(args)
    res = objectstore.stop(args.dir, grace=args.grace)
    if res["stopped"]:
        print(f"object store pid {res['pid']} stopped ({res['signal']}, {res['seconds']:.1f} s)")
    else:
        print(f"object store in {res['data_dir']} was not running")
    return 0


def cmd_objectstore_status(args: argparse.Namespace) -> int:
    from ..devtools import objectstore
    _check_port(args)
    info = objectstore.status(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_status(info)
    return 0


def cmd_objectstore_env(args: argparse.Namespace) -> int:
    from ..devtools import objectstore
    _check_port(args)
    for name, value in objectstore.env(args.dir).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_data_upload(args: argparse.Namespace) -> int:
    from ..storage import upload
    uris = upload(args.src, args.uri, create_bucket=args.create_bucket)
    print(f"uploaded {len(uris)} file(s) from {args.src} to {args.uri}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from ..storage import fetch
    path = fetch(args.uri, args.cache)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``objectstore`` and ``data`` commands to ``subparsers``."""
    p = subparsers.add_parser("objectstore", help="embedded S3 server for local runs (SeaweedFS weed mini)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", default=default_objectstore_dir(),
                       help=f"data folder (default ${ENV_OBJECTSTORE_DIR} or ~/.local/share/spnas/objectstore)")

    q = sub.add_parser("start", help="start the server (idempotent); ports and credentials are kept per folder")
    common(q)
    q.add_argument("--port", type=int, default=None,
                   help="S3 port P on 127.0.0.1, at most 55000 (uses P..P+4 and P+10000..P+10004; default 8333, "
                        "or the folder's port)")
    q.add_argument("--bucket", action="append", default=None, metavar="NAME",
                   help="bucket to create when missing (repeatable; default: spnas)")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for readiness (default 60)")
    q.add_argument("--json", action="store_true", help="print the status as JSON")
    q.set_defaults(func=cmd_objectstore_start)

    q = sub.add_parser("stop", help="stop the server by PID (SIGTERM, then SIGKILL after --grace s)")
    common(q)
    q.add_argument("--port", type=int, default=None, help="expected port (error when the folder's store uses another)")
    q.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    q.set_defaults(func=cmd_objectstore_stop)

    q = sub.add_parser("status", help="running or stopped, endpoint, pid")
    common(q)
    q.add_argument("--port", type=int, default=None, help="expected port (error when the folder's store uses another)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_objectstore_status)

    q = sub.add_parser("env", help="print 'export VAR=...' lines (endpoint and credentials) for a shell")
    common(q)
    q.add_argument("--port", type=int, default=None, help="expected port (error when the folder's store uses another)")
    q.set_defaults(func=cmd_objectstore_env)

    p = subparsers.add_parser("data", help="upload to / fetch from object storage (s3:// or minio:// URIs)")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    q = sub.add_parser("upload", help="upload a file or folder (recursive) to URI")
    q.add_argument("src", metavar="DIR", help="local file or folder")
    q.add_argument("uri", metavar="URI", help="s3://bucket/prefix")
    q.add_argument("--create-bucket", action="store_true", help="create the bucket when missing")
    q.set_defaults(func=cmd_data_upload)
    q = sub.add_parser("fetch", help="download (cached by ETag) and print the local path")
    q.add_argument("uri", metavar="URI", help="s3://bucket/key or s3://bucket/prefix/ (a local path is printed as is)")
    q.add_argument("--cache", default=None, metavar="DIR", help="cache folder (default $SPNAS_CACHE or ~/.cache/spnas)")
    q.set_defaults(func=cmd_data_fetch)
