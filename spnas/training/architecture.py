"""Train and evaluate one architecture end to end (``spnas train``/``evaluate`` and every
training of the search phases).

Writes a candidate's files into ``out_dir``: ``desc_<id>.json`` (the model description),
``performance_<id>.json`` (the final model's metrics, params, GFLOPs, effective lr, timing) and
``model_<id>.pth`` (the final weights), all atomically. Training state lives in ``out_dir/train_<id>/``
so an interrupted run resumes.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.coco import CocoDetection
from ..data.source import CocoSource
from ..models.checkpoint import load_weights, save_checkpoint
from ..models.cost import count_params, forward_cost
from ..models.desc import normalize_desc
from ..models.detector import build_detector
from ..search.settings import quality_key
from ..utils.errors import ConfigError, SpnasError
from ..utils.fileio import atomic_write_json
from . import distributed
from .device import device_of
from .engine import train
from .evaluation import evaluate
from .schedule import TrainConfig

log = logging.getLogger(__name__)


def dataset_desc(desc: Mapping[str, Any] | None, train_set: CocoDetection, **overrides: Any) -> dict[str, Any]:
    """``desc`` with the class count of the data set and any non-None ``overrides``."""
    d = normalize_desc(desc)
    if d["num_classes"] != train_set.num_classes and (desc or {}).get("num_classes") is not None:
        log.info("num_classes %d in the description replaced by the data set's %d (%d categories + background)",
                 d["num_classes"], train_set.num_classes, train_set.num_classes - 1)
    d["num_classes"] = train_set.num_classes
    d.update({k: v for k, v in overrides.items() if v is not None})
    return normalize_desc(d)


def model_cost(model: nn.Module, desc: Mapping[str, Any], device: str | None = None) -> dict[str, Any]:
    """Cost of a built detector: ``params`` (total count), ``params_k`` (thousands, as Vega
    reports), ``gflops`` and ``backbone_latency`` (ms, backbone + FPN, measured on ``device``) at the
    description's ``max_size`` (default 800)."""
    n = count_params(model)["total"]
    flops, latency = forward_cost(model.backbone, int(desc.get("max_size", 800)), device_of(device))
    return {"params": n, "params_k": round(n / 1e3, 1), "gflops": round(flops, 3), "backbone_latency": latency}


def train_architecture(desc: Mapping[str, Any] | None, data: CocoSource, out_dir: str | os.PathLike,
                       cfg: TrainConfig, *, arch_id: int | str = 0, init: str | os.PathLike | Mapping | None = None,
                       trainable: Callable[[str], bool] | Collection[str] | None = None, device: str | None = None,
                       resume: bool = True, progress: bool = False, nproc: int = 1,
                       **desc_overrides: Any) -> dict[str, Any]:
    """Train one architecture and write its files; returns the performance dict.

    Args:
        desc: the model description (its class count is replaced by the data set's).
        data: the detection data set (``train`` and ``val`` splits).
        out_dir: receives ``desc_<id>.json``, ``performance_<id>.json`` (the final evaluation's
            metrics, cost, effective lr, ``world_size``, ``global_batch``, timing, and the
            per-epoch validation history for information) and ``model_<id>.pth`` (the final
            weights; no epoch is picked on the validation set), all written atomically (by rank
            0 alone under DDP); training state lives in ``train_<id>/`` so an interrupted run
            resumes.
        cfg: the schedule (``batch_size`` per process).
        arch_id: the id in the file names.
        init: weights to start from: a file or a state dict (see ``load_weights``).
        trainable: the names of the parameters that train, or ``trainable(name)`` (one process
            only) (``freeze_swap_keys``); None: all.
        device, resume, progress: see :func:`~spnas.training.engine.train`.
        nproc: processes of a data-parallel training on this machine (one per GPU); above 1 the
            training is launched through ``torch.distributed.run`` (:mod:`.launch`). Inside a
            launch (torchrun's environment) the training joins the launch's processes instead.
        desc_overrides: description keys to set (``min_size=...``); None values are ignored.
    """
    distributed.check_nproc(nproc, "nproc")
    if nproc > 1 and not distributed.in_launch():
        from .launch import train_launched
        return train_launched(nproc, desc, data, out_dir, cfg, arch_id=arch_id, init=init, trainable=trainable,
                              device=device, resume=resume, progress=progress, **desc_overrides)
    if trainable is not None and not callable(trainable):
        trainable = frozenset(trainable).__contains__
    base = device_of(device)
    with distributed.process_group(base) as ctx:
        return _train_here(desc, data, Path(out_dir), cfg, ctx, base, arch_id=arch_id, init=init, trainable=trainable,
                           device=device, resume=resume, progress=progress, **desc_overrides)


