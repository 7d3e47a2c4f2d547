"""The SP-NAS phases (SPEC section 2) as plain functions: the one seam that ``spnas run`` and
the Kubeflow components both call. Each takes paths/URIs and plain values (JSON-friendly
dicts) and returns paths and metrics. Orchestration of rounds lives in :func:`run` (local) and
in ``pipelines/`` (Kubeflow), never in the model code.

Per step, files go to ``<workdir>/output/<step name>/`` (Vega's layout): ``desc_<id>.json``,
``performance_<id>.json``, ``model_<id>.pth`` per candidate, ``output.csv`` per phase, and
``state.json`` (search state) for search phases; ``<workdir>/output/reports.json`` holds every
record of the run.

Resume: each finished unit of work leaves a ``result_<id>.json`` (written atomically, last).
With ``resume=True`` a phase function returns that result instead of training again, and an
unfinished training continues from ``train_<id>/last.pth``; so a killed run, resumed, ends with
exactly the records of an uninterrupted one.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from .config import RunConfig, StepConfig
from .detector import normalize_desc
from .engine import TrainConfig
from .errors import SpnasError
from .faults import failpoint
from .inherit import convert_torchvision, inherit_weights, unwrap_state_dict
from .io import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_checkpoint, read_json
from .trainer import evaluate_architecture, train_architecture

log = logging.getLogger(__name__)


class PhaseError(SpnasError):
    """A phase cannot go on (e.g. every candidate of a round failed)."""


def _result_file(out: Path, arch_id: Any) -> Path:
    return out / f"result_{arch_id}.json"


def _finished(out: Path, arch_id: Any, resume: bool) -> Optional[Any]:
    """The saved result of ``arch_id`` when resuming and it finished before, else None."""
    path = _result_file(out, arch_id)
    if resume and path.is_file():
        log.info("%s: %s finished before the interruption; its result is reused", out.name, arch_id)
        return read_json(path, "result file")
    return None


def check_round(step_name: str, round_no: Any, results: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`PhaseError` listing every failure when no candidate of a round succeeded
    (a search cannot go on from nothing); one success is enough to go on."""
    if results and all(r.get("status") != "ok" for r in results):
        raise PhaseError(f"{step_name} round {round_no}: every candidate failed: "
                         + "; ".join(f"candidate {r.get('id')}: {r.get('error')}" for r in results))


def _cfg(trainer: "TrainConfig | Mapping[str, Any]") -> TrainConfig:
    if isinstance(trainer, TrainConfig):
        return trainer
    d = dict(trainer)
    if "steps" in d:
        d["steps"] = tuple(d["steps"])
    return TrainConfig(**d)


def trainer_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-friendly form of a :class:`TrainConfig` (what components pass around)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


# ----------------------------------------------------------------------------- fine_tune

def fine_tune(data_root: str, out_dir: "str | Path", desc: Mapping[str, Any], trainer: "TrainConfig | Mapping",
              pretrained: Optional[str] = None, convert_pretrained: bool = False, device: Optional[str] = None,
              progress: bool = False, img_prefix: str = "2017", ann_prefix: str = "instances",
              resume: bool = False) -> dict[str, Any]:
    """SPEC 2.1: build the seed, load (and convert) a torchvision checkpoint when given, train
    for the configured epochs (0 = convert and evaluate only). Writes candidate 0's files."""
    out = Path(out_dir)
    done = _finished(out, 0, resume)
    if done is not None:
        return done
    init = None
    if pretrained:
        raw = load_checkpoint(pretrained)
        init = convert_torchvision(raw) if convert_pretrained else unwrap_state_dict(raw)
        log.info("fine_tune: starting from %s%s", pretrained, " (converted from torchvision)" if convert_pretrained else "")
    perf = train_architecture(data_root, desc, out, _cfg(trainer), arch_id=0, init=init, device=device,
                              progress=progress, img_prefix=img_prefix, ann_prefix=ann_prefix)
    _cleanup(out, 0)
    record = {"id": 0, "status": "ok", "parent": None, "desc": read_json(out / "desc_0.json"),
              "metrics": _metrics(perf), "params": perf["params"], "gflops": perf["gflops"],
              "weights": str(out / "model_0.pth"), "inherited": perf["init"]["loaded"], "fresh": perf["init"]["fresh"]}
    write_output_csv(out, [record])
    result = {"desc": str(out / "desc_0.json"), "model": str(out / "model_0.pth"), "metrics": record["metrics"],
              "record": record}
    atomic_write_json(_result_file(out, 0), result)
    return result


