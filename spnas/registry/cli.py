"""``spnas registry ...`` subcommands (wired in by :mod:`spnas.cli.main`).

``register(subparsers)`` adds ``registry [--registry-uri URI] [--timeout S] ACTION``:

* ``list [NAME]``: the registered models (aliases), or model NAME's versions with their
  aliases and key tags, as a table (``--json``: a JSON list);
* ``show NAME REF``: the JSON of one version (REF: a version number or an alias);
* ``promote NAME VERSION [--reason R]``: VERSION becomes the champion (:meth:`Registry.promote`);
  prints its JSON;
* ``register EXPORT_DIR --name NAME [--weights W] [--storage-uri U] [--candidate]``: a new version
  (with ``--candidate``: then champion when there is none, else challenger); prints its JSON.

``--registry-uri`` defaults to ``$MLFLOW_TRACKING_URI`` and may also follow the action. Each
subcommand's ``func(args) -> int``; library errors (``SpnasError``: an unreachable registry, a
missing model, version or alias, a refused export, a missing ``registry`` extra) are left to the
caller, which prints them as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
from collections.abc import Sequence
from typing import Any

#: the tags ``list NAME`` shows, as (column, tag)
TABLE_TAGS = (("mAP", "mAP"), ("Δcontrol", "control_delta"), ("serial", "serial_code"),
              ("parallel", "parallel_code"), ("data", "data_version"))


def _registry(args: argparse.Namespace) -> Any:
    from .client import Registry
    if not getattr(args, "verbose", False):  # urllib3's retry warnings: the one-line error says what failed
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    return Registry(args.registry_uri, timeout_s=args.timeout)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _when(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if ms else "-"


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.name is None:
        models = reg.models()
        if args.json:
            _print_json([m.to_dict() for m in models])
            return 0
        if not models:
            print(f"no registered model at {reg.shown_uri}")
            return 0
        rows = [[m.name, str(m.aliases.get("champion", "-")), str(m.aliases.get("challenger", "-")),
                 ", ".join(f"{a}={v}" for a, v in sorted(m.aliases.items()) if a not in ("champion", "challenger")),
                 _when(m.created_ms)] for m in models]
        print("\n".join(_table(["model", "champion", "challenger", "other aliases", "created (UTC)"], rows)))
        return 0
    versions = reg.versions(args.name)
    if args.json:
        _print_json([v.to_dict() for v in versions])
        return 0
    if not versions:
        print(f"model {args.name!r} has no version")
        return 0
    rows = [[str(v.version), ",".join(v.aliases) or "-", *(v.tags.get(tag, "-") for _, tag in TABLE_TAGS),
             _when(v.created_ms)] for v in versions]
    print("\n".join(_table(["version", "aliases", *(c for c, _ in TABLE_TAGS), "created (UTC)"], rows)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    _print_json(_registry(args).get(args.name, args.ref).to_dict())
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _print_json(_registry(args).promote(args.name, args.version, reason=args.reason).to_dict())
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    reg = _registry(args)
    kw = {"weights": args.weights, "storage_uri": args.storage_uri}
    if args.candidate:
        info, alias = reg.register_candidate(args.dir, args.name, **kw)
        _print_json({**info.to_dict(), "alias_set": alias})
    else:
        _print_json(reg.register(args.dir, args.name, **kw).to_dict())
    return 0


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    """``--registry-uri`` and ``--timeout`` before the action (defaults) and after it (no
    default, so that the value given before is kept)."""
    default: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("--registry-uri", metavar="URI", **({"default": None} if top else default),
                   help="the MLflow tracking server (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--timeout", type=_timeout, metavar="S", **({"default": 30.0} if top else default),
                   help="seconds a registry call may take before it fails (default 30)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``registry`` command to ``subparsers``."""
    p = subparsers.add_parser("registry", help="the model registry (MLflow): list, show, register and promote "
                                               "exported detectors")
    _common(p, top=True)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    q = sub.add_parser("list", help="the registered models, or one model's versions (aliases, mAP, codes)")
    q.add_argument("name", metavar="NAME", nargs="?", default=None, help="a model: list its versions")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(q, top=False)
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("show", help="one version as JSON (tags, aliases, source, run)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("ref", metavar="REF", help="a version number or an alias (champion, challenger)")
    _common(q, top=False)
    q.set_defaults(func=cmd_show)

    q = sub.add_parser("promote", help="make a version the champion (one alias move; the previous champion and the "
                                       "reason are tagged)")
    q.add_argument("name", metavar="NAME")
    q.add_argument("version", metavar="VERSION", help="a version number")
    q.add_argument("--reason", default="", help="why (tagged promotion_reason)")
    _common(q, top=False)
    q.set_defaults(func=cmd_promote)

    q = sub.add_parser("register", help="register an export folder (its parity gate must have passed) as a new "
                                        "version")
    q.add_argument("dir", metavar="EXPORT_DIR", help="a `spnas export` folder")
    q.add_argument("--name", required=True, help="the registered model")
    q.add_argument("--weights", default=None, metavar="W", help="the PyTorch weights the export came from "
                                                                "(stored as pytorch/model.pth, for retraining)")
    q.add_argument("--storage-uri", default=None, metavar="U",
                   help="where the cluster reads the export folder (tagged storage_uri, for KServe)")
    q.add_argument("--candidate", action="store_true",
                   help="then alias it champion when the model has none, else challenger")
    _common(q, top=False)
    q.set_defaults(func=cmd_register)

