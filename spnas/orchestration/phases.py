"""The phase functions: the seam shared by ``spnas run`` and the Kubeflow components.

Each function takes the step's config object (:class:`~spnas.config.types.StepConfig`), a data
source and an output folder, and returns JSON-friendly records. Orchestration of rounds lives
in :mod:`.local` (one machine) and in ``pipelines/`` (Kubeflow), never in the model code; what a
step hands to its phase is decided once, in :mod:`.steps`.

Per step, files go to ``<workdir>/output/<step name>/`` (Vega's layout): ``desc_<id>.json``,
``performance_<id>.json``, ``model_<id>.pth`` per candidate, ``output.csv`` per phase, and
``state.json`` (search state) for search phases.

Resume: each finished unit of work leaves a ``result_<id>.json`` (written atomically, last).
With ``resume=True`` a phase function returns that result instead of training again, and an
unfinished training continues from ``train_<id>/last.pth``; so a killed run, resumed, ends with
exactly the records of an uninterrupted one.
"""
from __future__ import annotations

import logging
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config.types import StepConfig
from ..data.source import CocoSource
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.convert import convert_torchvision, unwrap_state_dict
from ..models.desc import normalize_desc
from ..models.inherit import inherit_weights
from ..search import SearchSettings, new_state
from ..search.records import Candidate, Result
from ..storage import local_path
from ..training.architecture import evaluate_architecture, train_architecture
from ..training.evaluation import METRIC_NAMES
from ..training.reignite import reignite
from ..utils.faults import failpoint
from ..utils.fileio import atomic_write_bytes, atomic_write_json, read_json
from . import steps
from .reports import write_output_csv
from .rounds import STATE_FILE

log = logging.getLogger(__name__)

#: What a record's ``metrics`` hold: the COCO box metrics and the model's cost.
RECORD_METRICS = (*METRIC_NAMES, "params", "gflops", "latency")


def _result_file(out: Path, arch_id: Any) -> Path:
    return out / f"result_{arch_id}.json"


def _finished(out: Path, arch_id: Any, resume: bool) -> Any | None:
    """The saved result of ``arch_id`` when resuming and it finished before, else None."""
    path = _result_file(out, arch_id)
    if resume and path.is_file():
        log.info("%s: %s finished before the interruption; its result is reused", out.name, arch_id)
        return read_json(path, "result file")
    return None


def _metrics(perf: Mapping[str, Any]) -> dict[str, Any]:
    return {k: perf.get(k) for k in RECORD_METRICS}


def _record(arch_id: Any, perf: Mapping[str, Any], desc: Mapping[str, Any], weights: Path, parent: Any,
            **extra: Any) -> dict[str, Any]:
    """The record of a trained model: id, status, parent, description, metrics, cost, weights."""
    return {"id": arch_id, "status": "ok", "parent": parent, "desc": dict(desc), "metrics": _metrics(perf),
            "params": perf["params"], "gflops": perf["gflops"], "weights": str(weights), **extra}


def _cleanup(out: Path, arch_id: Any) -> None:
    shutil.rmtree(out / f"train_{arch_id}", ignore_errors=True)


# ----------------------------------------------------------------------------- fine_tune

def fine_tune(step: StepConfig, data: CocoSource, out_dir: str | Path, *, device: str | None = None,
              progress: bool = False, resume: bool = False) -> dict[str, Any]:
    """Build the seed (:func:`steps.seed_desc`), load (and convert) the step's torchvision
    checkpoint when given, train for the step's epochs (0 = convert and evaluate only). Writes
    candidate 0's files; returns ``{"desc", "model", "metrics", "record"}``."""
    out = Path(out_dir)
    done = _finished(out, 0, resume)
    if done is not None:
        return done
    init = None
    if step.pretrained_model_file:
        raw = load_checkpoint(local_path(step.pretrained_model_file))
        init = convert_torchvision(raw) if step.convert_pretrained else unwrap_state_dict(raw)
        log.info("fine_tune: starting from %s%s", step.pretrained_model_file,
                 " (converted from torchvision)" if step.convert_pretrained else "")
    perf = train_architecture(steps.seed_desc(step), data, out, step.trainer, arch_id=0, init=init, device=device,
                              progress=progress)
    _cleanup(out, 0)
    record = _record(0, perf, read_json(out / "desc_0.json"), out / "model_0.pth", None,
                     inherited=perf["init"]["loaded"], fresh=perf["init"]["fresh"])
    write_output_csv(out, [record])
    result = {"desc": str(out / "desc_0.json"), "model": str(out / "model_0.pth"), "metrics": record["metrics"],
              "record": record}
    atomic_write_json(_result_file(out, 0), result)
    return result


