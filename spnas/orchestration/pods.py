"""Phase functions for Kubeflow pods (the components call these; no kfp here).

Each function parses the run config (embedded in the pipeline as text), finds its step, reads its
inputs from URIs or paths (``s3://``/``minio://`` through :mod:`spnas.storage`, or plain paths,
which is what kfp.local uses), works in a private temporary folder, publishes what it writes
under the run's prefix ``run_uri/<step>/`` and returns plain JSON-friendly values. What a step
hands to its phase comes from :mod:`.steps`, the mapping ``spnas run`` uses too. The search state
travels by reference (a JSON file under ``<run>/<step>/search/``, its URI passed between tasks);
candidates reference their parent's weights by URI, because a parent is
only chosen at run time.

The data set is staged once per run (:func:`stage_data`, into the run's workspace) and read
through it by every heavy task (:func:`data_cache`); its version goes into every Model's
metadata. Weights are stored once, in the task's KFP Model artifact (:func:`_publish_model`),
and the run's result is copied to ``<run>/model_final.pth``. A candidate trains in a child
process (:mod:`.child`), so a crash or kill of its training is a failed record.

A pod given several GPUs trains data-parallel across them (:func:`ddp_processes`: one process per
GPU, launched by ``torch.distributed.run`` inside the pod); a full train on several nodes runs as
a Kubeflow Trainer ``TrainJob`` created and watched by the full-train pod
(:func:`full_train_trainjob`, :mod:`.trainjob`).

Light functions (prepare, propose's bookkeeping, candidates, update, search_front, choose,
collect, report) import no torch: the heavy ones import the phase functions when called.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..config import load_config
from ..config.types import RunConfig, StepConfig
from ..search import front
from ..search import propose as _propose
from ..search import update as _update
from ..search.records import result_of
from ..storage import (
    ENV_CACHE,
    FetchStats,
    Store,
    check_writable,
    exists,
    fetch,
    is_uri,
    list_objects,
    local_path,
    parse_uri,
    upload,
)
from ..utils.errors import ConfigError, PhaseError, PreflightError, SpnasError
from ..utils.fileio import atomic_write, atomic_write_bytes, atomic_write_json, read_json
from . import steps
from .reports import control_summary, report_markdown, write_output_csv
from .rounds import STATE_FILE

log = logging.getLogger(__name__)

#: Keys a fan-out item carries besides its record, so a loop body needs no other task's output.
_ITEM_KEYS = ("run_uri", "overrides")


def plain(value: Any) -> Any:
    """Integral floats back to ints, recursively (protobuf Structs turn every int into a float)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def struct(value: Any) -> Any:
    """``value`` without ``None`` entries (recursively): KFP struct outputs cannot hold nulls."""
    if isinstance(value, dict):
        return {k: struct(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [struct(v) for v in value if v is not None]
    return value


#: Where a search keeps its state between tasks: ``<run>/<step>/search/<name>.json``. Tasks pass
#: the file's URI (or path), never the state itself: the state grows with every candidate, and a
#: task's inputs travel in argv on a cluster (128 KiB per argument).
SEARCH_DIR = "search"


def _state(state: str | Mapping[str, Any]) -> dict:
    """A search state or proposal from its reference (a URI or path of its JSON file, how it
    travels between pods), its JSON text, or a dict."""
    if not isinstance(state, str):
        return plain(dict(state))
    text = state.strip()
    if text.startswith("{"):
        return plain(json.loads(text))
    path = local_path(text) if is_uri(text) else Path(text)
    try:
        return plain(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise PhaseError(f"search state {text} does not exist") from None


def _put_state(obj: Mapping[str, Any], run_uri: str, step_name: str, name: str) -> str:
    """Store ``obj`` as ``<run>/<step>/search/<name>.json``; returns its reference. Names are
    fixed by the round, so a retried task rewrites the same file."""
    with tempfile.TemporaryDirectory(prefix="spnas-state-") as tmp:
        path = Path(tmp) / f"{name}.json"
        atomic_write_json(path, obj)
        return publish(path, run_uri, f"{step_name}/{SEARCH_DIR}")


def _item(item: Mapping[str, Any]) -> tuple[dict[str, Any], str, str]:
    """A fan-out item -> (its record, the run prefix, the overrides JSON)."""
    rec = plain({k: v for k, v in dict(item).items() if k not in _ITEM_KEYS})
    return rec, str(item.get("run_uri", "")), str(item.get("overrides", "[]"))


def _with_item_keys(recs: Sequence[Mapping[str, Any]], run_uri: str, overrides: str | Sequence[str]) -> list[dict]:
    ov = overrides if isinstance(overrides, str) else json.dumps(list(overrides))
    return [{**r, "run_uri": run_uri, "overrides": ov} for r in recs]


def load_run(config_text: str, overrides: Sequence[str] | str = ()) -> RunConfig:
    """Parse the run config (YAML text, embedded in the pipeline at compile time) with
    ``overrides`` (a list of ``key=value`` or its JSON text)."""
    if isinstance(overrides, str):
        overrides = json.loads(overrides) if overrides.strip() else []
    try:
        raw = yaml.safe_load(config_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline config is not valid YAML: {exc}") from None
    return load_config(raw, workdir=tempfile.gettempdir(), overrides=overrides)


def load_step(config_text: str, step_name: str, overrides: Sequence[str] | str = ()) -> tuple[RunConfig, StepConfig]:
    """The run config (see :func:`load_run`) and its step named ``step_name``."""
    cfg = load_run(config_text, overrides)
    for s in cfg.steps:
        if s.name == step_name:
            return cfg, s
    raise ConfigError(f"config has no step {step_name!r}; steps: {[s.name for s in cfg.steps]}")


def publish(local_file: str | Path, run_uri: str, step_name: str, name: str | None = None) -> str:
    """Copy or upload ``local_file`` to ``run_uri/<step>/<name>`` (``run_uri/<name>`` when
    ``step_name`` is empty; ``name`` defaults to the file's own); return its URI or path."""
    target = "/".join(p for p in (run_uri.rstrip("/"), step_name, name or Path(local_file).name) if p)
    if is_uri(run_uri):
        upload(local_file, target)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        if Path(local_file).resolve() != Path(target).resolve():
            shutil.copyfile(local_file, target)
    return target


#: Where a run's workspace keeps the staged data set: the object cache every pod of the run
#: reads (``<workspace>/spnas/cache``, laid out as :mod:`spnas.storage.cache` lays out any cache).
WORKSPACE_CACHE = "spnas/cache"


@contextlib.contextmanager
def data_cache(workspace: str) -> Iterator[Path | None]:
    """While the block runs (child processes included), objects are fetched through the run's
    workspace, where :func:`stage_data` staged the data set once for every pod of the run (a
    warm fetch lists the prefix and downloads nothing); without a workspace (``""``), through
    the pod's own cache, as before. Yields the cache folder in use (``None``: the pod's)."""
    if not workspace:
        yield None
        return
    path = Path(workspace) / WORKSPACE_CACHE
    saved = os.environ.get(ENV_CACHE)
    os.environ[ENV_CACHE] = str(path)
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop(ENV_CACHE, None)
        else:
            os.environ[ENV_CACHE] = saved


def dataset_of(dataset: Any) -> tuple[str, str]:
    """A Dataset artifact written by :func:`stage_data` (duck-typed: ``.metadata``) -> (the
    data set's root URI or path, its version)."""
    meta = dict(getattr(dataset, "metadata", None) or {})
    if not meta.get("root"):
        raise PhaseError(f"the dataset artifact {getattr(dataset, 'uri', dataset)!r} has no 'root' in its metadata: "
                         "it must come from the stage-data task")
    return str(meta["root"]), str(meta.get("version", ""))


#: Where a training pod keeps its checkpoints while it trains: ``<run>/<step>/checkpoints/<key>/``.
CHECKPOINT_DIR = "checkpoints"


@contextlib.contextmanager
def durable(work: Path, run_uri: str, step_name: str, key: str) -> Iterator[bool]:
    """Make the trainings in the block survive a lost pod: every ``last.pth`` they write under
    ``work`` is copied to ``<run>/<step>/checkpoints/<key>/`` (same relative path), and what an
    earlier attempt left there is first restored into ``work`` (yields whether anything was), so
    a retried task resumes instead of starting over. After the block succeeds the copies are
    deleted: the finished weights are published once, elsewhere."""
    from ..training.engine import on_checkpoint
    remote = "/".join([run_uri.rstrip("/"), step_name, CHECKPOINT_DIR, key])
    restored = False
    if is_uri(remote):
        if exists(remote + "/"):
            shutil.copytree(local_path(remote + "/"), work, dirs_exist_ok=True)
            restored = True
    elif Path(remote).is_dir():
        shutil.copytree(remote, work, dirs_exist_ok=True)
        restored = True
    if restored:
        log.info("restored the checkpoints of an earlier attempt from %s", remote)

    def keep(path: Path) -> None:
        rel = path.relative_to(work).as_posix()
        if is_uri(remote):
            upload(path, f"{remote}/{rel}")
        else:
            atomic_write_bytes(Path(remote) / rel, path.read_bytes())

    with on_checkpoint(keep):
        yield restored
    if is_uri(remote):
        bucket, _ = parse_uri(remote)
        with Store.from_env() as st:
            for uri in list_objects(remote + "/", store=st):
                st.remove(bucket, parse_uri(uri)[1], uri)
    else:
        shutil.rmtree(remote, ignore_errors=True)
        with contextlib.suppress(OSError):  # the checkpoints folder, once no training keeps one there
            Path(remote).parent.rmdir()


def artifact_holds_weights(model_uri: str) -> bool:
    """Whether weights written to a KFP artifact at ``model_uri`` can be read back by later
    tasks through this package's storage (an ``s3://``/``minio://`` pipeline root reached with
    the run's credentials, or a local path under kfp.local): then the artifact is the weights'
    only copy. Any other scheme (``gs://``...) keeps them under the run's prefix."""
    return bool(model_uri) and (is_uri(model_uri) or "://" not in model_uri)


def ddp_processes(gpus: Any) -> int:
    """The processes a training of a pod with ``gpus`` GPUs runs: one per GPU, data-parallel,
    when it has more than one; else one."""
    from ..utils.checks import integer
    n = integer(gpus, "the pod's GPU count (gpus_per_task / full_train_gpus)", minimum=0)
    return n if n > 1 else 1


def _publish_model(out: Path, arch_id: Any, run_uri: str, step: str, model_path: str | None = None,
                   model_uri: str = "") -> str:
    """Publish a model's files (desc, performance, inherit report) under ``run_uri/<step>/``; its
    weights go to the component's Model artifact (``model_path``, uploaded by KFP to
    ``model_uri``) and, stored once, are referenced there (:func:`artifact_holds_weights`);
    without an artifact they are published beside the other files. Returns the weights' URI
    (or "" without weights)."""
    weights = ""
    for name in (f"desc_{arch_id}.json", f"performance_{arch_id}.json", f"inherit_{arch_id}.json",
                 f"model_{arch_id}.pth"):
        if not (out / name).is_file():
            continue
        if not name.startswith("model_"):
            publish(out / name, run_uri, step)
            continue
        if model_path:
            Path(model_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / name, model_path)
            if artifact_holds_weights(model_uri):
                weights = model_uri
                continue
        weights = publish(out / name, run_uri, step)
    return weights


# ----------------------------------------------------------------------------- light tasks

def prepare(config_text: str, seed: int, candidate_epochs: int, full_epochs: int, full_train_nodes: int = 1,
            full_train_gpus_per_node: int = 0, shared_volume: bool = True) -> list[str]:
    """Turn the run's pipeline parameters into config overrides (``-1`` keeps the config's
    value), validated here, once, before any pod trains anything: also the full train's shape
    (:func:`.trainjob.check_shape`: several nodes need GPUs and ``shared_volume``, a volume
    every node mounts)."""
    from .trainjob import check_shape
    check_shape(full_train_nodes, full_train_gpus_per_node, shared_volume)
    raw = yaml.safe_load(config_text)
    cfg = load_config(raw, workdir=tempfile.gettempdir())
    overrides = [f"general.seed={int(seed)}"] if int(seed) >= 0 else []
    for s in cfg.steps:
        if s.role in ("serial", "parallel") and int(candidate_epochs) >= 0:
            overrides.append(f"{s.name}.trainer.epochs={int(candidate_epochs)}")
        if s.role == "full_train" and int(full_epochs) >= 0:
            overrides.append(f"{s.name}.trainer.epochs={int(full_epochs)}")
    load_config(raw, workdir=tempfile.gettempdir(), overrides=overrides)
    return overrides


def compiled_contract(config_text: str) -> str:
    """What a pipeline compiled from ``config_text`` expects at run time (JSON text): this
    package's version and the DAG's shape (:func:`~.steps.pipeline_shape`). The pipeline embeds
    it as the preflight task's ``expected`` input."""
    return json.dumps({"version": __version__, "shape": steps.pipeline_shape(load_run(config_text))}, sort_keys=True)


def _run_source(cfg: RunConfig, data_uri: str) -> Any:
    """The run's detection data set: the pipeline's ``data_uri``, else the fine_tune step's."""
    return steps.detection_source(cfg, cfg.step("fine_tune") or cfg.steps[0], data_uri or None)


def preflight(config_text: str, overrides: Sequence[str] | str, data_uri: str, run_uri: str, expected: str) -> dict:
    """Refuse a run that cannot succeed, before any pod trains: the image's package version is
    the compiled one, the run's config has the compiled DAG's shape, the detection data set has
    the COCO layout (annotation files and non-empty image folders for train and val, checked by
    existence only) and the run's results prefix takes a file (a marker written and deleted).

    Returns ``{"data": root, "results": run_uri, "version", "seconds"}``; raises
    :class:`PreflightError` listing every problem found."""
    t0 = time.monotonic()
    want = json.loads(expected)
    problems: list[str] = []
    if want.get("version") != __version__:
        problems.append(f"the image runs spnas {__version__} but the pipeline was compiled with spnas "
                        f"{want.get('version')}: rebuild the image or recompile the pipeline")
    try:
        cfg = load_run(config_text, overrides)
    except ConfigError as exc:
        raise PreflightError(f"preflight refused the run: {exc}") from None
    problems += steps.shape_mismatch(want.get("shape") or {}, steps.pipeline_shape(cfg))
    if any(p.startswith("config key") for p in problems):
        problems.append("the pipeline's rounds and tasks are fixed when it is compiled: recompile it from this "
                        "config (make compile CONFIG=...) instead of changing the config parameter")
    source = _run_source(cfg, data_uri)
    try:
        problems += [f"data set: {m}" for m in source.missing()]
    except SpnasError as exc:  # an unreachable store, bad credentials, a missing bucket
        problems.append(f"data set {source.root}: {exc}")
    try:
        check_writable(run_uri)
    except SpnasError as exc:
        problems.append(str(exc))
    if problems:
        raise PreflightError("preflight refused the run:\n  - " + "\n  - ".join(problems))
    seconds = round(time.monotonic() - t0, 3)
    log.info("preflight passed in %.2f s: data %s, results %s writable, spnas %s", seconds, source.root, run_uri,
             __version__)
    return {"data": source.root, "results": run_uri, "version": __version__, "seconds": seconds}


def stage_data(config_text: str, overrides: Sequence[str] | str, data_uri: str, workspace: str, run_uri: str,
               dataset_path: str = "") -> dict:
    """Stage the run's detection data set once for every pod and record its version.

    With a workspace and a data set in an object store, the whole data set is fetched into
    ``<workspace>/spnas/cache`` (:data:`WORKSPACE_CACHE`), which every heavy task then reads
    (:func:`data_cache`): one download per object for the whole run. A local folder is read in
    place. The manifest (:meth:`~spnas.data.source.CocoSource.manifest`: every file with its
    ETag) is published as ``<run>/data/manifest.json``; ``dataset_path`` (the Dataset
    artifact's file) gets the summary returned: ``{"root", "version", "objects", "bytes",
    "manifest", "staged", "downloaded", "bytes_downloaded", "seconds"}``."""
    t0 = time.monotonic()
    cfg = load_run(config_text, overrides)
    source = _run_source(cfg, data_uri)
    stats, staged = FetchStats(), ""
    if workspace and is_uri(source.root):
        with data_cache(workspace) as cache:
            staged = str(fetch(source.root.rstrip("/") + "/", cache, stats=stats))
    manifest = source.manifest()
    with tempfile.TemporaryDirectory(prefix="spnas-stage-") as tmp:
        path = Path(tmp) / "manifest.json"
        atomic_write_json(path, manifest)
        manifest_uri = publish(path, run_uri, "data")
    got = stats.as_dict()
    summary = {"root": source.root, "version": manifest["version"], "objects": manifest["objects"],
               "bytes": manifest["bytes"], "manifest": manifest_uri, "staged": staged,
               "downloaded": got["downloaded"], "bytes_downloaded": got["bytes_downloaded"],
               "seconds": round(time.monotonic() - t0, 3)}
    if dataset_path:
        atomic_write_json(Path(dataset_path), summary)
    log.info("data set %s version %s: %d files, %d bytes; %s (%d downloaded)", source.root, manifest["version"],
             manifest["objects"], manifest["bytes"], f"staged in {staged}" if staged else "read in place",
             got["downloaded"])
    return summary


#: Where a pod finds its namespace (the service account's projected files).
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: The default results prefix on a cluster: a prefix multi-user KFP (2.15 with SeaweedFS) lets a
#: profile write (``mlpipeline/private/<namespace>/...``); single-user KFP writes anywhere.
DEFAULT_RESULTS = "minio://mlpipeline/private/{namespace}/spnas"


def run_prefix(results_uri: str, job_id: str, namespace_file: str | Path = NAMESPACE_FILE) -> str:
    """Where this run publishes: ``results_uri/<job id>``. An empty ``results_uri`` means the
    cluster default, :data:`DEFAULT_RESULTS` with the pod's namespace (read from
    ``namespace_file``); outside a cluster it must be given."""
    if not results_uri.strip():
        try:
            namespace = Path(namespace_file).read_text(encoding="utf-8").strip()
        except OSError:
            namespace = ""
        if not namespace:
            raise ConfigError(f"pipeline parameter results_uri: not set, and this task runs in no Kubernetes "
                              f"namespace ({namespace_file} is missing) to derive "
                              f"{DEFAULT_RESULTS.format(namespace='<namespace>')} from: pass results_uri")
        results_uri = DEFAULT_RESULTS.format(namespace=namespace)
    return f"{results_uri.rstrip('/')}/{job_id}" if job_id else results_uri


def propose(state: str | Mapping[str, Any], k: int | None, run_uri: str, step_name: str) -> str:
    """One round: ``{"state": new state, "candidates": [at most k candidates]}`` stored under the
    run's prefix; returns its reference."""
    st = _state(state)
    new_state, cands = _propose(st, k)
    name = f"proposal-{cands[0]['round']}" if cands else f"proposal-{st['round']}-none"
    return _put_state({"state": new_state, "candidates": struct(cands)}, run_uri, step_name, name)


def candidates(proposal: str, run_uri: str = "", overrides: str | Sequence[str] = "[]") -> list[dict]:
    """The candidates of a proposal (the items a ParallelFor fans out over), each with the run's
    prefix and overrides attached."""
    return _with_item_keys(_state(proposal)["candidates"], run_uri, overrides)


def update(proposal: str, results: Sequence[Mapping[str, Any]], step_name: str, run_uri: str) -> str:
    """Record a round's results in the proposal's state (a round in which every candidate failed
    stops the search, as in ``spnas run``); stores the new state, returns its reference."""
    prop = _state(proposal)
    results = [plain(result_of(r)) for r in results]
    rnd = min({c.get("round") for c in prop["candidates"]}, default=0)
    steps.check_round(step_name, rnd, results)
    return _put_state(_update(_state(prop["state"]), results), run_uri, step_name, f"state-{rnd + 1}")


def search_front(state: str | Mapping[str, Any], run_uri: str, step_name: str, html_path: str = "") -> list[dict]:
    """Publish the phase's ``state.json``, ``output.csv`` and ``pareto.png`` (and write the plot
    as an HTML page at ``html_path`` for the KFP UI); return the front."""
    from .rounds import search_report
    st = _state(state)
    with tempfile.TemporaryDirectory(prefix="spnas-front-") as tmp:
        atomic_write_json(Path(tmp) / STATE_FILE, st)
        paths = search_report(Path(tmp) / STATE_FILE, tmp, step_name)
        for p in (Path(tmp) / STATE_FILE, paths["output_csv"], paths["plot"]):
            publish(p, run_uri, step_name)
        fr = front(st)
        if html_path:
            data = base64.b64encode(Path(paths["plot"]).read_bytes()).decode()
            Path(html_path).parent.mkdir(parents=True, exist_ok=True)
            Path(html_path).write_text(f"<html><body><h2>{step_name}: Pareto front {[r['id'] for r in fr]}</h2>"
                                       f"<img src='data:image/png;base64,{data}'/></body></html>")
    return struct([{**r, "phase": step_name} for r in fr])


def choose(config_text: str, step_name: str, front_: Sequence[Mapping[str, Any]], run_uri: str,
           overrides: str = "[]") -> list[dict]:
    """The models the step (reignition or full train) takes from the front, as fan-out items:
    :func:`steps.reignition_choice` / :func:`steps.full_train_choice`, as ``spnas run`` chooses."""
    cfg, step = load_step(config_text, step_name, overrides)
    recs, keys = [plain(dict(r)) for r in front_], steps.objective_keys(cfg)
    chosen = (steps.reignition_choice(step, recs, keys) if step.role == "reignition"
              else steps.full_train_choice(step, recs, keys))
    return struct(_with_item_keys(chosen if chosen is not None else [], run_uri, overrides))


def collect(recs: Sequence[Mapping[str, Any]], run_uri: str, step_name: str) -> list[dict]:
    """The records of a fanned-out phase (reignition, full train), in the order chosen: their
    ``output.csv`` is published under the phase's prefix."""
    recs = [plain(dict(r)) for r in recs]
    with tempfile.TemporaryDirectory(prefix="spnas-collect-") as tmp:
        publish(write_output_csv(tmp, recs), run_uri, step_name)
    return struct(recs)


def best(recs: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ()) -> dict:
    """The run's result: the ok record with the highest quality (the first maximised of the run's
    ``objectives``: :func:`steps.best_of`)."""
    found = steps.best_of([plain(dict(r)) for r in recs], objectives)
    if found is None:
        raise ConfigError("no model finished its full train")
    return struct(found)


def report(config_text: str, serial_front: Sequence[Mapping[str, Any]], parallel_front: Sequence[Mapping[str, Any]],
           best_: Mapping[str, Any], controls: Mapping[str, Any] | None, phase_controls: Mapping[str, Any] | None,
           run_uri: str, path: str, overrides: Sequence[str] | str = ()) -> str:
    """Write the run's Markdown report to ``path`` and, when controls ran, ``control.json`` under
    ``run_uri`` (the searched model beside its equal-budget control, the winner, each phase's
    control); copies the run's result (the winner) to ``<run>/model_final.pth`` and returns that URI."""
    cfg = load_run(config_text, overrides)
    result, summary = plain(dict(best_)), None
    if controls:
        controls = plain(dict(controls))
        phase_controls = {k: plain(dict(v)) for k, v in (phase_controls or {}).items() if v.get("status") == "ok"}
        summary = control_summary(controls["searched"], controls["control"], phase_controls, steps.objective_keys(cfg),
                                  _phase_records(run_uri, phase_controls))
        with tempfile.TemporaryDirectory(prefix="spnas-report-") as tmp:
            publish(atomic_write_json(Path(tmp) / "control.json", summary), run_uri, "")
        if summary["winner"] == "control":
            result = controls["control"]
    text = report_markdown({"serial front": serial_front, "parallel front": parallel_front}, result, summary,
                           steps.objective_keys(cfg))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return keep_final_model(str(result.get("weights") or ""), run_uri)


#: The run's result under its prefix: the one weight file kept there (every other model's
#: weights live once, in its KFP Model artifact).
FINAL_MODEL = "model_final.pth"


def keep_final_model(weights: str, run_uri: str) -> str:
    """Copy the run's result (``weights``: a URI or path, often a KFP artifact) to
    ``<run>/model_final.pth`` and return that; "" without weights."""
    return publish(local_path(weights), run_uri, "", FINAL_MODEL) if weights else ""


def _phase_records(run_uri: str, phase_controls: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict]]:
    """The records of each search phase with a control, read back from its published state."""
    from ..search import records
    from ..storage import local_path
    out = {}
    for name in phase_controls:
        try:
            out[name] = records(json.loads(Path(local_path(f"{run_uri.rstrip('/')}/{name}/{STATE_FILE}")).read_text()))
        except Exception as exc:  # the summary still has the control; say what is missing
            log.warning("report: the %s search state could not be read back (%s); its best candidate is left out",
                        name, exc)
    return out


# ----------------------------------------------------------------------------- heavy tasks

def fine_tune(config_text: str, step_name: str, data_uri: str, run_uri: str, model_path: str,
              overrides: Sequence[str] | str = (), model_uri: str = "", gpus: int = 0) -> dict[str, Any]:
    """fine_tune on one pod with ``gpus`` GPUs (data-parallel across them when more than one):
    returns the seed record (weights = its URI under ``run_uri``)."""
    from . import phases
    cfg, step = load_step(config_text, step_name, overrides)
    nproc = ddp_processes(gpus)
    with tempfile.TemporaryDirectory(prefix="spnas-ft-") as tmp, durable(Path(tmp), run_uri, step_name, "0") as again:
        res = phases.fine_tune(step, steps.data_source(step, data_uri), tmp, device=cfg.device, resume=again,
                               nproc=nproc)
        weights = _publish_model(Path(tmp), 0, run_uri, step_name, model_path, model_uri)
        publish(Path(tmp) / "output.csv", run_uri, step_name)
    return struct({**res["record"], "weights": weights, "phase": step_name})


def search_init(config_text: str, step_name: str, seeds: Sequence[Mapping[str, Any]], run_uri: str,
                overrides: Sequence[str] | str = (), data_uri: str = "") -> str:
    """The search state of ``step_name`` started from ``seeds`` (records with weight URIs);
    seeds re-made for the search space's codes are published. A serial seed derived for another
    backbone code is evaluated on ``data_uri`` (else the config's data set)."""
    from . import phases
    cfg, step = load_step(config_text, step_name, overrides)
    seeds = steps.search_seeds([plain(dict(s)) for s in seeds])
    with tempfile.TemporaryDirectory(prefix="spnas-init-") as tmp:
        data = steps.data_source(step, data_uri or None) if data_uri or step.dataset.data_root else None
        path = phases.search_init(step, seeds, tmp, data=data, device=cfg.device)
        state = json.loads(Path(path).read_text())
        for rec in state["records"]:
            w = rec.get("weights")
            if w and Path(w).parent == Path(tmp):
                rec["weights"] = publish(w, run_uri, step_name)
    return _put_state(state, run_uri, step_name, "state-0")


def train_candidate(config_text: str, step_name: str, item: Mapping[str, Any], data_uri: str,
                    model_path: str, time_limit: float | None = None, model_uri: str = "",
                    gpus: int = 0) -> dict[str, Any]:
    """Train one candidate (a fan-out item) on one pod with ``gpus`` GPUs (data-parallel across
    them when more than one), in a child process (:func:`~.child.run_isolated`): a bad
    candidate, a crash of its training (a signal such as the OOM killer's SIGKILL, a non-zero
    exit) and a training over ``time_limit`` seconds all come back as a failed record naming
    the cause; nothing here raises for a candidate."""
    from .child import ChildFailed, run_isolated
    candidate, _, _ = _item(item)
    cid = candidate.get("id")
    try:
        return struct(run_isolated("train_candidate_here", {
            "config_text": config_text, "step_name": step_name, "item": plain(dict(item)),
            "data_uri": data_uri, "model_path": model_path, "model_uri": model_uri, "nproc": ddp_processes(gpus)},
            what=f"candidate {cid}",
            timeout=time_limit if time_limit and time_limit > 0 else None))
    except ChildFailed as exc:
        log.warning("%s", exc)
        return struct({"id": cid, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})


def train_candidate_here(config_text: str, step_name: str, item: Mapping[str, Any], data_uri: str,
                         model_path: str, model_uri: str = "", nproc: int = 1) -> dict[str, Any]:
    """:func:`train_candidate` in this process (what its child process runs; ``nproc``
    data-parallel processes). Never raises for a bad candidate: failures are data."""
    from ..utils.faults import failpoint
    candidate, run_uri, overrides = _item(item)
    failpoint("candidate_child", f"{step_name}/{candidate.get('id')}")
    try:
        from . import phases
        cfg, step = load_step(config_text, step_name, overrides)
        data = steps.data_source(step, data_uri)
    except Exception as exc:  # a bad input must not fail the ParallelFor
        return struct({"id": candidate.get("id"), "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
    with tempfile.TemporaryDirectory(prefix="spnas-cand-") as tmp:
        try:
            with durable(Path(tmp), run_uri, step_name, str(candidate.get("id"))) as again:
                result = dict(phases.train_candidate(candidate, step, data, tmp, device=cfg.device, resume=again,
                                                     nproc=nproc))
                result.pop("traceback", None)
                if result["status"] == "ok":
                    result["weights"] = _publish_model(Path(tmp), candidate["id"], run_uri, step_name, model_path,
                                                       model_uri)
        except SpnasError as exc:  # the run's store refused (checkpoints, weights): a failed candidate
            result = {"id": candidate.get("id"), "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    return struct(result)


def reignite_one(config_text: str, step_name: str, item: Mapping[str, Any], data_uri: str,
                 model_path: str, model_uri: str = "", gpus: int = 0) -> dict[str, Any]:
    """Reignite one chosen model (a fan-out item of :func:`choose`) on one pod with ``gpus``
    GPUs (data-parallel across them when more than one); returns its new record."""
    from . import phases
    model, run_uri, overrides = _item(item)
    cfg, step = load_step(config_text, step_name, overrides)
    with tempfile.TemporaryDirectory(prefix="spnas-re-") as tmp:
        rec = phases.reignition([model], step, tmp, detection=steps.detection_source(cfg, step, data_uri),
                                seed=cfg.seed, device=cfg.device, nproc=ddp_processes(gpus),
                                objectives=steps.objective_keys(cfg))[0]
        rec["weights"] = _publish_model(Path(tmp), rec["id"], run_uri, step_name, model_path, model_uri)
    return struct({**rec, "phase": step_name})


def full_train_one(config_text: str, step_name: str, item: Mapping[str, Any], data_uri: str,
                   model_path: str, model_uri: str = "", gpus: int = 0) -> dict[str, Any]:
    """Full-train one chosen model (a fan-out item of :func:`choose`) on this pod with ``gpus``
    GPUs (data-parallel across them when more than one); returns its record."""
    from . import phases
    model, run_uri, overrides = _item(item)
    cfg, step = load_step(config_text, step_name, overrides)
    nproc = ddp_processes(gpus)
    with tempfile.TemporaryDirectory(prefix="spnas-full-") as tmp, \
            durable(Path(tmp), run_uri, step_name, str(model.get("id"))) as again:
        rec = phases.full_train([model], step, steps.data_source(step, data_uri), tmp, device=cfg.device,
                                resume=again, nproc=nproc)[0]
        rec["weights"] = _publish_model(Path(tmp), rec["id"], run_uri, step_name, model_path, model_uri)
    return struct({**rec, "phase": step_name})





#: Where the run's shared volume keeps each multi-node full train: ``<volume>/spnas/trainjobs/<step>/<id>/``
#: holds ``call.json``, rank 0's ``result.json``, the initial weights ``init.pth`` and the training's
#: files under ``out/`` (its checkpoints included: a TrainJob created again resumes from them).
TRAINJOB_DIR = "spnas/trainjobs"
#: How much longer than the TrainJob's own deadline (``spec.activeDeadlineSeconds``) its watcher
#: waits before it gives up and deletes the job: the controller's ``DeadlineExceeded`` comes first.
TRAINJOB_GRACE_S = 300


def pod_namespace(namespace_file: str | Path | None = None) -> str:
    """The namespace this pod runs in (its service account's namespace file,
    :data:`NAMESPACE_FILE` unless given)."""
    namespace_file = namespace_file or NAMESPACE_FILE
    try:
        namespace = Path(namespace_file).read_text(encoding="utf-8").strip()
    except OSError:
        namespace = ""
    if not namespace:
        raise PhaseError(f"this task runs in no Kubernetes namespace ({namespace_file} is missing): a TrainJob "
                         "is created from a pod of the cluster")
    return namespace


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While the block runs, SIGTERM (a pod being stopped) raises ``SystemExit`` instead of
    ending the process at once, so the block can clean up (the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)
    saved = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def full_train_trainjob(config_text: str, step_name: str, item: Mapping[str, Any], data_uri: str, workspace: str,
                        model_path: str, model_uri: str = "", *, nodes: int, gpus_per_node: int,
                        resources: Mapping[str, Any], cluster: Mapping[str, Any], api: Any = None,
                        core_api: Any = None, namespace_file: str | Path | None = None, poll: float = 30.0,
                        clock: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full-train one chosen model (a fan-out item of :func:`choose`) on ``nodes`` nodes of
    ``gpus_per_node`` GPUs each, as a Kubeflow Trainer ``TrainJob`` (:mod:`.trainjob`) created in
    this pod's namespace and watched from here; the record is the one :func:`full_train_one`
    returns for the same training, and the weights go to the Model artifact the same way.

    ``workspace`` is the run's shared volume as mounted here (its claim is read from this pod's
    own spec, through ``core_api``); every node mounts it at the same path and finds there the
    call, the data (call this inside :func:`data_cache` of it, so a data set in an object store
    is read from the run's staged copy) and the initial weights; rank 0 writes the result and
    the training's files there (:data:`TRAINJOB_DIR`). A result already there (a retried task)
    is read back without a new TrainJob. ``resources`` gives each node's ``accelerator``, ``cpu``
    and ``memory``; ``cluster`` the pipeline's settings: ``image``, ``shm_size``,
    ``image_pull_secret``, ``time_limit`` (seconds: the job's deadline), and the run's
    ``node_selector`` and ``tolerations``. The job is named after the run's id (the last part
    of the run's prefix), step and model. Returns ``(record, {"trainjob": "<namespace>/<name>",
    "nodes", "gpus_per_node", "world_size"})``; raises :class:`~.trainjob.TrainJobError`
    (``TrainJobFailed`` with the job's reason and message)."""
    from ..training import launch
    from . import phases
    from . import trainjob as tj
    model, run_uri, overrides = _item(item)
    cfg, step = load_step(config_text, step_name, overrides)
    nodes, gpus_per_node = tj.check_shape(nodes, gpus_per_node, bool(workspace))
    mid = model.get("id")
    shared = Path(workspace)
    job_dir = shared / TRAINJOB_DIR / step_name / str(mid)
    out, call, result = job_dir / "out", job_dir / "call.json", job_dir / "result.json"
    run_id = run_uri.rstrip("/").rsplit("/", 1)[-1]
    namespace = pod_namespace(namespace_file)
    name = tj.job_name(run_id, step_name, mid)
    if result.is_file():
        log.info("TrainJob %s/%s: rank 0's result of an earlier attempt is there (%s); not training again",
                 namespace, name, result)
    else:
        data = steps.data_source(step, data_uri).local()
        if not Path(data.root).resolve().is_relative_to(shared.resolve()):
            raise tj.TrainJobError(f"the data set {data.root} is not on the run's shared volume {shared}: the nodes of "
                                   "a TrainJob read it there (give the data set as an s3:// or minio:// URI, staged "
                                   "into the run's workspace, or as a path on the --data-volume claim)")
        init = job_dir / "init.pth"
        if not init.is_file():
            with open(local_path(model["weights"]), "rb") as src:
                atomic_write(init, lambda fh: shutil.copyfileobj(src, fh))
        launch.write_call(call, desc=model["desc"], data=data, out_dir=out, cfg=step.trainer, arch_id=mid, init=init,
                          device=cfg.device, resume=True)
        time_limit = int(cluster.get("time_limit") or 0)
        pod = tj.this_pod(core_api if core_api is not None else tj.core_v1_api(), namespace)
        plan = tj.TrainJobPlan(
            name=name, namespace=namespace, image=str(cluster["image"]), nodes=nodes, gpus_per_node=gpus_per_node,
            claim=tj.claim_at(pod, str(shared)), mount_path=str(shared),
            args=tuple(launch.rank_command(call, result)), accelerator=str(resources.get("accelerator") or ""),
            cpu=str(resources.get("cpu") or ""), memory=str(resources.get("memory") or ""),
            shm_size=str(cluster.get("shm_size") or "2Gi"),
            labels=tj.run_labels(run_id, step_name, mid, tj.workflow_of(pod)),
            node_selector={str(k): str(v) for k, v in (cluster.get("node_selector") or {}).items()},
            tolerations=[plain(dict(t)) for t in cluster.get("tolerations") or []],
            image_pull_secret=str(cluster.get("image_pull_secret") or ""), deadline_seconds=time_limit or None)
        with _sigterm_stops():
            tj.run(api if api is not None else tj.custom_objects_api(), plan,
                   timeout=time_limit + TRAINJOB_GRACE_S if time_limit else math.inf, poll=poll, clock=clock,
                   sleep=sleep)
        if not result.is_file():
            raise tj.TrainJobError(f"TrainJob {namespace}/{name} completed without rank 0's result {result}")
    perf = read_json(result, "rank 0's result")
    rec = phases._record(mid, perf, read_json(out / f"desc_{mid}.json"), out / f"model_{mid}.pth", mid,
                         lineage_iters=(model.get("lineage_iters") or 0) + perf["iters"])
    shutil.rmtree(out / f"train_{mid}", ignore_errors=True)  # the checkpoints: the training is over
    rec["weights"] = _publish_model(out, mid, run_uri, step_name, model_path, model_uri)
    return struct({**rec, "phase": step_name}), {"trainjob": f"{namespace}/{name}", "nodes": nodes,
                                                 "gpus_per_node": gpus_per_node, "world_size": nodes * gpus_per_node}


def fill_artifacts(record: Mapping[str, Any], model: Any = None, metrics: Any = None, **metadata: Any) -> None:
    """Describe a record on a component's KFP artifacts (duck-typed: no kfp here): the Model's
    metadata gets id, status, weights URI, description, error and ``metadata`` (the data
    version, the pod's resources, the training's ``world_size``, a multi-node full train's
    ``trainjob``); every numeric metric is logged on the Metrics artifact. A
    model that did not train (a failed candidate, a skipped control) is marked in the metadata
    (``status``) and its artifact is an empty folder, never a file posing as weights."""
    if model is not None:
        status = record.get("status", "ok")
        model.metadata.update({"id": record.get("id"), "status": status,
                               "uri": record.get("weights") or "", "desc": record.get("desc", {}),
                               "error": record.get("error") or "", **metadata})
        if status != "ok":
            Path(model.path).mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        for key, value in (record.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(key, value)


def finish(config_text: str, recs: Sequence[Mapping[str, Any]], run_uri: str, step_name: str,
           overrides: Sequence[str] | str = ()) -> dict:
    """A fanned-out full train's end: :func:`collect` (publishes ``output.csv``), then
    :func:`best` by the run's quality."""
    return best(collect(recs, run_uri, step_name), steps.objective_keys(load_run(config_text, overrides)))



def reignite_if_plateau(config_text: str, step_name: str, state: str | Mapping[str, Any], data_uri: str,
                        run_uri: str, overrides: Sequence[str] | str = (), models_path: str = "",
                        models_uri: str = "") -> str:
    """After a serial round: when the front's best quality has not improved for
    ``reignition_patience`` rounds (and fewer than ``max_reignitions`` happened), reignite the
    front (the config's reignition settings, as ``spnas run`` does), publish the weights and add
    the reignited models to the search; returns the state's reference (the same one when nothing
    changed). ``models_path`` (a folder: the task's Model artifact) gets a copy of each
    reignited model's weights and ``reignited.json`` listing them (``[]`` when nothing was)."""
    from ..search import add_reignited, front, plateau
    from . import phases
    st = _state(state)
    listing: list[dict] = []
    if models_path:
        Path(models_path).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(models_path) / "reignited.json", listing)
    if not plateau(st):
        return state if isinstance(state, str) else _put_state(st, run_uri, step_name, f"state-{st['round']}")
    cfg, step = load_step(config_text, step_name, overrides)
    rstep = steps.inner_reignition_step(cfg, step)
    keys = steps.objective_keys(cfg)
    chosen = steps.reignition_choice(rstep, front(st), keys) or front(st)
    k = st["plateau"]["reignitions"]
    with tempfile.TemporaryDirectory(prefix="spnas-inner-re-") as tmp:
        done = phases.reignition(chosen, rstep, tmp, detection=steps.detection_source(cfg, step, data_uri),
                                 seed=cfg.seed, device=cfg.device, objectives=keys)
        for r in done:
            r["weights"] = _publish_model(Path(tmp), r["id"], run_uri, f"{step_name}/reignition_{k}",
                                          str(Path(models_path) / f"model_{r['id']}.pth") if models_path else None,
                                          f"{models_uri.rstrip('/')}/model_{r['id']}.pth" if models_uri else "")
            listing.append({"id": r["id"], "uri": r["weights"]})
    if models_path:
        atomic_write_json(Path(models_path) / "reignited.json", listing)
    return _put_state(add_reignited(st, done), run_uri, step_name, f"state-{st['round']}-reignited-{k}")


def phase_control(config_text: str, step_name: str, state: str | Mapping[str, Any], data_uri: str, run_uri: str,
                  model_path: str, overrides: Sequence[str] | str = (), model_uri: str = "",
                  gpus: int = 0) -> dict[str, Any]:
    """A search phase's equal-budget control on one pod with ``gpus`` GPUs (data-parallel across
    them when more than one; see :func:`steps.phase_control_plan`): its record, weights
    published under ``run_uri/<step>/``; ``{"status": "skipped"}`` when no candidate of the
    phase succeeded."""
    from ..search import records
    from . import phases
    cfg, step = load_step(config_text, step_name, overrides)
    plan = steps.phase_control_plan(records(_state(state)), steps.objective_keys(cfg))
    if plan is None:
        return {"status": "skipped", "id": "control"}
    seed = plan["seed"]
    with tempfile.TemporaryDirectory(prefix="spnas-ctrl-") as tmp, \
            durable(Path(tmp), run_uri, step_name, "control") as again:
        rec = phases.control("control", seed["desc"], seed["weights"], [step.trainer] * plan["generations"],
                             steps.data_source(step, data_uri), tmp, base_lineage=seed.get("lineage_iters") or 0,
                             device=cfg.device, resume=again, nproc=ddp_processes(gpus))
        rec.update(best=plan["best"]["id"], seed=seed["id"], planned_iters=plan["iters"])
        rec["weights"] = _publish_model(Path(tmp), f"control_{rec['generations'] - 1}", run_uri, step_name, model_path,
                                        model_uri)
    return struct({**rec, "phase": step_name})


def final_control(config_text: str, step_name: str, fine_tuned: Sequence[Mapping[str, Any]], best_: Mapping[str, Any],
                  data_uri: str, run_uri: str, model_path: str, overrides: Sequence[str] | str = (),
                  model_uri: str = "", gpus: int = 0) -> dict[str, Any]:
    """The run's equal-budget control on one pod with ``gpus`` GPUs (data-parallel across them
    when more than one): the fine-tuned seed trained as long as the final model's lineage (the
    full train's schedule stretched); both measured for latency and memory. Returns
    ``{"searched": best record, "control": control record}``."""
    from . import phases
    cfg, step = load_step(config_text, step_name, overrides)
    seed, best_ = plain(dict(fine_tuned[0])), plain(dict(best_))
    with tempfile.TemporaryDirectory(prefix="spnas-final-ctrl-") as tmp, \
            durable(Path(tmp), run_uri, step_name, "final_control") as again:
        rec = phases.control("control", steps.seed_architecture(seed), seed["weights"],
                             [steps.final_control_trainer(step, best_["lineage_iters"])],
                             steps.data_source(step, data_uri), tmp, device=cfg.device, resume=again,
                             nproc=ddp_processes(gpus))
        rec["weights"] = _publish_model(Path(tmp), "control_0", run_uri, step_name, model_path, model_uri)
    size, batch = int(best_["desc"].get("max_size", 800)), step.trainer.batch_size
    searched, control = (phases.measure_costs(r, size, batch, cfg.device) for r in (best_, rec))
    return struct({"searched": searched, "control": {**control, "phase": step_name}})


# ----------------------------------------------------------------------------- component bodies
# Each takes the run's Dataset artifact (from stage_data: its root and version) and the run's
# workspace ("" without one): the data set is read through the workspace's staged copy, and its
# version is written into every Model's metadata.

def stage_data_task(config_text: str, overrides: str, data_uri: str, workspace: str, run_uri: str, dataset: Any) -> None:
    """The stage-data component: :func:`stage_data`, the summary as the Dataset's metadata."""
    dataset.metadata.update(stage_data(config_text, overrides, data_uri, workspace, run_uri, dataset.path))


def fine_tune_task(config_text: str, step_name: str, dataset: Any, workspace: str, run_uri: str, overrides: str,
                   model: Any, metrics: Any, resources: Mapping[str, Any] | None = None) -> list[dict]:
    """The fine_tune component: :func:`fine_tune` on the pod's GPUs (``resources["gpus"]``), its
    artifacts described (the pod's resources and the training's world size with the model);
    returns ``[seed]``."""
    root, version = dataset_of(dataset)
    res = dict(resources or {})
    with data_cache(workspace):
        rec = fine_tune(config_text, step_name, root, run_uri, model.path, overrides, model.uri, gpus=res.get("gpus", 0))
    pod = {"resources": res} if res else {}
    fill_artifacts(rec, model, metrics, **pod, world_size=ddp_processes(res.get("gpus", 0)), data_version=version)
    return [rec]


def search_init_task(config_text: str, step_name: str, seeds: Sequence[Mapping[str, Any]], run_uri: str,
                     overrides: str, dataset: Any, workspace: str) -> str:
    """The search-init component: :func:`search_init` reading the staged data set."""
    root, _ = dataset_of(dataset)
    with data_cache(workspace):
        return search_init(config_text, step_name, seeds, run_uri, overrides, root)


def train_candidate_task(config_text: str, step_name: str, item: Mapping[str, Any], dataset: Any, workspace: str,
                         model: Any, metrics: Any, resources: Mapping[str, Any], time_limit: float | None = None) -> dict:
    """The train-candidate component: :func:`train_candidate` (in a child process, at most
    ``time_limit`` seconds, on the pod's GPUs), its artifacts described (data version, the pod's
    resources and the training's world size recorded with the model)."""
    root, version = dataset_of(dataset)
    gpus = resources.get("gpus", 0)
    with data_cache(workspace):  # the child process inherits the cache folder
        result = train_candidate(config_text, step_name, item, root, model.path, time_limit, model.uri, gpus=gpus)
    fill_artifacts({**result, "desc": dict(item).get("desc", {})}, model, metrics, resources=dict(resources),
                   world_size=ddp_processes(gpus), data_version=version)
    return result


def reignite_task(config_text: str, step_name: str, item: Mapping[str, Any], dataset: Any, workspace: str, model: Any,
                  resources: Mapping[str, Any]) -> dict:
    """The reignite component: :func:`reignite_one` (data-parallel across the pod's GPUs when
    it has several), its Model described."""
    root, version = dataset_of(dataset)
    gpus = dict(resources).get("gpus", 0)
    with data_cache(workspace):
        rec = reignite_one(config_text, step_name, item, root, model.path, model.uri, gpus=gpus)
    fill_artifacts(rec, model, resources=dict(resources), world_size=ddp_processes(gpus), data_version=version)
    return rec


def reignite_if_plateau_task(config_text: str, step_name: str, state: str, dataset: Any, workspace: str, run_uri: str,
                             overrides: str, models: Any) -> str:
    """The plateau-reignition component: :func:`reignite_if_plateau`; ``models`` (a Model
    artifact, a folder) gets the reignited weights, and its metadata lists them (``reignited``:
    their ids and weight URIs; an empty folder and ``[]`` when the front was still improving)."""
    root, version = dataset_of(dataset)
    with data_cache(workspace):
        out = reignite_if_plateau(config_text, step_name, state, root, run_uri, overrides, models.path, models.uri)
    listing = json.loads((Path(models.path) / "reignited.json").read_text())
    models.metadata.update({"reignited": listing, "status": "ok" if listing else "skipped", "data_version": version})
    return out


def full_train_task(config_text: str, step_name: str, item: Mapping[str, Any], dataset: Any, workspace: str, model: Any,
                    metrics: Any, resources: Mapping[str, Any], nodes: int = 1, gpus_per_node: int = 0,
                    cluster: Mapping[str, Any] | None = None) -> dict:
    """The full-train component: with ``nodes`` 1, :func:`full_train_one` on the pod's GPUs;
    with more, :func:`full_train_trainjob` (``gpus_per_node`` GPUs and the pod's ``cpu`` and
    ``memory`` per node; ``cluster``: its settings). Its artifacts are described alike (the
    pod's resources, the training's world size, and ``trainjob`` when one ran)."""
    root, version = dataset_of(dataset)
    res = dict(resources)
    with data_cache(workspace):
        if int(nodes) > 1:
            rec, job = full_train_trainjob(config_text, step_name, item, root, workspace, model.path, model.uri,
                                           nodes=nodes, gpus_per_node=gpus_per_node, resources=res,
                                           cluster=cluster or {})
            extra = {"world_size": job.pop("world_size"), "trainjob": job}
        else:
            rec = full_train_one(config_text, step_name, item, root, model.path, model.uri, gpus=res.get("gpus", 0))
            extra = {"world_size": ddp_processes(res.get("gpus", 0))}
    fill_artifacts(rec, model, metrics, resources=res, **extra, data_version=version)
    return rec


def phase_control_task(config_text: str, step_name: str, state: str, dataset: Any, workspace: str, run_uri: str,
                       overrides: str, model: Any, metrics: Any, resources: Mapping[str, Any]) -> dict:
    """The phase-control component: :func:`phase_control` on the pod's GPUs, its artifacts
    described (``status`` ``skipped`` and an empty Model folder when no candidate of the phase
    succeeded)."""
    root, version = dataset_of(dataset)
    gpus = resources.get("gpus", 0)
    with data_cache(workspace):
        rec = phase_control(config_text, step_name, state, root, run_uri, model.path, overrides, model.uri, gpus=gpus)
    fill_artifacts(rec, model, metrics, resources=dict(resources), world_size=ddp_processes(gpus), data_version=version)
    return rec


def final_control_task(config_text: str, step_name: str, fine_tuned: Sequence[Mapping[str, Any]], best_: Mapping[str, Any],
                       dataset: Any, workspace: str, run_uri: str, overrides: str, model: Any, metrics: Any,
                       resources: Mapping[str, Any]) -> dict:
    """The final-control component: :func:`final_control` on the pod's GPUs, its artifacts
    described."""
    root, version = dataset_of(dataset)
    gpus = resources.get("gpus", 0)
    with data_cache(workspace):
        out = final_control(config_text, step_name, fine_tuned, best_, root, run_uri, model.path, overrides,
                            model.uri, gpus=gpus)
    fill_artifacts(out["control"], model, metrics, resources=dict(resources), world_size=ddp_processes(gpus),
                   data_version=version)
    return out


__all__ = ["plain", "struct", "load_step", "publish", "prepare", "run_prefix", "propose", "candidates", "update",
           "search_front", "choose", "collect", "best", "report", "fine_tune", "search_init", "train_candidate",
           "reignite_one", "full_train_one", "fill_artifacts", "finish", "fine_tune_task", "phase_control",
           "final_control", "reignite_if_plateau", "phase_control_task", "final_control_task",
           "train_candidate_task", "reignite_task", "full_train_task", "train_candidate_here", "stage_data",
           "stage_data_task", "search_init_task", "reignite_if_plateau_task", "data_cache", "dataset_of",
           "WORKSPACE_CACHE", "keep_final_model", "FINAL_MODEL", "artifact_holds_weights", "ddp_processes",
           "full_train_trainjob", "pod_namespace", "TRAINJOB_DIR"]
