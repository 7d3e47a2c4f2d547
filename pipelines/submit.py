"""Submit, schedule and upload the compiled SP-NAS pipeline through the kfp Client.

    python -m pipelines.submit run      [--namespace NS] [--param data_uri=s3://datasets/coco ...]
    python -m pipelines.submit run      --package pipelines/retrain_pipeline.yaml --param data_uri=...  # retrain once
    python -m pipelines.submit schedule --cron "0 0 2 * * *" [--catchup] [--param ...]   # 6 fields, seconds first
    python -m pipelines.submit upload   [--version v2]

``schedule`` schedules the retraining pipeline (the champion retrained on the latest data and
promoted only when better; no catch-up, one run at a time); the NAS pipeline runs on demand and
is refused there unless ``--allow-search``.

The endpoint comes from ``KFP_ENDPOINT`` (e.g. http://localhost:8080 after a port-forward of
ml-pipeline-ui). Multi-user Kubeflow: ``--namespace`` (or ``KFP_NAMESPACE``) is the profile
namespace, and the bearer token comes from ``KFP_TOKEN`` (or ``--token``, which other users of the
machine can read in the process list); without one, inside a pod, the projected service-account
token at ``$KF_PIPELINES_SA_TOKEN_PATH`` or /var/run/secrets/kubeflow/pipelines/token is used.
Before anything is created the backend must be KFP >= 2.14.0 (the pipeline fans in with
``dsl.Collected``); ``--skip-version-check`` skips that. Parameters keep their types
(``Client.create_recurring_run`` does; ``kfp recurring-run create`` would send strings).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).parent / "spnas_pipeline.yaml"
#: The retraining pipeline (pipelines/retrain_pipeline.py): what ``schedule`` schedules by default.
RETRAIN_PACKAGE = Path(__file__).parent / "retrain_pipeline.yaml"
#: The compiled name of the NAS pipeline, which runs on demand only (days of search per run).
SEARCH_PIPELINE = "spnas"

# The backend floor: KFP resolves a dsl.Collected fan-in (candidates -> update, the Pareto front's
# top-k -> the next phase) only from backend 2.14.0 on (Kubeflow Platform 1.10 ships 2.5.0).
MIN_BACKEND = (2, 14, 0)
MIN_BACKEND_WHY = "the pipeline fans in with dsl.Collected, which the KFP backend runs from 2.14.0 on"
HEALTHZ_TIMEOUT_S = 10

# Where kfp.client.ServiceAccountTokenVolumeCredentials looks for the pod's projected token
# (kfp.client.KF_PIPELINES_SA_TOKEN_ENV / KF_PIPELINES_SA_TOKEN_PATH; a test pins them to kfp's).
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = Path("/var/run/secrets/kubeflow/pipelines/token")


def pipeline_parameters(package: Path = PACKAGE) -> dict[str, str]:
    """Name -> KFP parameter type of the compiled pipeline's inputs."""
    spec = next(yaml.safe_load_all(package.read_text()))
    return {k: v["parameterType"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}


def required_parameters(package: Path = PACKAGE) -> list[str]:
    """The compiled pipeline's inputs without a default (the API server refuses a run without
    them, after the fact): for the SP-NAS pipeline, ``data_uri``."""
    spec = next(yaml.safe_load_all(package.read_text()))
    return sorted(k for k, v in spec["root"]["inputDefinitions"]["parameters"].items()
                  if "defaultValue" not in v and not v.get("isOptional"))


def pipeline_name(package: Path) -> str:
    """The compiled pipeline's name (``pipelineInfo.name``)."""
    spec = next(yaml.safe_load_all(package.read_text()))
    return str(spec.get("pipelineInfo", {}).get("name", ""))


def check_schedulable(package: Path, allow_search: bool) -> None:
    """Refuse to schedule the NAS pipeline: a recurring search (days per run) is not retraining;
    the retraining pipeline is what runs on a schedule."""
    if pipeline_name(package) == SEARCH_PIPELINE and not allow_search:
        raise SystemExit(f"--package {package}: the SP-NAS search pipeline runs on demand (make run); schedule the "
                         f"retraining pipeline ({RETRAIN_PACKAGE.name}, the default), or pass --allow-search")


def check_full_train_shape(params: dict[str, Any], package: Path = PACKAGE) -> None:
    """Refuse, before any request, a run whose full train cannot start: several nodes without
    GPUs (:func:`spnas.orchestration.trainjob.check_shape`, on ``params`` over the compiled
    defaults; the compiled data volume is checked at compile time and again by the run's first
    task)."""
    from spnas.orchestration.trainjob import check_shape
    from spnas.utils.errors import ConfigError
    spec = next(yaml.safe_load_all(package.read_text()))
    defined = spec["root"]["inputDefinitions"]["parameters"]
    if "full_train_nodes" not in defined:
        return
    value = {k: params.get(k, defined.get(k, {}).get("defaultValue")) for k in ("full_train_nodes",
                                                                               "full_train_gpus_per_node")}
    try:
        check_shape(value["full_train_nodes"], value["full_train_gpus_per_node"] or 0)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def _typed(kind: str, value: str) -> Any:
    """``value`` as the Python type the API server expects for a parameter of KFP type ``kind``;
    ValueError when it is not one."""
    if kind == "NUMBER_INTEGER":
        return int(value)
    if kind == "NUMBER_DOUBLE":
        return float(value)
    if kind == "BOOLEAN":
        if value.lower() not in ("true", "false"):
            raise ValueError(value)
        return value.lower() == "true"
    if kind in ("LIST", "STRUCT"):
        parsed = json.loads(value)
        if not isinstance(parsed, list if kind == "LIST" else dict):
            raise ValueError(value)
        return parsed
    return value


def parse_params(items: list[str], package: Path = PACKAGE) -> dict[str, Any]:
    """``name=value`` pairs typed by the pipeline's own parameter types (a STRING stays a string,
    even ``8``); unknown names are errors."""
    types = pipeline_parameters(package)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--param {item!r} must look like name=value")
        name, value = item.split("=", 1)
        if name not in types:
            raise SystemExit(f"--param {name!r} is not a pipeline parameter; known: {sorted(types)}")
        kind = types[name]
        try:
            out[name] = _typed(kind, value)
        except ValueError:
            raise SystemExit(f"--param {name}={value!r} is not a {kind.lower()}") from None
    return out


def check_cron(cron: str) -> str:
    """KFP cron expressions have 6 fields, seconds first."""
    if len(cron.split()) != 6:
        raise SystemExit(f"--cron {cron!r} must have 6 fields (seconds first), e.g. '0 0 2 * * *' for 02:00 daily")
    return cron


@dataclass(frozen=True)
class Auth:
    """How requests authenticate: a bearer ``token`` (from ``source``: --token or KFP_TOKEN), the
    service-account token file ``token_path``, or nothing. The token never appears in repr/str."""
    source: str
    token: str | None = field(default=None, repr=False)
    token_path: Path | None = None

    def describe(self) -> str:
        """What a log line may say about the credentials (never the token)."""
        if self.token:
            return f"bearer token from {self.source}"
        if self.token_path:
            return f"service-account token file {self.token_path}"
        return "no credentials"


def sa_token_path() -> Path:
    """The projected service-account token file kfp's credentials would read."""
    return Path(os.environ.get(SA_TOKEN_ENV) or SA_TOKEN_PATH)


def resolve_auth(token: str | None = None) -> Auth:
    """``--token`` first, then ``KFP_TOKEN``, then the pod's service-account token file when it
    exists (inside a cluster), else no credentials (single-user KFP, a port-forward)."""
    if token:
        return Auth("--token", token=token)
    if os.environ.get("KFP_TOKEN"):
        return Auth("KFP_TOKEN", token=os.environ["KFP_TOKEN"])
    path = sa_token_path()
    if path.is_file():
        return Auth("service account", token_path=path)
    return Auth("none")


def client(namespace: str | None = None, auth: Auth | None = None):
    """A ``kfp.Client`` for ``KFP_ENDPOINT``, in ``namespace`` when given, with ``auth``'s
    credentials (resolved by :func:`resolve_auth` when None)."""
    import kfp
    endpoint = os.environ.get("KFP_ENDPOINT")
    if not endpoint:
        raise SystemExit("KFP_ENDPOINT is not set (e.g. export KFP_ENDPOINT=http://localhost:8080)")
    auth = auth or resolve_auth()
    kwargs: dict[str, Any] = {"host": endpoint}
    if namespace:
        kwargs["namespace"] = namespace
    if auth.token:
        kwargs["existing_token"] = auth.token
    elif auth.token_path:
        kwargs["credentials"] = kfp.client.ServiceAccountTokenVolumeCredentials(path=str(auth.token_path))
    log.info("KFP %s, namespace %s, %s", endpoint, namespace or "(the client's default)", auth.describe())
    return kfp.Client(**kwargs)


class BackendUnreadable(Exception):
    """The backend's healthz reply could not be fetched or is not a KFP healthz reply."""


def read_healthz(c) -> dict[str, Any]:
    """The raw JSON of ``GET /apis/v2beta1/healthz``, with the client's host and credentials.

    Raw because the generated model behind ``Client.get_kfp_healthz()`` (kfp-server-api 2.17.3)
    keeps only ``multi_user`` and ``pipeline_store`` and drops ``tag_name``, the version. The API
    server answers ``tag_name``/``pipeline_store``; ml-pipeline-ui (the usual port-forward) answers
    ``apiServerTagName``/``pipelineStore``. Raises BackendUnreadable."""
    try:
        response = c.healthzs.healthz_service_get_healthz(_preload_content=False, _request_timeout=HEALTHZ_TIMEOUT_S)
        body = json.loads(response.data)
    except json.JSONDecodeError:
        raise BackendUnreadable("its healthz reply is not JSON (an auth proxy's login page?)") from None
    except Exception as e:  # network, HTTP status, a client without the healthz API: all mean "unknown"
        status = getattr(e, "status", None)
        what = f"HTTP {status} {getattr(e, 'reason', '')}".strip() if status else type(e).__name__
        raise BackendUnreadable(f"healthz request failed: {what}") from None
    if isinstance(body, dict) and body.get("apiServerReady") is False:
        raise BackendUnreadable("ml-pipeline-ui answered but could not reach the API server")
    if not isinstance(body, dict) or not {"tag_name", "apiServerTagName"} & set(body):
        raise BackendUnreadable("its healthz reply has no tag_name: not one of a KFP API server or ml-pipeline-ui")
    return body


def parse_version(tag: Any) -> tuple[int, int, int] | None:
    """``(2, 14, 0)`` from ``2.14.0``, ``v2.14.0`` or ``2.14.0-rc.1`` (a pre-release counts as its
    release); None for ``unknown``, empty or anything else."""
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", tag) if isinstance(tag, str) else None
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def judge_backend(body: dict[str, Any]) -> tuple[bool, str]:
    """(acceptable, why) for a healthz reply against MIN_BACKEND.

    KFP's own release images before 2.16.0 report ``tag_name: unknown`` (kubeflow/pipelines#11573,
    fixed by #12795), so an unreadable tag is judged by ``pipeline_store``, which the healthz reply
    carries from 2.14.0 on and which no earlier release (2.0.0 ... 2.5.0) has."""
    floor = ".".join(map(str, MIN_BACKEND))
    tag = body.get("tag_name", body.get("apiServerTagName"))
    version = parse_version(tag)
    if version is not None:
        if version >= MIN_BACKEND:
            return True, f"KFP backend {tag} (>= {floor})"
        return False, f"KFP backend {tag} is too old: this pipeline needs >= {floor} because {MIN_BACKEND_WHY}"
    if "pipeline_store" in body or "pipelineStore" in body:
        return True, (f"KFP backend reports version {tag!r}; its healthz carries pipeline_store, "
                      f"which backends >= {floor} return")
    return False, (f"KFP backend reports version {tag!r} and its healthz lacks pipeline_store, which every "
                   f"backend >= {floor} returns: it is older than {floor} (Kubeflow Platform 1.10 ships 2.5.0); "
                   f"this pipeline needs >= {floor} because {MIN_BACKEND_WHY}")


def check_backend(c, skip: bool = False) -> None:
    """Refuse (SystemExit) a backend older than MIN_BACKEND; warn and go on when its version
    cannot be read; do nothing with ``skip`` (--skip-version-check)."""
    floor = ".".join(map(str, MIN_BACKEND))
    if skip:
        log.warning("--skip-version-check: not checking that the KFP backend is >= %s (%s)", floor, MIN_BACKEND_WHY)
        return
    try:
        body = read_healthz(c)
    except BackendUnreadable as e:
        log.warning("could not read the KFP backend version (%s); continuing without the check. The pipeline "
                    "needs backend >= %s because %s", e, floor, MIN_BACKEND_WHY)
        return
    ok, why = judge_backend(body)
    if not ok:
        raise SystemExit(f"{why}. Upgrade Kubeflow Pipelines, or pass --skip-version-check to submit anyway.")
    log.info("%s", why)


def find_pipeline_id(c, name: str, namespace: str | None) -> str:
    """The id of the pipeline named ``name`` in ``namespace`` (shared pipelines when None)."""
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = c.list_pipelines(filter=flt, namespace=namespace, page_size=2).pipelines or []
    if len(found) != 1:
        where = f"namespace {namespace!r}" if namespace else "the shared pipelines"
        raise SystemExit(f"--name {name!r}: {len(found)} pipelines of that name in {where}; "
                         "upload it first without --version")
    return found[0].pipeline_id


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipelines.submit`` (run, schedule, upload)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "schedule", "upload"):
        p = sub.add_parser(name)
        p.add_argument("--package", type=Path, default=RETRAIN_PACKAGE if name == "schedule" else PACKAGE,
                       help="compiled pipeline (default: the retraining pipeline for schedule, the SP-NAS pipeline "
                            "otherwise)")
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
        p.add_argument("--experiment", default="spnas")
        p.add_argument("--namespace", default=None,
                       help="profile namespace of a multi-user Kubeflow (default: $KFP_NAMESPACE, else the client's)")
        p.add_argument("--token", default=None, metavar="TOKEN",
                       help="bearer token (prefer $KFP_TOKEN: argv is visible to other users); default: $KFP_TOKEN, "
                            "else the pod's service-account token file when it exists")
        p.add_argument("--skip-version-check", action="store_true",
                       help="submit without checking that the KFP backend is >= 2.14.0 (dsl.Collected)")
        if name == "schedule":
            p.add_argument("--cron", default="0 0 2 * * *", help="6-field cron, seconds first (default 02:00 daily)")
            p.add_argument("--job-name", default="spnas-retrain")
            p.add_argument("--allow-search", action="store_true",
                           help="schedule the SP-NAS search pipeline itself (days per run; normally on demand)")
            p.add_argument("--max-concurrency", type=int, default=1)
            p.add_argument("--catchup", action="store_true",
                           help="backfill every interval missed while paused or down (default: only the latest)")
        if name == "upload":
            p.add_argument("--name", default="spnas")
            p.add_argument("--version", default=None)
    return ap


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, check the backend, then create the run, recurring run or upload."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    auth = resolve_auth(args.token)
    try:
        _submit(args, auth)
    except SystemExit as e:  # a message naming a bad value must not carry the token along
        if auth.token and isinstance(e.code, str) and auth.token in e.code:
            raise SystemExit(e.code.replace(auth.token, "***")) from None
        raise


