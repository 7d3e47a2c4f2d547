"""The one step-to-phase mapping: what each config step hands to its phase function.

``spnas run`` (:mod:`.local`) and the Kubeflow pod functions (:mod:`.pods`) both ask this module
which description a fine_tune starts from, which seeds a search starts from, which models a
reignition or a full train takes, with which settings, and when a search round must stop. So the
two orchestrators cannot drift. No torch here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..config.types import RunConfig, StepConfig
from ..data.source import CocoSource
from ..training.schedule import ReignitionSettings
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
    """The seeds a search starts from: the previous phase's records, reduced to what a seed is."""
    return [{"desc": r["desc"], "metrics": r["metrics"], "weights": r["weights"]} for r in records]


def neck_codes(step: StepConfig) -> tuple:
    """Parallel search: the search space's neck codes the seeds are expanded to (else none)."""
    return tuple(step.codes) if step.role == "parallel" else ()


def by_map(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records from the highest mAP down (ties keep their order; a missing mAP counts as 0)."""
    return sorted((dict(r) for r in records), key=lambda r: -((r.get("metrics") or {}).get("mAP") or 0))


def reignition_choice(step: StepConfig, front: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The models a reignition re-trains: the front's ``top_k`` by mAP (all when unset); None
    when ``top_k`` is 0 (reignition off: the front passes on unchanged)."""
    if step.top_k == 0:
        return None
    ranked = by_map(front)
    return ranked[:step.top_k] if step.top_k else ranked


def full_train_choice(step: StepConfig, front: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The models a full train trains: the front's ``top_k`` (default 1) by mAP."""
    return by_map(front)[:step.top_k or 1]


def reignition_settings(step: StepConfig, seed: int) -> ReignitionSettings:
    """How the step re-trains a backbone: its trainer's epochs and lr, a classification batch of
    at least :data:`MIN_REIGNITION_BATCH`, its input size (None: the source's default), the
    run's seed; then BN recalibration on its ``recalibrate_images`` and ``head_iters`` of head
    fine-tune, both in batches of the trainer's (detection) batch size."""
    return ReignitionSettings(epochs=step.trainer.epochs, batch_size=max(step.trainer.batch_size, MIN_REIGNITION_BATCH),
                              lr=step.trainer.lr, image_size=step.image_size, seed=seed,
                              recalibrate_images=step.recalibrate_images, head_iters=step.head_iters,
                              detection_batch_size=step.trainer.batch_size)


def classification_folder(step: StepConfig) -> str | None:
    """The step's folder-per-class set (an ``Imagenet`` dataset), or None (object crops are cut
    from the detection set instead)."""
    return step.dataset.data_root if step.dataset.kind == "imagenet" and step.dataset.data_root else None


def best_of(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ok record with the highest mAP (the run's result), or None."""
    ok = [r for r in records if r.get("status") == "ok"]
    return by_map(ok)[0] if ok else None


def check_round(step_name: str, round_no: Any, results: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`PhaseError` listing every failure when no candidate of a round succeeded
    (a search cannot go on from nothing); one success is enough to go on."""
    if results and all(r.get("status") != "ok" for r in results):
        raise PhaseError(f"{step_name} round {round_no}: every candidate failed: "
                         + "; ".join(f"candidate {r.get('id')}: {r.get('error')}" for r in results))
