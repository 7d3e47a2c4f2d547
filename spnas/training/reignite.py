"""Reignition: re-train a detector's backbone as a classifier, then put it back.

The backbone (``backbone.body.*``) of a detector is trained as backbone + global average pool
+ linear head on a folder-per-class image set (torchvision ``ImageFolder`` layout). When no
such set is given, a stand-in is cut from the object boxes of the detection training set
(logged as such). Either way the classifier sees its inputs normalised exactly as the detector
normalises them (the detector transform's ``image_mean``/``image_std``).

Back in the detector, the BatchNorm statistics are recalibrated on detection training images
and, when asked, the FPN and heads are fine-tuned with the backbone frozen
(:mod:`.adapt`); without a detection set the FPN, parallel connections and heads keep their
weights and the BN statistics are those the classifier left.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.classification import CROP_IMAGE_SIZE, FOLDER_IMAGE_SIZE, crops_from_detection, folder_dataset
from ..data.source import CocoSource
from ..models.checkpoint import load_weights, save_checkpoint
from ..models.desc import normalize_desc
from ..models.detector import build_classifier, build_detector
from ..utils.errors import DataError, NonFiniteLossError, SpnasError
from ..utils.fileio import atomic_write_json
from . import distributed
from .adapt import batch_norms, finetune_heads, recalibrate_bn, sample_indices
from .device import device_of
from .schedule import ReignitionSettings

log = logging.getLogger(__name__)

#: Most samples the linear head is first fitted on (see :func:`_fit_head`).
PROBE_SAMPLES = 10_000


def _accuracy(model: torch.nn.Module, loader: DataLoader, dev: torch.device) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x.to(dev)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * right / max(total, 1)


def _fit_head(clf: torch.nn.Module, dataset: torch.utils.data.Dataset, indices: list[int], iters: int, seed: int,
              dev: torch.device) -> float | None:
    """Fit ``clf.fc`` alone (L-BFGS, ``iters`` iterations, L2 1e-4) on the pooled features of
    the backbone as the detector left it (eval mode) for at most :data:`PROBE_SAMPLES` of
    ``indices`` (a seeded sample), so that fine-tuning starts from a head that fits the features
    instead of pushing random-head gradients into the backbone. Returns the head's top-1 (%) on
    those samples, or None when ``iters`` is 0."""
    if iters == 0 or not indices:
        return None
    chosen = [indices[i] for i in sample_indices(len(indices), PROBE_SAMPLES, seed)]
    loader = DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=256)
    clf.eval()
    with torch.no_grad():
        pairs = [(torch.flatten(clf.avgpool(clf.body(x.to(dev))[-1]), 1), y.to(dev)) for x, y in loader]
    feats, labels = torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])
    opt = torch.optim.LBFGS(clf.fc.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(clf.fc(feats), labels) + 1e-4 * clf.fc.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return round(100.0 * (clf.fc(feats).argmax(1) == labels).float().mean().item(), 2)


def reignite(desc: Mapping[str, Any], weights: str | os.PathLike | Mapping, out_dir: str | os.PathLike,
             settings: ReignitionSettings, *, folder: str | os.PathLike | None = None,
             detection: CocoSource | None = None, arch_id: int | str = 0, device: str | None = None,
             progress: bool = False, nproc: int = 1) -> dict[str, Any]:
    """Re-train the backbone of ``desc``/``weights`` as a classifier, put it back, adapt the
    detector to it, and write ``desc_<id>.json``, ``model_<id>.pth`` (the detector with the
    re-trained backbone) and ``performance_<id>.json`` into ``out_dir``. Returns the
    performance dict: classification accuracy (``top1_train``, ``top1_val``), ``classes``,
    ``images``, ``epochs``, ``image_size``, ``source``, ``recalibrated`` (detection images the
    BN statistics were re-estimated on), ``head_iters`` and ``seconds``.

    The classification data is ``folder`` (a folder-per-class set) when given, else object crops
    of ``detection``; one of the two is needed. ``detection`` (with its own file prefixes) is
    also what the BN statistics are recalibrated on and the heads fine-tuned on (see
    ``settings``); without it neither happens.

    ``nproc`` > 1: data-parallel over ``nproc`` processes on this machine (launched through
    ``torch.distributed.run``; inside a launch the processes of the launch): the classifier's
    epochs are sharded (``settings.batch_size`` per process, the lr scaled by the number of
    processes, linear rule) and the head fine-tune runs on the training engine's DDP; the
    linear probe and the BN recalibration, cheap and deterministic, run whole on every rank.
    Rank 0 alone writes; ``world_size`` is in the returned dict."""
    distributed.check_nproc(nproc, "nproc")
    if folder is None and detection is None:
        raise SpnasError("reignition needs a classification folder or a detection data set to cut crops from")
    if nproc > 1 and not distributed.in_launch():
        from .launch import reignite_launched
        return reignite_launched(nproc, desc, weights, out_dir, settings, folder=folder, detection=detection,
                                 arch_id=arch_id, device=device, progress=progress)
    base = device_of(device)
    with distributed.process_group(base) as ctx:
        return _reignite_here(desc, weights, Path(out_dir), settings, folder, detection, arch_id,
                              distributed.rank_device(base, ctx), ctx, progress)


def _reignite_here(desc: Mapping[str, Any], weights: str | os.PathLike | Mapping, out: Path,
                   settings: ReignitionSettings, folder: str | os.PathLike | None, detection: CocoSource | None,
                   arch_id: int | str, dev: torch.device, ctx: distributed.DistContext,
                   progress: bool) -> dict[str, Any]:
    """:func:`reignite` in this process (one rank of ``ctx``)."""
    from tqdm import tqdm
    epochs, batch_size, seed = settings.epochs, settings.batch_size, settings.seed
    lr = settings.lr * ctx.world_size  # linear scaling: settings.lr is the rate for batch_size images
    image_size = settings.image_size or (FOLDER_IMAGE_SIZE if folder is not None else CROP_IMAGE_SIZE)
    d = normalize_desc(desc)
    detector = build_detector(d)
    load_weights(detector, d, weights)
    mean, std = detector.transform.image_mean, detector.transform.image_std
    if folder is not None:
        dataset, classes = folder_dataset(folder, image_size, mean=mean, std=std)
        source = f"folder {folder}"
    else:
        dataset, classes = crops_from_detection(detection, image_size, seed=seed, mean=mean, std=std)
        source = f"object crops of {detection.root}"
        log.info("reignition: no classification set given; using %d object crops of the detection training "
                 "set as a stand-in", len(dataset))
    if len(classes) < 2:
        raise DataError(f"reignition needs at least 2 classes, {source} has {len(classes)}")
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, n // 10) if n >= 10 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    g = torch.Generator().manual_seed(seed + 1 + ctx.rank * 2 ** 32)  # order (one process) and flips: per rank
    train_part = torch.utils.data.Subset(dataset, train_idx)
    sampler = None
    if ctx.distributed:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train_part, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed + 1)
        train_loader = DataLoader(train_part, batch_size=batch_size, sampler=sampler, generator=g)
    else:
        train_loader = DataLoader(train_part, batch_size=batch_size, shuffle=True, generator=g)
    val_loader = DataLoader(torch.utils.data.Subset(dataset, val_idx), batch_size=batch_size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = build_classifier(d, len(classes))
    clf.body.load_state_dict(detector.backbone.body.state_dict(), strict=True)
    clf.to(dev)
    t0, step = time.perf_counter(), 0
    probe = _fit_head(clf, dataset, train_idx, settings.probe_iters, seed, dev) if epochs else None
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    total = epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / max(total, 1))))
    net = torch.nn.parallel.DistributedDataParallel(
        clf, device_ids=[dev.index] if dev.type == "cuda" else None) if ctx.distributed else clf
    bar = tqdm(total=total, desc="reignite", unit="it", disable=not progress or not ctx.is_main)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        clf.train()
        if settings.freeze_bn_stats:
            for bn in batch_norms(clf):
                bn.eval()
        for x, y in train_loader:
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(net(x.to(dev)), y.to(dev))
            mean_loss = distributed.mean_across(loss.detach()).item()
            if not math.isfinite(mean_loss):  # every rank stops at the same step
                raise NonFiniteLossError(f"non-finite reignition loss at step {step}: {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(clf.parameters(), settings.clip_grad_norm)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
    bar.close()
    distributed.sync_buffers(clf)
    perf: dict[str, Any] = {
        "top1_train": round(_accuracy(clf, DataLoader(train_part, batch_size=batch_size), dev), 2),
        "top1_val": round(_accuracy(clf, val_loader, dev), 2) if n_val else None,
        "top1_probe": probe, "classes": len(classes), "images": n, "epochs": epochs, "image_size": image_size,
        "source": source, "world_size": ctx.world_size}
    detector.backbone.body.load_state_dict(clf.body.cpu().state_dict(), strict=True)
    perf["recalibrated"], perf["head_iters"] = 0, 0
    if detection is not None:
        perf["recalibrated"] = recalibrate_bn(detector, detection.load("train", train=False),
                                              settings.recalibrate_images, seed=seed,
                                              batch_size=settings.detection_batch_size, device=dev)
        perf["head_iters"] = finetune_heads(detector, detection.load("train", train=True, seed=seed,
                                                                     masks=d["type"] == "MaskRCNN",
                                                                     semantic=d["type"] == "SemanticFPN"),
                                            settings.head_iters, lr, seed=seed,
                                            batch_size=settings.detection_batch_size, device=dev)
    elif settings.recalibrate_images or settings.head_iters:
        log.warning("reignition of %s: no detection data set given, so the BatchNorm statistics are not "
                    "recalibrated and the heads not fine-tuned", arch_id)
    perf["seconds"] = round(time.perf_counter() - t0, 2)
    detector.cpu()
    if ctx.is_main:
        atomic_write_json(out / f"desc_{arch_id}.json", d)
        save_checkpoint(out / f"model_{arch_id}.pth", detector.state_dict())
        atomic_write_json(out / f"performance_{arch_id}.json", perf)
    distributed.barrier()
    log.info("reignition of %s: top-1 %.1f%% (train) on %s, BN recalibrated on %d detection image(s), "
             "%d head iteration(s)", arch_id, perf["top1_train"], source, perf["recalibrated"], perf["head_iters"])
    return perf
