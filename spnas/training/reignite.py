"""Reignition: re-train a detector's backbone as a classifier, then put it back.

The backbone (``backbone.body.*``) of a detector is trained as backbone + global average pool
+ linear head on a folder-per-class image set (torchvision ``ImageFolder`` layout). When no
such set is given, a stand-in is cut from the object boxes of the detection training set
(logged as such). The FPN, parallel connections and heads keep their weights.
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

from ..data.classification import crops_from_detection, folder_dataset
from ..data.source import CocoSource
from ..models.checkpoint import load_weights, save_checkpoint
from ..models.desc import normalize_desc
from ..models.detector import build_classifier, build_detector
from ..utils.errors import DataError, NonFiniteLossError, SpnasError
from ..utils.fileio import atomic_write_json
from .device import device_of
from .schedule import ReignitionSettings

log = logging.getLogger(__name__)


def _accuracy(model: torch.nn.Module, loader: DataLoader, dev: torch.device) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x.to(dev)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * right / max(total, 1)


def reignite(desc: Mapping[str, Any], weights: str | os.PathLike | Mapping, out_dir: str | os.PathLike,
             settings: ReignitionSettings, *, folder: str | os.PathLike | None = None,
             detection: CocoSource | None = None, arch_id: int | str = 0, device: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Re-train the backbone of ``desc``/``weights`` as a classifier and write ``desc_<id>.json``,
    ``model_<id>.pth`` (the detector with the re-trained backbone) and ``performance_<id>.json``
    (classification accuracy) into ``out_dir``. Returns the performance dict.

    Exactly one of ``folder`` (a folder-per-class classification set) or ``detection`` (a
    detection set to cut object crops from) is the classification data."""
    from tqdm import tqdm
    if (folder is None) == (detection is None):
        raise SpnasError("reignition needs exactly one of a classification folder or a detection "
                         "data set to cut crops from")
    epochs, batch_size, lr, image_size, seed = (settings.epochs, settings.batch_size, settings.lr,
                                                settings.image_size, settings.seed)
    dev = device_of(device)
    d = normalize_desc(desc)
    detector = build_detector(d)
    load_weights(detector, d, weights)
    if folder is not None:
        dataset, classes = folder_dataset(folder, image_size)
        source = f"folder {folder}"
    else:
        dataset, classes = crops_from_detection(detection, image_size, seed=seed)
        source = f"object crops of {detection.root}"
        log.info("reignition: no classification set given; using %d object crops of the detection training "
                 "set as a stand-in", len(dataset))
    if len(classes) < 2:
        raise DataError(f"reignition needs at least 2 classes, {source} has {len(classes)}")
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, n // 10) if n >= 10 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    g = torch.Generator().manual_seed(seed + 1)
    train_loader = DataLoader(torch.utils.data.Subset(dataset, train_idx), batch_size=batch_size, shuffle=True,
                              generator=g)
    val_loader = DataLoader(torch.utils.data.Subset(dataset, val_idx), batch_size=batch_size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = build_classifier(d, len(classes))
    clf.body.load_state_dict(detector.backbone.body.state_dict(), strict=True)
    clf.to(dev)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    total = epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / max(total, 1))))
    t0, step = time.perf_counter(), 0
    bar = tqdm(total=total, desc="reignite", unit="it", disable=not progress)
    for _epoch in range(epochs):
        clf.train()
        for x, y in train_loader:
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(clf(x.to(dev)), y.to(dev))
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(f"non-finite reignition loss at step {step}: {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    perf = {"top1_train": round(_accuracy(clf, train_loader, dev), 2),
            "top1_val": round(_accuracy(clf, val_loader, dev), 2) if n_val else None,
            "classes": len(classes), "images": n, "epochs": epochs, "source": source,
            "seconds": round(time.perf_counter() - t0, 2)}
    detector.backbone.body.load_state_dict(clf.body.cpu().state_dict(), strict=True)
    out = Path(out_dir)
    atomic_write_json(out / f"desc_{arch_id}.json", d)
    save_checkpoint(out / f"model_{arch_id}.pth", detector.state_dict())
    atomic_write_json(out / f"performance_{arch_id}.json", perf)
    log.info("reignition of %s: top-1 %.1f%% (train) on %s", arch_id, perf["top1_train"], source)
    return perf
