"""``spnas serve ...`` and ``spnas manifest ...`` subcommands (wired in by :mod:`spnas.cli.main`).

``register(subparsers)`` adds:

* ``serve DIR [--port P] [--host H] [--name N] [--allow-unverified] [--max-image-bytes B]
  [--max-pixels P] [--workers W]``: the export folder's KServe model server
  (:func:`spnas.serve.server.serve`), until SIGINT/SIGTERM;
* ``manifest DIR --storage-uri URI --image IMAGE [--name N] [--namespace NS] [--gpus G]
  [--cpu C] [--memory M] [--service-account SA] [--allow-unverified]``: writes
  ``DIR/inferenceservice.yaml`` (:func:`spnas.serve.manifest.write_manifest`) and prints its path.

Each subcommand's ``func(args) -> int``; library errors (``SpnasError``, a missing ``serve``
extra included) are left to the caller, which prints them as one line with exit status 2.
"""
from __future__ import annotations

import argparse

from .bundle import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MODEL_NAME, load_export


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.allow_unverified:  # a refused folder fails at once, before kserve loads (serve() checks again)
        load_export(args.dir)
    from .server import serve
    serve(args.dir, port=args.port, host=args.host, name=args.name, allow_unverified=args.allow_unverified,
          max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, workers=args.workers)
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from .manifest import write_manifest
    resources = {"cpu": args.cpu, "memory": args.memory, "gpus": args.gpus}
    path = write_manifest(args.dir, args.storage_uri, args.image, name=args.name, namespace=args.namespace,
                          resources=resources, service_account=args.service_account,
                          allow_unverified=args.allow_unverified)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` and ``manifest`` commands to ``subparsers``."""
    p = subparsers.add_parser("serve", help="serve an export folder over HTTP (KServe model server on ONNX Runtime; "
                                            "Open Inference Protocol v2 and v1)")
    p.add_argument("dir", metavar="DIR", help="export folder (model.onnx, labels.json, export.json, parity.json)")
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--name", default=None,
                   help=f"model name in the URLs (default: export.json's name, else {DEFAULT_MODEL_NAME})")
    p.add_argument("--allow-unverified", action="store_true",
                   help="serve an export whose parity.json is missing or says passed: false")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help=f"largest encoded image accepted, in bytes (default {DEFAULT_MAX_IMAGE_BYTES})")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest decoded image accepted, width x height (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--workers", type=int, default=1,
                   help="detections run at once (threads sharing one ONNX Runtime session; default 1)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("manifest", help="write DIR/inferenceservice.yaml: a KServe InferenceService running "
                                               "`spnas serve` on the export at --storage-uri")
    p.add_argument("dir", metavar="DIR", help="export folder (checked as `spnas serve` checks it)")
    p.add_argument("--storage-uri", required=True, metavar="URI",
                   help="where the cluster reads the export folder: s3:// or minio:// (written as s3://), gs://, pvc://")
    p.add_argument("--image", required=True, help="the project image (with the serve extra installed)")
    p.add_argument("--name", default=None, help="InferenceService and model name (default: export.json's name)")
    p.add_argument("--namespace", default=None, help="namespace (default: none in the manifest: kubectl's)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs (nvidia.com/gpu) per replica (default 0)")
    p.add_argument("--cpu", default=None, help="CPU request and limit, e.g. 2 or 500m")
    p.add_argument("--memory", default=None, help="memory request and limit, e.g. 4Gi")
    p.add_argument("--service-account", default=None,
                   help="service account holding the S3 credentials of the storage initializer")
    p.add_argument("--allow-unverified", action="store_true",
                   help="write it for an export whose parity gate did not pass")
    p.set_defaults(func=cmd_manifest)
