"""The one step-to-phase mapping: what each config step hands to its phase function.

``spnas run`` (:mod:`.local`) and the Kubeflow pod functions (:mod:`.pods`) both ask this module
which description a fine_tune starts from, which seeds a search starts from (and the search
space codes they are expanded to), which models a reignition or a full train takes, with which
settings, and when a search round must stop. So the two orchestrators cannot drift. No torch here.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..config.types import RunConfig, StepConfig
from ..data.source import CocoSource
from ..training.schedule import ReignitionSettings, TrainConfig
from ..utils.errors import ConfigError, PhaseError

#: Smallest classification batch of a reignition (its trainer's detection batch is usually tiny).
MIN_REIGNITION_BATCH = 16


def data_source(step: StepConfig, root: str | None = None) -> CocoSource:
    """The step's detection data; ``root`` (a pipeline's ``data_uri``) replaces its ``data_root``."""
    root = root or step.dataset.data_root
    if not root:
        raise ConfigError(f"config key {step.name}.dataset.common.data_root: is not set")
    return CocoSource(root, step.dataset.img_prefix, step.dataset.ann_prefix)


def detection_source(config: RunConfig, step: StepConfig, root: str | None = None) -> CocoSource:
    """The detection data of a step that may itself read another kind (reignition): the
    fine_tune step's data set, else the step's own."""
    ft = config.step("fine_tune")
    base = ft if ft is not None and (root or ft.dataset.data_root) else step
    return data_source(base, root)


def seed_desc(step: StepConfig) -> dict[str, Any]:
    """fine_tune's description: the step's ``model_desc``, its serial code replaced by the first
    code of the step's search space when one is given."""
    desc = dict(step.model_desc)
    if step.codes:
        desc["backbone"] = {**desc.get("backbone", {}), "code": step.codes[0]}
    return desc