# ----------------------------------------------------------------------------- search

def search_init(step: StepConfig, seeds: Sequence[Mapping[str, Any]], out_dir: str | Path) -> str:
    """Start the step's search (SpNasS or SpNasP) from ``seeds`` (``[{"desc", "metrics",
    "weights"}]``) and write ``state.json``; returns its path. A parallel search's neck codes
    (:func:`steps.neck_codes`) replace the seeds' all-zero codes: each seed's weights are
    inherited onto every code (new connections start at zero: same function, same metrics)."""
    settings = SearchSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in step.search.items()})
    seeds = [dict(x) for x in seeds]
    codes = steps.neck_codes(step)
    if codes:
        expanded = []
        for seed in seeds:
            for code in codes:
                d = normalize_desc(seed["desc"])
                d["neck"]["code"] = list(code)
                d = normalize_desc(d)
                if d != normalize_desc(seed["desc"]):
                    state, _ = inherit_weights(seed["desc"], load_checkpoint(local_path(seed["weights"])), d)
                    weights = Path(out_dir) / f"seed_{len(expanded)}.pth"
                    save_checkpoint(weights, state)
                    expanded.append({**seed, "desc": d, "weights": str(weights)})
                else:
                    expanded.append({**seed, "desc": d})
        seeds = expanded
        log.info("%s starts from the neck codes of the search space: %s", step.name, list(codes))
    path = Path(out_dir) / STATE_FILE
    atomic_write_json(path, new_state(settings, seeds))
    return str(path)


def train_candidate(candidate: Candidate, step: StepConfig, data: CocoSource, out_dir: str | Path, *,
                    device: str | None = None, progress: bool = False, resume: bool = False) -> Result:
    """Inherit the parent's weights, train with the step's trainer, evaluate. Never raises for a
    bad candidate: the failure comes back as ``{"status": "failed", "error": ...}`` so a round
    goes on. The result is also saved as ``result_<id>.json``; ``resume`` reuses it.
    ``freeze_swap_keys`` trains only the tensors that were not inherited."""
    cid = candidate["id"]
    out = Path(out_dir)
    done = _finished(out, cid, resume)
    if done is not None:
        return done
    t0 = time.perf_counter()
    result: dict[str, Any] = {"id": cid, "status": "failed", "metrics": None, "error": None, "weights": None,
                              "inherited": None, "fresh": None}
    try:
        parent_state = load_checkpoint(local_path(candidate["parent_weights"]))
        cfg = step.trainer
        state, report = inherit_weights(candidate["parent_desc"], parent_state, candidate["desc"],
                                        seed=cfg.seed + int(cid))
        result["inherited"], result["fresh"] = len(report["inherited"]), len(report["fresh"])
        trainable = None
        if step.freeze_swap_keys:
            fresh = set(report["fresh"])
            trainable = fresh.__contains__  # only what was not inherited trains
        perf = train_architecture(candidate["desc"], data, out, cfg, arch_id=cid, init=state, device=device,
                                  progress=progress, trainable=trainable)
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
    return result  # type: ignore[return-value]


# ----------------------------------------------------------------------------- reignition / full train

def _each_model(models: Sequence[Mapping[str, Any]], out: Path, resume: bool,
                work: Callable[[Mapping[str, Any]], dict[str, Any]]) -> list[dict[str, Any]]:
    """``work(model) -> record`` for each model (a finished one's saved record reused when
    resuming), each record saved as ``result_<id>.json``, all of them in ``output.csv``."""
    done = []
    for m in models:
        saved = _finished(out, m["id"], resume)
        if saved is None:
            saved = work(m)
            atomic_write_json(_result_file(out, m["id"]), saved)
        done.append(saved)
    write_output_csv(out, done)
    return done