def _metrics(perf: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "params", "gflops", "latency")
    return {k: perf.get(k) for k in keys}


def _cleanup(out: Path, arch_id: Any) -> None:
    shutil.rmtree(out / f"train_{arch_id}", ignore_errors=True)


# ----------------------------------------------------------------------------- search

def search_init(out_dir: "str | Path", settings: Mapping[str, Any], seeds: Sequence[Mapping[str, Any]],
                codes: Sequence = ()) -> str:
    """Start a search (SpNasS or SpNasP) from ``seeds`` ([{"desc", "metrics", "weights"}]) and
    write ``state.json``; returns its path. For SpNasP, ``codes`` (the search space's neck
    codes) replace the seeds' all-zero parallel codes when given."""
    from .search import SearchSettings, new_state
    s = SearchSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()})
    seeds = [dict(x) for x in seeds]
    if s.algorithm == "SpNasP" and codes:
        expanded = []
        for seed in seeds:
            for code in codes:
                d = normalize_desc(seed["desc"])
                d["neck"]["code"] = list(code)
                d = normalize_desc(d)
                if d != normalize_desc(seed["desc"]):
                    # the new connection modules start at zero: same function, so same metrics
                    state, _ = inherit_weights(seed["desc"], load_checkpoint(seed["weights"]), d)
                    weights = Path(out_dir) / f"seed_{len(expanded)}.pth"
                    atomic_torch_save(weights, state)
                    expanded.append({**seed, "desc": d, "weights": str(weights)})
                else:
                    expanded.append({**seed, "desc": d})
        seeds = expanded
    state = new_state(s, seeds)
    path = Path(out_dir) / "state.json"
    atomic_write_json(path, state)
    return str(path)


def search_propose(state_path: "str | Path", k: Optional[int] = None) -> list[dict]:
    """Propose the next round's candidates; the state file is updated atomically."""
    from .search import propose
    state, candidates = propose(read_json(state_path, "search state"), k)
    atomic_write_json(state_path, state)
    return candidates


def search_pending(state_path: "str | Path") -> list[dict]:
    """Candidates proposed but not yet recorded (a round interrupted before its update), in the
    form :func:`search_propose` returned them; empty when no round is open."""
    from .search import pending
    keys = ("id", "round", "desc", "parent", "parent_desc", "parent_weights", "ops", "params", "gflops")
    return [{k: r[k] for k in keys} for r in pending(read_json(state_path, "search state"))]