def _submit(args: argparse.Namespace, auth: Auth) -> None:
    params = parse_params(args.param, args.package)  # every local check before the first request
    missing = [n for n in required_parameters(args.package) if n not in params] if args.cmd != "upload" else []
    if missing:
        raise SystemExit(f"pipeline parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)} required: "
                         + " ".join(f"--param {n}=..." for n in missing)
                         + (" (the data set's s3:// or minio:// URI)" if missing == ["data_uri"] else ""))
    if args.cmd != "upload":
        check_full_train_shape(params, args.package)
    cron = check_cron(args.cron) if args.cmd == "schedule" else None
    if args.cmd == "schedule":
        check_schedulable(args.package, args.allow_search)
    namespace = args.namespace or os.environ.get("KFP_NAMESPACE") or None
    c = client(namespace, auth)
    check_backend(c, skip=args.skip_version_check)
    if args.cmd == "run":
        run = c.create_run_from_pipeline_package(str(args.package), arguments=params, experiment_name=args.experiment,
                                                 namespace=namespace, enable_caching=False)
        print(f"run {run.run_id} submitted")
    elif args.cmd == "schedule":
        exp = c.create_experiment(args.experiment, namespace=namespace)  # the recurring run lives in its namespace
        job = c.create_recurring_run(experiment_id=exp.experiment_id, job_name=args.job_name, cron_expression=cron,
                                     pipeline_package_path=str(args.package), params=params,
                                     max_concurrency=args.max_concurrency, no_catchup=not args.catchup,
                                     enable_caching=False)
        print(f"recurring run {job.recurring_run_id} created ({cron}, {'catch-up' if args.catchup else 'no catch-up'})")
    elif args.version:
        pid = find_pipeline_id(c, args.name, namespace)
        v = c.upload_pipeline_version(str(args.package), pipeline_version_name=args.version, pipeline_id=pid)
        print(f"uploaded {args.name} version {args.version}: {v.pipeline_version_id}")
    else:
        p = c.upload_pipeline(str(args.package), pipeline_name=args.name, namespace=namespace)
        print(f"uploaded pipeline {args.name}: {p.pipeline_id}")


if __name__ == "__main__":
    main()
