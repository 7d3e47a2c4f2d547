"""Submit, schedule and upload the compiled SP-NAS pipeline through the kfp Client.

    python -m pipelines.submit run      [--param data_uri=s3://datasets/coco ...]
    python -m pipelines.submit schedule --cron "0 0 2 * * *" [--param ...]   # 6 fields, seconds first
    python -m pipelines.submit upload   [--version v2]

The endpoint comes from ``KFP_ENDPOINT`` (e.g. http://localhost:8080 after a port-forward of
ml-pipeline-ui). Parameters keep their types (``Client.create_recurring_run`` does; ``kfp
recurring-run create`` would send strings).
"""
import argparse
import os
from pathlib import Path
from typing import Any

import yaml

PACKAGE = Path(__file__).parent / "spnas_pipeline.yaml"


def pipeline_parameters(package: Path = PACKAGE) -> dict[str, str]:
    """Name -> KFP parameter type of the compiled pipeline's inputs."""
    spec = next(yaml.safe_load_all(package.read_text()))
    return {k: v["parameterType"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}


def parse_params(items: list[str], package: Path = PACKAGE) -> dict[str, Any]:
    """``name=value`` pairs typed by the pipeline's own parameter types; unknown names are errors."""
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
            out[name] = int(value) if kind == "NUMBER_INTEGER" else float(value) if kind == "NUMBER_DOUBLE" else value
        except ValueError:
            raise SystemExit(f"--param {name}={value!r} is not a {kind.lower()}") from None
    return out


def check_cron(cron: str) -> str:
    """KFP cron expressions have 6 fields, seconds first."""
    if len(cron.split()) != 6:
        raise SystemExit(f"--cron {cron!r} must have 6 fields (seconds first), e.g. '0 0 2 * * *' for 02:00 daily")
    return cron


def client():
    import kfp
    endpoint = os.environ.get("KFP_ENDPOINT")
    if not endpoint:
        raise SystemExit("KFP_ENDPOINT is not set (e.g. export KFP_ENDPOINT=http://localhost:8080)")
    return kfp.Client(host=endpoint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "schedule", "upload"):
        p = sub.add_parser(name)
        p.add_argument("--package", type=Path, default=PACKAGE)
        p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
        p.add_argument("--experiment", default="spnas")
        if name == "schedule":
            p.add_argument("--cron", default="0 0 2 * * *", help="6-field cron, seconds first (default 02:00 daily)")
            p.add_argument("--job-name", default="spnas-nightly")
            p.add_argument("--max-concurrency", type=int, default=1)
        if name == "upload":
            p.add_argument("--name", default="spnas")
            p.add_argument("--version", default=None)
    args = ap.parse_args()
    params = parse_params(args.param, args.package)
    c = client()
    if args.cmd == "run":
        run = c.create_run_from_pipeline_package(str(args.package), arguments=params,
                                                 experiment_name=args.experiment, enable_caching=False)
        print(f"run {run.run_id} submitted")
    elif args.cmd == "schedule":
        exp = c.create_experiment(args.experiment)
        job = c.create_recurring_run(experiment_id=exp.experiment_id, job_name=args.job_name,
                                     cron_expression=check_cron(args.cron), pipeline_package_path=str(args.package),
                                     params=params, max_concurrency=args.max_concurrency, enable_caching=False)
        print(f"recurring run {job.recurring_run_id} created ({args.cron})")
    else:
        if args.version:
            pid = c.get_pipeline_id(args.name)
            v = c.upload_pipeline_version(str(args.package), pipeline_version_name=args.version, pipeline_id=pid)
            print(f"uploaded {args.name} version {args.version}: {v.pipeline_version_id}")
        else:
            p = c.upload_pipeline(str(args.package), pipeline_name=args.name)
            print(f"uploaded pipeline {args.name}: {p.pipeline_id}")


if __name__ == "__main__":
    main()
