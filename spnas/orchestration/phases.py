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
from ..models.encoding import looks_like_arch
from ..models.inherit import align_blocks, inherit_weights, swap_trainable
from ..search import SearchSettings, new_state
from ..search.records import Candidate, Result
from ..search.settings import quality, quality_key
from ..storage import local_path
from ..training.architecture import evaluate_architecture, train_architecture
from ..training.evaluation import METRIC_NAMES, SEGM_METRIC_NAMES, SEMANTIC_METRIC_NAMES
from ..training.reignite import reignite
from ..training.schedule import TrainConfig
from ..utils.errors import ConfigError, InheritanceError, NonFiniteLossError, PhaseError, SpnasError
from ..utils.faults import failpoint
from ..utils.fileio import atomic_write_bytes, atomic_write_json, read_json
from . import steps
from .reports import write_output_csv
from .rounds import STATE_FILE

log = logging.getLogger(__name__)

#: What a record's ``metrics`` hold: the COCO box metrics and the model's cost.
RECORD_METRICS = (*METRIC_NAMES, "params", "gflops", "backbone_latency")


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
    """A record's metrics: the box metrics and costs, and a Mask R-CNN's mask metrics when
    measured (a Faster R-CNN's records carry no ``segm_*`` keys); a semantic model's (``mIoU``
    in ``perf``) are its semantic metrics (per-class IoU included) and costs, no box metrics."""
    if "mIoU" in perf and "mAP" not in perf:
        return {k: perf.get(k) for k in (*SEMANTIC_METRIC_NAMES, "IoU_per_class", *RECORD_METRICS[len(METRIC_NAMES):])}
    return {**{k: perf.get(k) for k in RECORD_METRICS}, **{k: perf[k] for k in SEGM_METRIC_NAMES if k in perf}}


def _record(arch_id: Any, perf: Mapping[str, Any], desc: Mapping[str, Any], weights: Path, parent: Any,
            **extra: Any) -> dict[str, Any]:
    """The record of a trained model: id, status, parent, description, metrics, cost, weights,
    and what its training cost (``iters``, ``images``, ``seconds``, its processes
    ``world_size`` and ``global_batch``; None when it did not train)."""
    return {"id": arch_id, "status": "ok", "parent": parent, "desc": dict(desc), "metrics": _metrics(perf),
            "params": perf["params"], "gflops": perf["gflops"], "weights": str(weights), "iters": perf.get("iters"),
            "images": perf.get("images"), "seconds": perf.get("train_seconds"),
            "world_size": perf.get("world_size"), "global_batch": perf.get("global_batch"), **extra}


def _cleanup(out: Path, arch_id: Any) -> None:
    shutil.rmtree(out / f"train_{arch_id}", ignore_errors=True)


# ----------------------------------------------------------------------------- fine_tune

def fine_tune(step: StepConfig, data: CocoSource, out_dir: str | Path, *, device: str | None = None,
              progress: bool = False, resume: bool = False, nproc: int = 1) -> dict[str, Any]:
    """Build the seed (:func:`steps.seed_desc`), load (and convert) the step's torchvision
    checkpoint when given, train for the step's epochs (0 = convert and evaluate only; ``nproc``
    data-parallel processes). Writes candidate 0's files; returns ``{"desc", "model", "metrics", "record"}``."""
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
                              progress=progress, nproc=nproc)
    _cleanup(out, 0)
    record = _record(0, perf, read_json(out / "desc_0.json"), out / "model_0.pth", None,
                     inherited=perf["init"]["loaded"], fresh=perf["init"]["fresh"], lineage_iters=0)
    write_output_csv(out, [record])
    result = {"desc": str(out / "desc_0.json"), "model": str(out / "model_0.pth"), "metrics": record["metrics"],
              "record": record}
    atomic_write_json(_result_file(out, 0), result)
    return result


# ----------------------------------------------------------------------------- search

def _with_code(step: StepConfig, desc: Mapping[str, Any], part: str, code: Any) -> dict[str, Any]:
    """``desc`` with its ``part`` (backbone or neck) code replaced by ``code``, normalised; a
    code the description cannot take raises :class:`ConfigError` naming it."""
    d = normalize_desc(desc)
    seed_code = d["backbone"]["code"]
    d[part]["code"] = list(code) if part == "neck" else code
    if part == "backbone":
        if looks_like_arch(code):  # Vega's one-string form names the block and the neck code too
            d["backbone"].pop("block")
            d["neck"].pop("code")
        elif not any(d["neck"]["code"]):  # a plain neck: as many zeros as the code has stages
            d["neck"].pop("code")
    try:
        return normalize_desc(d)
    except SpnasError as exc:
        raise ConfigError(f"config key {step.name}.search_space: code {code!r} does not fit the seed "
                          f"{seed_code!r}: {exc}") from None


