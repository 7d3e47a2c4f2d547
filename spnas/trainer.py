"""Train and evaluate one architecture end to end (used by ``spnas train``/``evaluate`` and by
the search phases).

Writes SPEC section 5's files for one candidate into ``out_dir``: ``desc_<id>.json`` (the model
description), ``performance_<id>.json`` (metrics, params, GFLOPs, timing) and ``model_<id>.pth``
(the weights with the best validation mAP), all atomically. Training state lives in
``out_dir/train_<id>/`` so an interrupted run resumes.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .data import CocoDetection, load_split
from .detector import build_detector, normalize_desc
from .engine import TrainConfig, evaluate, train
from .errors import SpnasError
from .inherit import convert_resnet, unwrap_state_dict
from .io import CheckpointError, atomic_write_json, check_state_fits, load_checkpoint
from .measure import gflops, latency_ms, params

log = logging.getLogger(__name__)
_PREDICTOR = "roi_heads.box_predictor."


def load_weights(model: nn.Module, desc: Mapping[str, Any], source: "str | os.PathLike | Mapping") -> dict[str, int]:
    """Load a checkpoint into ``model`` (built from ``desc``) and say what was loaded.

    Accepts this project's detector weights, a torchvision ``fasterrcnn_*_fpn`` checkpoint
    (same tensor names) and a torchvision ``resnet*`` classification checkpoint (backbone only,
    the rest stays fresh). When the class count differs, the box predictor stays fresh
    (SPEC 2.1). Anything else raises :class:`CheckpointError` naming the first misfit tensor.
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    raw = load_checkpoint(source) if not isinstance(source, Mapping) else source
    try:
        state = unwrap_state_dict(raw)
    except SpnasError as exc:
        raise CheckpointError(f"weights file {name!r}: {exc}") from None
    if "fc.weight" in state and "conv1.weight" in state and not any(k.startswith("backbone.") for k in state):
        body = convert_resnet(state, desc, prefix="backbone.body.")
        model.load_state_dict(body, strict=False)
        log.info("loaded %d backbone tensors from classification checkpoint %s", len(body), name)
        return {"loaded": len(body), "fresh": len(model.state_dict()) - len(body)}
    expected = model.state_dict()
    state = OrderedDict(state)
    for k, v in expected.items():  # FrozenBatchNorm2d checkpoints have no num_batches_tracked
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v.clone()
    fresh = 0
    pred = [k for k in expected if k.startswith(_PREDICTOR)]
    if all(k in state for k in pred) and any(state[k].shape != expected[k].shape for k in pred):
        log.info("checkpoint %s has %d classes, the dataset %d: the box predictor starts fresh", name,
                 state[_PREDICTOR + "cls_score.weight"].shape[0], expected[_PREDICTOR + "cls_score.weight"].shape[0])
        for k in pred:
            state[k] = expected[k]
        fresh = len(pred)
    check_state_fits(model, state, f"weights file {name!r}")
    model.load_state_dict(state, strict=True)
    return {"loaded": len(expected) - fresh, "fresh": fresh}


def dataset_desc(desc: Mapping[str, Any] | None, train_set: CocoDetection, **overrides: Any) -> dict[str, Any]:
    """``desc`` with the class count of the data set and any non-None ``overrides``."""
    d = normalize_desc(desc)
    if d["num_classes"] != train_set.num_classes and (desc or {}).get("num_classes") is not None:
        log.info("num_classes %d in the description replaced by the data set's %d (%d categories + background)",
                 d["num_classes"], train_set.num_classes, train_set.num_classes - 1)
    d["num_classes"] = train_set.num_classes
    d.update({k: v for k, v in overrides.items() if v is not None})
    return normalize_desc(d)


