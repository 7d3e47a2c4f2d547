"""Phase functions for distributed runs (the Kubeflow components call these; no kfp here).

Each function works in a private temporary folder, reads its inputs from URIs or paths
(``s3://``/``minio://`` through :mod:`spnas.storage`, or plain paths, which is what kfp.local
uses), publishes what it writes under the run's prefix ``run_uri/<step>/`` and returns plain
JSON-friendly values. Search state travels as a dict; candidates reference their parent's
weights by URI, because a parent is only chosen at run time.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from . import phases
from .config import RunConfig, StepConfig, load_config
from .errors import ConfigError
from .io import atomic_write_json

log = logging.getLogger(__name__)


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


def _state(state: "str | Mapping[str, Any]") -> dict:
    """Search state from its JSON text (how it travels between pods) or a dict."""
    return plain(json.loads(state) if isinstance(state, str) else dict(state))


def load_step(config_text: str, step_name: str, overrides: "Sequence[str] | str" = ()) -> tuple[RunConfig, StepConfig]:
    """Parse the run config (YAML text, embedded in the pipeline at compile time) and return the
    named step. ``overrides`` is a list of ``key=value`` or its JSON text."""
    if isinstance(overrides, str):
        overrides = json.loads(overrides) if overrides.strip() else []
    try:
        raw = yaml.safe_load(config_text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"pipeline config is not valid YAML: {exc}") from None
    cfg = load_config(raw, workdir=tempfile.gettempdir(), overrides=overrides)
    for s in cfg.steps:
        if s.name == step_name:
            return cfg, s
    raise ConfigError(f"config has no step {step_name!r}; steps: {[s.name for s in cfg.steps]}")


def _local(uri_or_path: str) -> str:
    from .storage import local_path
    return str(local_path(uri_or_path))


def publish(local_file: "str | Path", run_uri: str, step_name: str) -> str:
    """Copy or upload ``local_file`` to ``run_uri/<step>/<name>``; return its URI or path."""
    from .storage import is_uri, upload
    target = f"{run_uri.rstrip('/')}/{step_name}/{Path(local_file).name}"
    if is_uri(run_uri):
        upload(local_file, target)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        if Path(local_file).resolve() != Path(target).resolve():
            shutil.copyfile(local_file, target)
    return target


def _publish_candidate(out: Path, arch_id: Any, run_uri: str, step: str) -> str:
    weights = ""
    for name in (f"desc_{arch_id}.json", f"performance_{arch_id}.json", f"inherit_{arch_id}.json", f"model_{arch_id}.pth"):
        if (out / name).is_file():
            uri = publish(out / name, run_uri, step)
            if name.startswith("model_"):
                weights = uri
    return weights


def fine_tune(config_text: str, step_name: str, data_uri: str, run_uri: str, model_path: str,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """fine_tune on one pod: returns the seed record (weights = its URI under ``run_uri``)."""
    cfg, step = load_step(config_text, step_name, overrides)
    data = _local(data_uri)
    pretrained = _local(step.pretrained_model_file) if step.pretrained_model_file else None
    desc = dict(step.model_desc)
    if step.codes:
        desc["backbone"] = {**desc.get("backbone", {}), "code": step.codes[0]}
    with tempfile.TemporaryDirectory(prefix="spnas-ft-") as tmp:
        res = phases.fine_tune(data, tmp, desc, step.trainer, pretrained=pretrained,
                               convert_pretrained=step.convert_pretrained, device=cfg.device,
                               img_prefix=step.dataset.img_prefix, ann_prefix=step.dataset.ann_prefix)
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "model_0.pth", model_path)
        weights = _publish_candidate(Path(tmp), 0, run_uri, step_name)
        publish(Path(tmp) / "output.csv", run_uri, step_name)
    return struct({**res["record"], "weights": weights, "phase": step_name})


def search_init(config_text: str, step_name: str, seeds: Sequence[Mapping[str, Any]], run_uri: str,
                overrides: Sequence[str] = ()) -> str:
    """The search state of ``step_name`` started from ``seeds`` (records with weight URIs)."""
    cfg, step = load_step(config_text, step_name, overrides)
    seeds = [plain(dict(s)) for s in seeds]
    with tempfile.TemporaryDirectory(prefix="spnas-init-") as tmp:
        local_seeds = [{**s, "weights": _local(s["weights"])} for s in seeds]
        path = phases.search_init(tmp, step.search, local_seeds,
                                  codes=step.codes if step.role == "parallel" else ())
        state = json.loads(Path(path).read_text())
        # seeds whose weights were re-made for the search space's neck codes are published
        for rec in state["records"]:
            w = rec.get("weights")
            if w and Path(w).parent == Path(tmp):
                rec["weights"] = publish(w, run_uri, step_name)
            elif w:
                rec["weights"] = next((s["weights"] for s in seeds if _local(s["weights"]) == w), w)
    return json.dumps(state)


def propose(state: "str | Mapping[str, Any]", k: Optional[int] = None) -> str:
    """One round: JSON text ``{"state": new state, "candidates": [at most k candidates]}``."""
    from .search import propose as _propose
    new_state, candidates = _propose(_state(state), k)
    return json.dumps({"state": new_state, "candidates": struct(candidates)})


def candidates(proposal: str, run_uri: str = "", overrides: "str | Sequence[str]" = "[]") -> list[dict]:
    """The candidates of a proposal (the items a ParallelFor fans out over), each with the run's
    prefix and overrides attached."""
    ov = overrides if isinstance(overrides, str) else json.dumps(list(overrides))
    return [{**c, "run_uri": run_uri, "overrides": ov} for c in json.loads(proposal)["candidates"]]


def train_candidate(config_text: str, step_name: str, candidate: Mapping[str, Any], data_uri: str,
                    run_uri: str, model_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train one candidate on one pod. Never raises for a bad candidate: failures are data."""
    candidate = plain({k: v for k, v in dict(candidate).items() if k not in ("run_uri", "overrides")})
    try:
        cfg, step = load_step(config_text, step_name, overrides)
        data = _local(data_uri)
        parent = _local(candidate["parent_weights"])
    except Exception as exc:  # a bad input must not fail the ParallelFor
        return struct({"id": candidate.get("id"), "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
    with tempfile.TemporaryDirectory(prefix="spnas-cand-") as tmp:
        result = phases.train_candidate({**candidate, "parent_weights": parent}, data, tmp, step.trainer,
                                        freeze_swap_keys=step.freeze_swap_keys, device=cfg.device,
                                        img_prefix=step.dataset.img_prefix, ann_prefix=step.dataset.ann_prefix)
        result.pop("traceback", None)
        result["id"] = candidate["id"]
        if result["status"] == "ok":
            Path(model_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / f"model_{candidate['id']}.pth", model_path)
            result["weights"] = _publish_candidate(Path(tmp), candidate["id"], run_uri, step_name)
    return struct(result)


def update(proposal: str, results: Sequence[Mapping[str, Any]]) -> str:
    """Record a round's results in the proposal's state; returns the new state (JSON text)."""
    from .search import update as _update
    keep = ("id", "status", "metrics", "error", "weights", "inherited", "fresh")
    state = _state(json.loads(proposal)["state"])
    results = [{k: plain(r[k]) for k in keep if k in r} for r in results]
    rounds = {c.get("round") for c in json.loads(proposal)["candidates"]}
    phases.check_round(str(state.get("settings", {}).get("algorithm", "search")), min(rounds, default=0), results)
    return json.dumps(_update(state, results))


def search_front(state: "str | Mapping[str, Any]", run_uri: str, step_name: str) -> list[dict]:
    """Publish the phase's ``state.json``, ``output.csv`` and ``pareto.png``; return the front."""
    from .search import front
    state = _state(state)
    with tempfile.TemporaryDirectory(prefix="spnas-front-") as tmp:
        atomic_write_json(Path(tmp) / "state.json", state)
        paths = phases.search_report(Path(tmp) / "state.json", tmp, step_name)
        for p in (Path(tmp) / "state.json", paths["output_csv"], paths["plot"]):
            publish(p, run_uri, step_name)
    return struct([{**r, "phase": step_name} for r in front(state)])


def reignition(config_text: str, step_name: str, front: Sequence[Mapping[str, Any]], data_uri: str,
               run_uri: str, overrides: Sequence[str] = ()) -> list[dict]:
    """Reignite the front's backbones (top_k by mAP); returns records with new weight URIs."""
    cfg, step = load_step(config_text, step_name, overrides)
    chosen = sorted((plain(dict(r)) for r in front), key=lambda r: -((r.get("metrics") or {}).get("mAP") or 0))
    if step.top_k == 0:
        return struct(list(chosen))
    chosen = chosen[:step.top_k] if step.top_k else chosen
    det = _local(data_uri)
    cls = _local(step.dataset.data_root) if step.dataset.kind == "imagenet" and step.dataset.data_root else None
    with tempfile.TemporaryDirectory(prefix="spnas-re-") as tmp:
        models = [{**r, "weights": _local(r["weights"])} for r in chosen]
        done = phases.reignition(models, tmp, det, data=cls, epochs=step.trainer.epochs,
                                 batch_size=max(step.trainer.batch_size, 16), lr=step.trainer.lr,
                                 image_size=step.image_size, seed=cfg.seed, device=cfg.device)
        for r in done:
            r["weights"] = _publish_candidate(Path(tmp), r["id"], run_uri, step_name)
            r["phase"] = step_name
        publish(Path(tmp) / "output.csv", run_uri, step_name)
    return struct(done)


def full_train(config_text: str, step_name: str, front: Sequence[Mapping[str, Any]], data_uri: str,
               run_uri: str, model_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train the best front member (by mAP) with the full schedule; returns its record."""
    cfg, step = load_step(config_text, step_name, overrides)
    best = max((plain(dict(r)) for r in front), key=lambda r: (r.get("metrics") or {}).get("mAP") or 0)
    data = _local(data_uri)
    with tempfile.TemporaryDirectory(prefix="spnas-full-") as tmp:
        done = phases.full_train([{**best, "weights": _local(best["weights"])}], data, tmp, step.trainer,
                                 device=cfg.device, img_prefix=step.dataset.img_prefix,
                                 ann_prefix=step.dataset.ann_prefix)[0]
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / f"model_{best['id']}.pth", model_path)
        done["weights"] = _publish_candidate(Path(tmp), best["id"], run_uri, step_name)
        publish(Path(tmp) / "output.csv", run_uri, step_name)
    return struct({**done, "phase": step_name})


def report_markdown(phases_records: Mapping[str, Sequence[Mapping[str, Any]]], best: Mapping[str, Any]) -> str:
    """A Markdown summary: the best model and a table of every candidate of every phase."""
    lines = ["# SP-NAS run", "", f"**Best model**: `{best['desc']['backbone']['code']}` neck "
             f"`{best['desc']['neck']['code']}`: mAP {best['metrics']['mAP']:.2f}, AP50 {best['metrics']['AP50']:.2f}, "
             f"{best['params']:,} params, {best['gflops']:.2f} GFLOPs", "", f"weights: `{best['weights']}`", ""]
    for phase, recs in phases_records.items():
        lines += [f"## {phase}", "", "| id | parent | serial code | neck | status | mAP | AP50 | params | GFLOPs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            m = r.get("metrics") or {}
            fmt = (lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-")
            lines.append(f"| {r['id']} | {r.get('parent')} | `{r['desc']['backbone']['code']}` | "
                         f"{r['desc']['neck']['code']} | {r.get('status')} | {fmt(m.get('mAP'))} | {fmt(m.get('AP50'))} | "
                         f"{r.get('params', 0):,} | {fmt(r.get('gflops'))} |")
        lines.append("")
    return "\n".join(lines)


def prepare(config_text: str, seed: int, candidate_epochs: int, full_epochs: int) -> list[str]:
    """Turn the run's pipeline parameters into config overrides (``-1`` keeps the config's
    value), validated here, once, before any pod trains anything."""
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