def search_seeds(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The seeds a search starts from: the previous phase's records, reduced to what a seed is
    (its lineage included: the equal-budget controls count every iteration since fine_tune)."""
    return [{"desc": r["desc"], "metrics": r["metrics"], "weights": r["weights"],
             "lineage_iters": r.get("lineage_iters") or 0} for r in records]


def seed_codes(step: StepConfig) -> tuple[str, tuple]:
    """The codes of a search step's search space that its seeds are expanded to, each code one
    seed per incoming seed: ``("backbone", codes)`` for a serial search, ``("neck", codes)`` for
    a parallel one, ``("", ())`` when the step names none (the seeds pass as they are)."""
    if step.codes and step.role == "serial":
        return "backbone", tuple(step.codes)
    if step.codes and step.role == "parallel":
        return "neck", tuple(step.codes)
    return "", ()


def neck_codes(step: StepConfig) -> tuple:
    """Parallel search: the search space's neck codes the seeds are expanded to (else none)."""
    part, codes = seed_codes(step)
    return codes if part == "neck" else ()


def by_map(records: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records from the highest quality down: the first maximised of the run's ``objectives``
    (:func:`~spnas.search.settings.quality`; without them box mAP, a semantic model's mIoU); ties
    keep their order; a missing value counts as 0."""
    from ..search.settings import quality
    return sorted((dict(r) for r in records), key=lambda r: -(quality(r.get("metrics"), objectives) or 0))


def reignition_choice(step: StepConfig, front: Sequence[Mapping[str, Any]],
                      objectives: Sequence[str] = ()) -> list[dict[str, Any]] | None:
    """The models a reignition re-trains: the front's ``top_k`` by quality (:func:`by_map`; all
    when unset); None when ``top_k`` is 0 (reignition off: the front passes on unchanged)."""
    if step.top_k == 0:
        return None
    ranked = by_map(front, objectives)
    return ranked[:step.top_k] if step.top_k else ranked


def full_train_choice(step: StepConfig, front: Sequence[Mapping[str, Any]],
                      objectives: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The models a full train trains: the front's ``top_k`` (default 1) by quality (:func:`by_map`)."""
    return by_map(front, objectives)[:step.top_k or 1]


def reignition_settings(step: StepConfig, seed: int) -> ReignitionSettings:
    """How the step re-trains a backbone: its trainer's epochs and lr, a classification batch of
    at least :data:`MIN_REIGNITION_BATCH`, its input size (None: the source's default), the
    run's seed; then BN recalibration on its ``recalibrate_images`` and ``head_iters`` of head
    fine-tune, both in batches of the trainer's (detection) batch size. The trainer's
    ``clip_grad_norm`` when set, else :class:`ReignitionSettings`' default (2.0)."""
    return ReignitionSettings(epochs=step.trainer.epochs, batch_size=max(step.trainer.batch_size, MIN_REIGNITION_BATCH),
                              lr=step.trainer.lr, image_size=step.image_size, seed=seed,
                              recalibrate_images=step.recalibrate_images, head_iters=step.head_iters,
                              detection_batch_size=step.trainer.batch_size,
                              clip_grad_norm=step.trainer.clip_grad_norm or ReignitionSettings.clip_grad_norm)


def inner_reignition_step(config: RunConfig, search_step: StepConfig) -> StepConfig:
    """The settings a reignition inside the serial search (the plateau trigger) uses: the config's
    reignition step when it has one, else one epoch at lr 0.01 on object crops of the detection
    set, over the whole front."""
    step = config.step("reignition")
    if step is not None:
        return step
    trainer = TrainConfig(epochs=1, batch_size=search_step.trainer.batch_size, lr=0.01, seed=config.seed)
    return dataclasses.replace(search_step, name=f"{search_step.name}_reignition", role="reignition", trainer=trainer,
                               search=None, top_k=None)


def classification_folder(step: StepConfig) -> str | None:
    """The step's folder-per-class set (an ``Imagenet`` dataset), or None (object crops are cut
    from the detection set instead)."""
    return step.dataset.data_root if step.dataset.kind == "imagenet" and step.dataset.data_root else None


def best_of(records: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ()) -> dict[str, Any] | None:
    """The ok record with the highest quality (:func:`by_map`; the run's result), or None. A seed
    whose refresh was recorded (``refresh_seeds``: :func:`~spnas.search.state.superseded`) does
    not count."""
    from ..search.state import superseded
    gone = superseded(records)
    ok = [r for r in records if r.get("status") == "ok" and r.get("id") not in gone]
    return by_map(ok, objectives)[0] if ok else None


def check_round(step_name: str, round_no: Any, results: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`PhaseError` listing every failure when no candidate of a round succeeded
    (a search cannot go on from nothing); one success is enough to go on."""
    if results and all(r.get("status") != "ok" for r in results):
        raise PhaseError(f"{step_name} round {round_no}: every candidate failed: "
                         + "; ".join(f"candidate {r.get('id')}: {r.get('error')}" for r in results))


# ----------------------------------------------------------------------------- equal-budget controls

def phase_control_plan(records: Sequence[Mapping[str, Any]], objectives: Sequence[str] = ()) -> dict[str, Any] | None:
    """What a search phase's equal-budget control trains: the phase's best candidate (by quality:
    :func:`by_map`), the seed its lineage starts from, and the generations of training along that
    lineage inside the phase (each one schedule of the step's trainer). None when no candidate
    succeeded.

    Returns ``{"best", "seed", "generations", "iters"}``; ``iters`` = the best's lineage
    iterations minus the seed's (what the control must receive)."""
    by_id = {r["id"]: r for r in records}
    ok = [r for r in records if r.get("status") == "ok" and r.get("round", -1) >= 0]
    if not ok:
        return None
    best = by_map(ok, objectives)[0]
    node, generations = best, 0
    while node.get("parent") is not None and node.get("round", -1) >= 0:
        generations += 1
        node = by_id[node["parent"]]
    iters = None
    if best.get("lineage_iters") is not None and node.get("lineage_iters") is not None:
        iters = best["lineage_iters"] - node["lineage_iters"]
    return {"best": dict(best), "seed": dict(node), "generations": generations, "iters": iters}


def seed_architecture(fine_tuned: Mapping[str, Any]) -> dict[str, Any]:
    """The final control's architecture: fine_tune's description (its code, a plain neck)."""
    desc = json.loads(json.dumps(fine_tuned["desc"]))
    desc["neck"]["code"] = [0] * len(desc["neck"]["code"])
    return desc


def final_control_trainer(full_step: StepConfig, iters: int) -> TrainConfig:
    """The full train's schedule stretched to ``iters`` iterations (warm-up and decay points are
    fractions of the total, so they stretch with it)."""
    return dataclasses.replace(full_step.trainer, iters=int(iters))


def objective_keys(config: RunConfig) -> tuple[str, ...]:
    """The run's objectives: every search step's objective keys, in order, once each."""
    keys: list[str] = []
    for s in config.steps:
        if s.search:
            from ..search.settings import SearchSettings
            keys += [k for k in SearchSettings(**s.search).objective_keys if k not in keys]
    return tuple(keys) or ("mAP", "params")


def winner(searched: Mapping[str, Any], control: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, str]:
    """Which of the searched model and its control is the run's result, and why: the one that
    Pareto-dominates on ``keys`` (mAP, segm_* and mIoU maximised, costs minimised); when neither
    does, the one with the higher quality (the first maximised of ``keys``:
    :func:`~spnas.search.settings.quality_key`), the searched model on a tie. Returns
    ``(winner, reason)``."""
    from ..search.pareto import objective_values
    from ..search.settings import MAXIMISED, MEASURED, quality_key
    q = quality_key(searched.get("metrics"), keys)
    keys = [k for k in keys if (k not in MEASURED and k in (searched.get("metrics") or {})) or k in ("params", "gflops")
            or (k in MEASURED and searched.get(k) is not None)]
    if q not in keys:
        keys = [q, *keys]
    a, b = objective_values(searched, keys), objective_values(control, keys)

    def better(x: Mapping[str, float], y: Mapping[str, float]) -> bool:
        ge = all((x[k] >= y[k]) if k in MAXIMISED else (x[k] <= y[k]) for k in keys)
        return ge and any((x[k] > y[k]) if k in MAXIMISED else (x[k] < y[k]) for k in keys)
    if better(b, a):
        return "control", f"the control dominates on {', '.join(keys)}"
    if better(a, b):
        return "searched", f"the searched model dominates on {', '.join(keys)}"
    if b[q] > a[q]:
        return "control", f"neither dominates on {', '.join(keys)}; the control has the higher {q}"
    return "searched", f"neither dominates on {', '.join(keys)}; the searched model has the higher (or equal) {q}"


def pipeline_shape(config: RunConfig) -> dict[str, Any]:
    """What the Kubeflow pipeline's compiled DAG fixes from the config (its rounds are unrolled,
    its tasks named after the steps), keyed by the config key that sets it. A run whose config
    gives another shape must be refused: the DAG would silently truncate or skip work."""
    shape: dict[str, Any] = {"pipeline": [[s.name, s.role] for s in config.steps], "general.control": config.control}
    for s in config.steps:
        if s.role in ("serial", "parallel"):
            search = s.search or {}
            shape[f"{s.name}.search_algorithm.max_sample"] = search.get("max_sample")
            shape[f"{s.name}.search_algorithm.candidates_per_round"] = search.get("candidates_per_round", 4)
            if s.role == "serial":
                shape[f"{s.name}.search_algorithm.reignition_patience"] = \
                    "set" if search.get("reignition_patience") else "not set"
        if s.role == "reignition":
            shape[f"{s.name}.top_k"] = "0" if s.top_k == 0 else "not 0"
    return shape


def shape_mismatch(compiled: Mapping[str, Any], runtime: Mapping[str, Any]) -> list[str]:
    """One message per key whose run-time value differs from the compiled one."""
    out = []
    for key in sorted(set(compiled) | set(runtime)):
        a, b = runtime.get(key), compiled.get(key)
        if a != b:
            out.append(f"config key {key} is {a!r} at run time but the pipeline was compiled for {b!r}")
    return out