def check_seed_codes(step: StepConfig, seed_descs: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`ConfigError` naming the first code of a serial step's search space that
    cannot be derived by inheritance (expand, swap, add-stage; same block type and width) from
    one of ``seed_descs``. Needs descriptions only: ``spnas run`` calls it before any training."""
    part, codes = steps.seed_codes(step)
    if part != "backbone":
        return
    for seed in seed_descs:
        parent = normalize_desc(seed)
        for code in codes:
            child = _with_code(step, parent, part, code)
            try:
                for key in ("block", "base_channels"):
                    if parent["backbone"][key] != child["backbone"][key]:
                        raise InheritanceError(f"its backbone.{key} is {child['backbone'][key]!r}, the seed's "
                                               f"{parent['backbone'][key]!r}")
                align_blocks(parent["backbone"]["code"], child["backbone"]["code"])
            except InheritanceError as exc:
                raise ConfigError(f"config key {step.name}.search_space: code {code!r} cannot be derived from the "
                                  f"fine-tuned network {parent['backbone']['code']!r}: {exc}") from None


def search_init(step: StepConfig, seeds: Sequence[Mapping[str, Any]], out_dir: str | Path, *,
                data: CocoSource | None = None, device: str | None = None) -> str:
    """Start the step's search (SpNasS or SpNasP) from ``seeds`` (``[{"desc", "metrics",
    "weights"}]``) and write ``state.json``; returns its path.

    The codes of the step's search space (:func:`steps.seed_codes`) replace the seeds' own, each
    code a seed per incoming seed, in the order seeds x codes:

    * a parallel search's neck codes: the seed's weights are inherited onto every code (new
      connections start at zero: same function, same metrics);
    * a serial search's backbone codes: the seed's own code is the seed itself; every other code
      is derived from the seed's weights by inheritance and evaluated on ``data`` (its network
      computes something else, so it gets its own metrics). All codes are checked first
      (:func:`check_seed_codes`): one that cannot be derived raises :class:`ConfigError` naming it
      before any work."""
    settings = SearchSettings(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in step.search.items()})
    seeds = [dict(x) for x in seeds]
    part, codes = steps.seed_codes(step)
    out = Path(out_dir)
    if codes:
        check_seed_codes(step, [x["desc"] for x in seeds])
        expanded = []
        for seed in seeds:
            for code in codes:
                d = _with_code(step, seed["desc"], part, code)
                if d == normalize_desc(seed["desc"]):
                    expanded.append({**seed, "desc": d})
                    continue
                state, _ = inherit_weights(seed["desc"], load_checkpoint(local_path(seed["weights"])), d)
                weights = out / f"seed_{len(expanded)}.pth"
                save_checkpoint(weights, state)
                metrics = seed["metrics"]
                if part == "backbone":
                    if data is None:
                        raise PhaseError(f"{step.name}: the seed derived for code {code!r} must be evaluated, and no "
                                         "data set was given")
                    metrics = _metrics(evaluate_architecture(d, weights, data, device=device,
                                                             batch_size=step.trainer.batch_size))
                    q = quality_key(metrics, settings.objective_keys)
                    log.info("%s: seed %d (code %s) derived from %s: %s %.2f", step.name, len(expanded), code,
                             normalize_desc(seed["desc"])["backbone"]["code"], q, metrics.get(q) or 0)
                expanded.append({**seed, "desc": d, "weights": str(weights), "metrics": metrics})
        seeds = expanded
        log.info("%s starts from the %s codes of the search space: %s", step.name, part, list(codes))
    path = out / STATE_FILE
    atomic_write_json(path, new_state(settings, seeds))
    return str(path)


def train_candidate(candidate: Candidate, step: StepConfig, data: CocoSource, out_dir: str | Path, *,
                    device: str | None = None, progress: bool = False, resume: bool = False,
                    nproc: int = 1) -> Result:
    """Inherit the parent's weights, train with the step's trainer, evaluate. Never raises for a
    bad candidate: the failure comes back as ``{"status": "failed", "error": ...}`` so a round
    goes on. The result is also saved as ``result_<id>.json``; ``resume`` reuses it.
    ``freeze_swap_keys`` trains what the mutation touched (:func:`~spnas.models.inherit.swap_trainable`);
    the result's ``trainable`` counts the parameter elements that trained. ``nproc``: processes
    of a data-parallel training (one per GPU of a pod)."""
    cid = candidate["id"]
    out = Path(out_dir)
    done = _finished(out, cid, resume)
    if done is not None:
        return done
    t0 = time.perf_counter()
    result: dict[str, Any] = {"id": cid, "status": "failed", "metrics": None, "error": None, "weights": None,
                              "inherited": None, "fresh": None, "trainable": None}
    try:
        parent_state = load_checkpoint(local_path(candidate["parent_weights"]))
        cfg = step.trainer
        state, report = inherit_weights(candidate["parent_desc"], parent_state, candidate["desc"],
                                        seed=cfg.seed + int(cid))
        result["inherited"], result["fresh"] = len(report["inherited"]), len(report["fresh"])
        trainable = None
        if step.freeze_swap_keys:
            trainable = swap_trainable(candidate["parent_desc"], candidate["desc"], report)
        perf = train_architecture(candidate["desc"], data, out, cfg, arch_id=cid, init=state, device=device,
                                  progress=progress, trainable=trainable, nproc=nproc)
        atomic_write_json(out / f"inherit_{cid}.json", report)
        _cleanup(out, cid)
        result.update(status="ok", metrics=_metrics(perf), weights=str(out / f"model_{cid}.pth"), iters=perf["iters"],
                      images=perf["images"], trainable=perf["trainable"])
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


def _map(metrics: Mapping[str, Any], objectives: Sequence[str] = ()) -> float:
    """A metrics dict's quality (:func:`quality`: the first maximised of the run's ``objectives``;
    without them box mAP, a semantic model's mIoU), None (undefined) counting as -1."""
    value = quality(metrics, objectives)
    return -1.0 if value is None else float(value)