def search_update(state_path: "str | Path", results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Record a round's results; returns ``{"front": [ids], "done": bool}``."""
    from .search import front, is_done, update
    keep = ("id", "status", "metrics", "error", "weights", "inherited", "fresh")
    state = update(read_json(state_path, "search state"), [{k: r[k] for k in keep if k in r} for r in results])
    atomic_write_json(state_path, state)
    return {"front": [r["id"] for r in front(state)], "done": is_done(state)}


def train_candidate(candidate: Mapping[str, Any], data_root: str, out_dir: "str | Path",
                    trainer: "TrainConfig | Mapping", freeze_swap_keys: bool = False, device: Optional[str] = None,
                    progress: bool = False, img_prefix: str = "2017", ann_prefix: str = "instances",
                    resume: bool = False) -> dict[str, Any]:
    """Inherit the parent's weights (SPEC 3), train, evaluate. Never raises for a bad candidate:
    the failure comes back as ``{"status": "failed", "error": ...}`` so a round goes on. The
    result is also saved as ``result_<id>.json``; ``resume`` reuses it."""
    cid = candidate["id"]
    out = Path(out_dir)
    done = _finished(out, cid, resume)
    if done is not None:
        return done
    t0 = time.perf_counter()
    result: dict[str, Any] = {"id": cid, "status": "failed", "metrics": None, "error": None, "weights": None,
                              "inherited": None, "fresh": None}
    try:
        parent_state = load_checkpoint(candidate["parent_weights"])
        cfg = _cfg(trainer)
        state, report = inherit_weights(candidate["parent_desc"], parent_state, candidate["desc"], seed=cfg.seed + int(cid))
        result["inherited"], result["fresh"] = len(report["inherited"]), len(report["fresh"])
        trainable = None
        if freeze_swap_keys:
            fresh = set(report["fresh"])
            trainable = lambda name: name in fresh  # noqa: E731  (only what was not inherited trains)
        perf = train_architecture(data_root, candidate["desc"], out, cfg, arch_id=cid, init=state, device=device,
                                  progress=progress, trainable=trainable, img_prefix=img_prefix, ann_prefix=ann_prefix)
        atomic_write_json(out / f"inherit_{cid}.json", report)
        _cleanup(out, cid)
        result.update(status="ok", metrics=_metrics(perf), weights=str(out / f"model_{cid}.pth"))
    except Exception as exc:  # one bad candidate must not fail the search
        log.warning("candidate %s failed: %s: %s", cid, type(exc).__name__, exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=6)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(_result_file(out, cid), result)
    failpoint("candidate", str(cid))
    return result


def write_output_csv(out_dir: "str | Path", records: Sequence[Mapping[str, Any]]) -> Path:
    """Vega's ``output.csv``: worker_id, performance, desc (one row per record given)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["worker_id", "performance", "desc"])
    for r in records:
        w.writerow([r["id"], json.dumps(r.get("metrics"), sort_keys=True), json.dumps(r.get("desc"), sort_keys=True)])
    return atomic_write_bytes(Path(out_dir) / "output.csv", buf.getvalue().encode())


def search_report(state_path: "str | Path", out_dir: "str | Path", title: str) -> dict[str, str]:
    """Write ``output.csv`` (Pareto records) and ``pareto.png`` (every candidate, front
    highlighted) for a search phase."""
    from .plot import pareto_plot
    from .search import front, records
    state = read_json(state_path, "search state")
    fr = front(state)
    out = Path(out_dir)
    write_output_csv(out, fr)
    png = pareto_plot(records(state), [r["id"] for r in fr], out / "pareto.png", title)
    return {"output_csv": str(out / "output.csv"), "plot": str(png)}


# ----------------------------------------------------------------------------- reignition / full train

def reignition(models: Sequence[Mapping[str, Any]], out_dir: "str | Path", detection_root: str,
               data: Optional[str] = None, epochs: int = 1, batch_size: int = 32, lr: float = 0.01,
               image_size: int = 64, seed: int = 0, device: Optional[str] = None, progress: bool = False,
               img_prefix: str = "2017", ann_prefix: str = "instances", resume: bool = False) -> list[dict]:
    """SPEC 2.3: re-train each model's backbone as a classifier (``data`` folder, or object crops
    of ``detection_root``), then evaluate the detector with the new backbone. ``models`` are
    records ``{"id", "desc", "weights"}``; returns records with the new weights and metrics."""
    from .reignite import reignite
    out = Path(out_dir)
    done = []
    for m in models:
        saved = _finished(out, m["id"], resume)
        if saved is not None:
            done.append(saved)
            continue
        perf = reignite(m["desc"], m["weights"], out, data=data, from_detection=None if data else detection_root,
                        epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, seed=seed, device=device,
                        arch_id=m["id"], progress=progress)
        weights = out / f"model_{m['id']}.pth"
        metrics = evaluate_architecture(detection_root, m["desc"], weights, device=device,
                                        img_prefix=img_prefix, ann_prefix=ann_prefix)
        perf_all = {**perf, **metrics}
        atomic_write_json(out / f"performance_{m['id']}.json", perf_all)
        done.append({"id": m["id"], "status": "ok", "parent": m["id"], "desc": normalize_desc(m["desc"]),
                     "metrics": _metrics(metrics), "params": metrics["params"], "gflops": metrics["gflops"],
                     "weights": str(weights), "reignition": perf})
        atomic_write_json(_result_file(out, m["id"]), done[-1])
    write_output_csv(out, done)
    return done


def full_train(models: Sequence[Mapping[str, Any]], data_root: str, out_dir: "str | Path",
               trainer: "TrainConfig | Mapping", device: Optional[str] = None, progress: bool = False,
               img_prefix: str = "2017", ann_prefix: str = "instances", resume: bool = False) -> list[dict]:
    """SPEC 2.5: train each model with the full schedule from its own weights and evaluate."""
    out = Path(out_dir)
    done = []
    for m in models:
        saved = _finished(out, m["id"], resume)
        if saved is not None:
            done.append(saved)
            continue
        perf = train_architecture(data_root, m["desc"], out, _cfg(trainer), arch_id=m["id"], init=m["weights"],
                                  device=device, progress=progress, img_prefix=img_prefix, ann_prefix=ann_prefix)
        _cleanup(out, m["id"])
        done.append({"id": m["id"], "status": "ok", "parent": m["id"], "desc": read_json(out / f"desc_{m['id']}.json"),
                     "metrics": _metrics(perf), "params": perf["params"], "gflops": perf["gflops"],
                     "weights": str(out / f"model_{m['id']}.pth")})
        atomic_write_json(_result_file(out, m["id"]), done[-1])
    write_output_csv(out, done)
    return done