def _map(metrics: Mapping[str, Any]) -> float:
    """A metrics dict's mAP, None (undefined) counting as -1."""
    value = metrics.get("mAP")
    return -1.0 if value is None else float(value)


def reignition(models: Sequence[Mapping[str, Any]], step: StepConfig, out_dir: str | Path, *,
               detection: CocoSource, seed: int, device: str | None = None, progress: bool = False,
               resume: bool = False) -> list[dict[str, Any]]:
    """Reignite each model and keep the better of before/after on validation mAP.

    ``models`` are records ``{"id", "desc", "weights"}``. For each, the detector is evaluated
    as it comes ("before"), then its backbone is re-trained as a classifier (the step's
    ``Imagenet`` folder, or object crops of ``detection``), put back, its BN statistics
    recalibrated on ``detection`` (and its FPN + heads fine-tuned when the step asks), and
    evaluated again ("after"), both with the same evaluation. ``model_<id>.pth`` is the kept
    one (after, unless its mAP is lower than before's; the re-trained weights are then kept as
    ``reignited_<id>.pth``). Returns records whose metrics and weights are the kept model's;
    ``record["reignition"]`` holds the classification figures, ``before``/``after`` metrics,
    ``kept`` (``"after"``/``"before"``) and ``reason``."""
    out = Path(out_dir)
    settings = steps.reignition_settings(step, seed)
    folder = steps.classification_folder(step)

    def work(m: Mapping[str, Any]) -> dict[str, Any]:
        arch_id, weights_in = m["id"], local_path(m["weights"])
        before = evaluate_architecture(m["desc"], weights_in, detection, device=device)
        perf = reignite(m["desc"], weights_in, out, settings, folder=local_path(folder) if folder else None,
                        detection=detection, arch_id=arch_id, device=device, progress=progress)
        weights = out / f"model_{arch_id}.pth"
        after = evaluate_architecture(m["desc"], weights, detection, device=device)
        adapted = f"BN recalibrated on {perf['recalibrated']} image(s), {perf['head_iters']} head iteration(s)"
        if _map(after) >= _map(before):
            kept, reason = "after", f"mAP after reignition {_map(after):.2f} >= {_map(before):.2f} before ({adapted})"
        else:
            kept, reason = "before", f"mAP after reignition {_map(after):.2f} < {_map(before):.2f} before ({adapted})"
            (out / f"reignited_{arch_id}.pth").unlink(missing_ok=True)
            weights.rename(out / f"reignited_{arch_id}.pth")
            atomic_write_bytes(weights, Path(weights_in).read_bytes())
        log.info("reignition of %s: kept the model %s reignition: %s", arch_id, kept, reason)
        metrics = after if kept == "after" else before
        choice = {"before": {k: before.get(k) for k in METRIC_NAMES}, "after": {k: after.get(k) for k in METRIC_NAMES},
                  "kept": kept, "reason": reason}
        atomic_write_json(out / f"performance_{arch_id}.json", {**perf, **metrics, **choice})
        return _record(arch_id, metrics, normalize_desc(m["desc"]), weights, arch_id, reignition={**perf, **choice})
    return _each_model(models, out, resume, work)


def full_train(models: Sequence[Mapping[str, Any]], step: StepConfig, data: CocoSource, out_dir: str | Path, *,
               device: str | None = None, progress: bool = False, resume: bool = False) -> list[dict[str, Any]]:
    """Train each model with the step's (full) schedule from its own weights and evaluate."""
    out = Path(out_dir)

    def work(m: Mapping[str, Any]) -> dict[str, Any]:
        perf = train_architecture(m["desc"], data, out, step.trainer, arch_id=m["id"], init=local_path(m["weights"]),
                                  device=device, progress=progress)
        _cleanup(out, m["id"])
        return _record(m["id"], perf, read_json(out / f"desc_{m['id']}.json"), out / f"model_{m['id']}.pth", m["id"])
    return _each_model(models, out, resume, work)