def reignition(models: Sequence[Mapping[str, Any]], step: StepConfig, out_dir: str | Path, *,
               detection: CocoSource, seed: int, device: str | None = None, progress: bool = False,
               resume: bool = False, nproc: int = 1, objectives: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Reignite each model and keep the better of before/after on validation quality (the first
    maximised of the run's ``objectives``: :func:`quality`; box mAP without them).

    ``models`` are records ``{"id", "desc", "weights"}``. For each, the detector is evaluated
    as it comes ("before"), then its backbone is re-trained as a classifier (the step's
    ``Imagenet`` folder, or object crops of ``detection``), put back, its BN statistics
    recalibrated on ``detection`` (and its FPN + heads fine-tuned when the step asks), and
    evaluated again ("after"), both with the same evaluation. ``model_<id>.pth`` is the kept
    one (after, unless its mAP is lower than before's; the re-trained weights are then kept as
    ``reignited_<id>.pth``). Returns records whose metrics and weights are the kept model's;
    ``record["reignition"]`` holds the classification figures, ``before``/``after`` metrics,
    ``kept`` (``"after"``/``"before"``) and ``reason``. ``nproc``: processes of each
    (data-parallel) reignition."""
    out = Path(out_dir)
    settings = steps.reignition_settings(step, seed)
    folder = steps.classification_folder(step)

    def work(m: Mapping[str, Any]) -> dict[str, Any]:
        arch_id, weights_in = m["id"], local_path(m["weights"])
        before = evaluate_architecture(m["desc"], weights_in, detection, device=device)
        weights = out / f"model_{arch_id}.pth"
        after = None
        try:
            perf = reignite(m["desc"], weights_in, out, settings, folder=local_path(folder) if folder else None,
                            detection=detection, arch_id=arch_id, device=device, progress=progress, nproc=nproc)
        except NonFiniteLossError as exc:  # a diverged classifier: the model goes on as it came
            log.warning("reignition of %s diverged (%s): kept the model before reignition", arch_id, exc)
            perf = {"error": str(exc), "recalibrated": 0, "head_iters": 0}
            kept, reason = "before", f"reignition diverged ({exc}); the model is kept as it was"
        else:
            after = evaluate_architecture(m["desc"], weights, detection, device=device)
            adapted = f"BN recalibrated on {perf['recalibrated']} image(s), {perf['head_iters']} head iteration(s)"
            kept = "after" if _map(after, objectives) >= _map(before, objectives) else "before"
            reason = (f"{quality_key(after, objectives)} after reignition {_map(after, objectives):.2f} "
                      f"{'>=' if kept == 'after' else '<'} {_map(before, objectives):.2f} before ({adapted})")
        if kept == "before":
            if after is not None:  # the re-trained weights that lost are kept aside
                (out / f"reignited_{arch_id}.pth").unlink(missing_ok=True)
                weights.rename(out / f"reignited_{arch_id}.pth")
            atomic_write_bytes(weights, Path(weights_in).read_bytes())
        log.info("reignition of %s: kept the model %s reignition: %s", arch_id, kept, reason)
        metrics = after if kept == "after" else before
        shown = [k for k in (*METRIC_NAMES, *SEGM_METRIC_NAMES[:2], *SEMANTIC_METRIC_NAMES[:2]) if k in before]
        choice = {"before": {k: before.get(k) for k in shown},
                  "after": None if after is None else {k: after.get(k) for k in shown}, "kept": kept,
                  "reason": reason}
        atomic_write_json(out / f"performance_{arch_id}.json", {**perf, **metrics, **choice})
        # the classifier's training is counted apart, not in the detector's lineage; a kept head
        # fine-tune trained the detector and is
        heads = perf["head_iters"] if kept == "after" else 0
        lineage = m.get("lineage_iters")
        return {**_record(arch_id, metrics, normalize_desc(m["desc"]), weights, arch_id, reignition={**perf, **choice}),
                "iters": heads or None, "images": None, "seconds": None,
                "lineage_iters": None if lineage is None else lineage + heads}
    return _each_model(models, out, resume, work)


def full_train(models: Sequence[Mapping[str, Any]], step: StepConfig, data: CocoSource, out_dir: str | Path, *,
               device: str | None = None, progress: bool = False, resume: bool = False,
               nproc: int = 1) -> list[dict[str, Any]]:
    """Train each model with the step's (full) schedule from its own weights (``nproc``
    data-parallel processes) and evaluate."""
    out = Path(out_dir)

    def work(m: Mapping[str, Any]) -> dict[str, Any]:
        perf = train_architecture(m["desc"], data, out, step.trainer, arch_id=m["id"], init=local_path(m["weights"]),
                                  device=device, progress=progress, nproc=nproc)
        _cleanup(out, m["id"])
        return _record(m["id"], perf, read_json(out / f"desc_{m['id']}.json"), out / f"model_{m['id']}.pth", m["id"],
                       lineage_iters=(m.get("lineage_iters") or 0) + perf["iters"])
    return _each_model(models, out, resume, work)


# ----------------------------------------------------------------------------- equal-budget controls

def control(name: str, desc: Mapping[str, Any], weights: str, trainers: Sequence[TrainConfig], data: CocoSource,
            out_dir: str | Path, *, base_lineage: int = 0, device: str | None = None, progress: bool = False,
            resume: bool = False, nproc: int = 1) -> dict[str, Any]:
    """An equal-budget control: ``desc`` trained from ``weights`` with each schedule of
    ``trainers`` in turn (a chain, each from the previous one's weights), as the searched model's
    lineage was. Files go to ``out_dir`` as ``<name>_<g>`` (g = 0, 1, ...), each resumable; the
    record (id ``name``) has the final model's metrics and weights and the whole chain's
    ``iters``/``images``/``seconds``; ``lineage_iters`` adds them to ``base_lineage``. ``nproc``:
    processes of each data-parallel training."""
    out = Path(out_dir)
    init, perfs, final_id = local_path(weights), [], None
    for g, cfg in enumerate(trainers):
        final_id = f"{name}_{g}"
        saved = _finished(out, final_id, resume)
        if saved is None:
            perf = train_architecture(desc, data, out, cfg, arch_id=final_id, init=init, device=device, progress=progress,
                                      nproc=nproc)
            _cleanup(out, final_id)
            saved = {**_metrics(perf), **{k: perf.get(k) for k in ("iters", "images", "train_seconds", "world_size",
                                                                 "global_batch")}}
            atomic_write_json(_result_file(out, final_id), saved)
        perfs.append(saved)
        init = out / f"model_{final_id}.pth"
    if not perfs:
        raise PhaseError(f"control {name}: no training to do (an empty schedule chain)")
    total = {k: sum(p[k] or 0 for p in perfs) for k in ("iters", "images")}
    rec = _record(name, perfs[-1], read_json(out / f"desc_{final_id}.json"), init, None, control=True,
                  lineage_iters=base_lineage + total["iters"])
    rec.update(iters=total["iters"], images=total["images"], seconds=round(sum(p["train_seconds"] or 0 for p in perfs), 2),
               generations=len(perfs))
    atomic_write_json(out / f"{name}.json", rec)
    return rec


def measure_costs(record: Mapping[str, Any], size: int, batch: int, device: str | None = None) -> dict[str, Any]:
    """``record`` with ``latency`` (end-to-end ms at ``size``, measured now, in isolation, on
    ``device``, CPU by default) and ``memory`` (estimated training MiB at ``batch`` images)."""
    from ..models.cost import detector_latency_ms, train_memory_mb
    return {**record, "latency": detector_latency_ms(record["desc"], size, device or "cpu"),
            "memory": train_memory_mb(record["desc"], size, batch)}