def _train_here(desc: Mapping[str, Any] | None, data: CocoSource, out: Path, cfg: TrainConfig,
                ctx: distributed.DistContext, base: torch.device, *, arch_id: int | str,
                init: str | os.PathLike | Mapping | None, trainable: Callable[[str], bool] | None,
                device: str | None, resume: bool, progress: bool, **desc_overrides: Any) -> dict[str, Any]:
    """:func:`train_architecture` in this process (one rank of ``ctx``)."""
    mtype = normalize_desc(desc)["type"]
    masks = mtype == "MaskRCNN"  # Mask R-CNN trains on the instance masks too
    semantic = mtype == "SemanticFPN"  # a semantic model trains and is evaluated on label maps
    train_set = data.load("train", train=True, seed=cfg.seed, masks=masks, semantic=semantic)
    val_set = data.load("val", train=False, semantic=semantic)
    d = dataset_desc(desc, train_set, **desc_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_detector(d)
    loaded = load_weights(model, d, init) if init is not None else {"loaded": 0, "fresh": len(model.state_dict())}
    if d["backbone"]["norm"] == "syncbn" and ctx.distributed:
        if base.type != "cuda":
            raise ConfigError("model desc backbone.norm 'syncbn' needs CUDA devices: SyncBatchNorm does not run on "
                              "CPU (use norm 'bn' for a data-parallel training on CPU)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if ctx.is_main:
        atomic_write_json(out / f"desc_{arch_id}.json", d)
    result = train(model, train_set, val_set, cfg, out / f"train_{arch_id}", device=device, resume=resume,
                   progress=progress, trainable=trainable)
    # the final model and its final evaluation: picking the best epoch on val and reporting
    # that same val mAP would be optimistic; the per-epoch history stays, for information
    final = result["history"][-1] if result["history"] else {}
    if final.get("iteration") != result["iters"]:
        raise SpnasError(f"architecture {arch_id}: the training's last evaluation is at iteration "
                         f"{final.get('iteration')}, not at its end ({result['iters']})")
    metrics = {k: v for k, v in final.items() if k != "iteration"}
    cost = None
    if ctx.is_main:
        save_checkpoint(out / f"model_{arch_id}.pth", {k: v.detach().cpu() for k, v in model.state_dict().items()})
        cost = model_cost(model, d, device)
    cost = distributed.broadcast(cost)
    run_cfg = replace(cfg, world_size=result["world_size"])
    perf = {**metrics, **cost, "iters": result["iters"], "images": result["images"],
            "effective_lr": run_cfg.effective_lr, "world_size": result["world_size"],
            "global_batch": result["global_batch"], "train_seconds": round(result["seconds"], 2),
            "images_per_second": round(result["images_this_call"] / result["seconds"], 2) if result["seconds"] > 0 else None,
            "init": loaded, "trainable": result["trainable"], "norm_eval": result["norm_eval"], "history": result["history"]}
    if ctx.is_main:
        atomic_write_json(out / f"performance_{arch_id}.json", perf)
        key = quality_key(perf)
        log.info("architecture %s: %s %.2f -> %s", arch_id, key, perf.get(key) or 0, out)
    distributed.barrier()  # every file is written before any rank returns
    return perf


def evaluate_architecture(desc: Mapping[str, Any], weights: str | os.PathLike, data: CocoSource,
                          split: str = "val", device: str | None = None, batch_size: int = 4,
                          progress: bool = False) -> dict[str, Any]:
    """COCO metrics of saved weights on a split of ``data`` (plus params, GFLOPs and latency)."""
    d = normalize_desc(desc)
    ds = data.load(split, train=False, semantic=d["type"] == "SemanticFPN")
    if d["num_classes"] != ds.num_classes:
        raise SpnasError(f"the description has num_classes {d['num_classes']} but {str(ds.ann_file)!r} has "
                         f"{ds.num_classes - 1} categories (+ background = {ds.num_classes})")
    model = build_detector(d)
    load_weights(model, d, weights)
    return {**evaluate(model, ds, device, batch_size, progress), **model_cost(model, d, device)}