def model_cost(desc: Mapping[str, Any], device: "str | None" = None) -> dict[str, Any]:
    """``params`` (total count), ``params_k`` (thousands, as Vega reports), ``gflops`` and
    ``latency`` (ms, backbone + FPN, measured on ``device``) at the description's ``max_size``
    (default 800)."""
    from .engine import _device_of
    d = normalize_desc(desc)
    n = params(d)["total"]
    size = int(d.get("max_size", 800))
    return {"params": n, "params_k": round(n / 1e3, 1), "gflops": round(gflops(d, size), 3),
            "latency": latency_ms(d, size, _device_of(device))}


def train_architecture(data_root: "str | os.PathLike", desc: Mapping[str, Any] | None, out_dir: "str | os.PathLike",
                       cfg: TrainConfig, arch_id: "int | str" = 0, init: "str | os.PathLike | Mapping | None" = None,
                       device: Optional[str] = None, resume: bool = True, progress: bool = False,
                       train_set: CocoDetection | None = None, val_set: CocoDetection | None = None,
                       trainable: Optional[Callable[[str], bool]] = None, img_prefix: str = "2017",
                       ann_prefix: str = "instances", **desc_overrides: Any) -> dict[str, Any]:
    """Train ``desc`` on ``data_root`` and write desc/performance/model files; returns the
    performance dict. ``init`` is a weights file (or state dict) to start from."""
    out = Path(out_dir)
    train_set = train_set or load_split(data_root, "train", train=True, seed=cfg.seed,
                                        img_prefix=img_prefix, ann_prefix=ann_prefix)
    val_set = val_set or load_split(data_root, "val", train=False, img_prefix=img_prefix, ann_prefix=ann_prefix)
    d = dataset_desc(desc, train_set, **desc_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_detector(d)
    loaded = load_weights(model, d, init) if init is not None else {"loaded": 0, "fresh": len(model.state_dict())}
    atomic_write_json(out / f"desc_{arch_id}.json", d)
    result = train(model, train_set, val_set, cfg, out / f"train_{arch_id}", device=device, resume=resume,
                   progress=progress, trainable=trainable)
    best_path = out / f"train_{arch_id}" / "best.pth"
    final = result["history"][-1] if result["history"] else None
    if result["best"]["metrics"] is not None and best_path.is_file():
        state, metrics = load_checkpoint(best_path), dict(result["best"]["metrics"])
    else:
        state, metrics = model.state_dict(), dict(final or {})
    metrics.pop("iteration", None)
    from .io import atomic_torch_save
    atomic_torch_save(out / f"model_{arch_id}.pth", {k: v.detach().cpu() for k, v in state.items()})
    perf = {**metrics, **model_cost(d, device), "best_iteration": result["best"]["iteration"], "iters": result["iters"],
            "train_seconds": round(result["seconds"], 2),
            "images_per_second": round(result["images"] / result["seconds"], 2) if result["seconds"] > 0 else None,
            "init": loaded, "history": result["history"]}
    atomic_write_json(out / f"performance_{arch_id}.json", perf)
    log.info("architecture %s: mAP %.2f AP50 %.2f -> %s", arch_id, perf.get("mAP") or 0, perf.get("AP50") or 0, out)
    return perf


def evaluate_architecture(data_root: "str | os.PathLike", desc: Mapping[str, Any], weights: "str | os.PathLike",
                          split: str = "val", device: Optional[str] = None, batch_size: int = 4,
                          progress: bool = False, img_prefix: str = "2017", ann_prefix: str = "instances"
                          ) -> dict[str, Any]:
    """COCO metrics of saved weights on a split of ``data_root`` (plus params and GFLOPs)."""
    ds = load_split(data_root, split, train=False, img_prefix=img_prefix, ann_prefix=ann_prefix)
    d = normalize_desc(desc)
    if d["num_classes"] != ds.num_classes:
        raise SpnasError(f"the description has num_classes {d['num_classes']} but {str(ds.ann_file)!r} has "
                         f"{ds.num_classes - 1} categories (+ background = {ds.num_classes})")
    model = build_detector(d)
    load_weights(model, d, weights)
    return {**evaluate(model, ds, device, batch_size, progress), **model_cost(d, device)}
