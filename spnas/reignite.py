"""Reignition (SPEC 2.3): re-train a detector's backbone as a classifier, then put it back.

The backbone (``backbone.body.*``) of a detector is trained as backbone + global average pool
+ linear head on a folder-per-class image set (torchvision ``ImageFolder`` layout). When no
such set is given, a stand-in is cut from the object boxes of the detection training set
(logged as such). The FPN, parallel connections and heads keep their weights.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .data import DataError, load_split
from .detector import build_classifier, build_detector, normalize_desc
from .engine import NonFiniteLossError, _device_of
from .errors import SpnasError
from .io import atomic_torch_save, atomic_write_json
from .trainer import load_weights

log = logging.getLogger(__name__)


def crops_from_detection(data_root: "str | os.PathLike", image_size: int = 64, context: float = 0.1,
                         max_crops: int = 20000, seed: int = 0, img_prefix: str = "2017",
                         ann_prefix: str = "instances") -> tuple[TensorDataset, list[str]]:
    """Object crops of the detection training split, resized to ``image_size`` squares, labelled
    ``0..K-1`` by category; at most ``max_crops`` (a seeded sample)."""
    ds = load_split(data_root, "train", train=False, img_prefix=img_prefix, ann_prefix=ann_prefix)
    items = [(i, b, l) for i, r in enumerate(ds.records) for b, l in zip(r["boxes"], r["labels"])]
    if not items:
        raise DataError(f"{str(ds.ann_file)!r} has no boxes to cut classification crops from")
    if len(items) > max_crops:
        items = sorted(random.Random(seed).sample(items, max_crops))
    images, labels, cached = [], [], (-1, None)
    for i, (x0, y0, x1, y1), label in items:
        if cached[0] != i:
            cached = (i, ds.read_image(i).float().div_(255))
        img = cached[1]
        h, w = img.shape[-2:]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = max(x1 - x0, y1 - y0) * (1 + context) / 2
        xa, xb = int(max(0, math.floor(cx - half))), int(min(w, math.ceil(cx + half)))
        ya, yb = int(max(0, math.floor(cy - half))), int(min(h, math.ceil(cy + half)))
        if xb - xa < 2 or yb - ya < 2:
            continue
        crop = F.interpolate(img[None, :, ya:yb, xa:xb], size=(image_size, image_size), mode="bilinear",
                             align_corners=False)[0]
        images.append(crop)
        labels.append(label - 1)
    return TensorDataset(torch.stack(images), torch.tensor(labels)), ds.cat_names


def folder_dataset(root: "str | os.PathLike", image_size: int = 64) -> tuple[Dataset, list[str]]:
    """A folder-per-class image set (``root/<class>/<image>``) resized to ``image_size``."""
    from torchvision import datasets, transforms
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"classification folder {str(root)!r} does not exist")
    try:
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose([
            transforms.Resize((image_size, image_size)), transforms.ToTensor()]))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"classification folder {str(root)!r}: {exc}") from None
    return ds, list(ds.classes)


def _accuracy(model: torch.nn.Module, loader: DataLoader, dev: torch.device) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (model(x.to(dev)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * right / max(total, 1)


def reignite(desc: Mapping[str, Any], weights: "str | os.PathLike | Mapping", out_dir: "str | os.PathLike",
             data: "str | os.PathLike | None" = None, from_detection: "str | os.PathLike | None" = None,
             epochs: int = 2, batch_size: int = 32, lr: float = 0.05, image_size: int = 64, seed: int = 0,
             device: Optional[str] = None, arch_id: "int | str" = 0, progress: bool = False) -> dict[str, Any]:
    """Re-train the backbone of ``desc``/``weights`` as a classifier and write ``desc_<id>.json``,
    ``model_<id>.pth`` (the detector with the re-trained backbone) and ``performance_<id>.json``
    (classification accuracy) into ``out_dir``. Returns the performance dict."""
    from tqdm import tqdm
    if (data is None) == (from_detection is None):
        raise SpnasError("reignition needs exactly one of a classification folder (data) or a detection "
                         "data set to cut crops from (from_detection)")
    if not isinstance(epochs, int) or epochs < 0:
        raise SpnasError(f"reignition epochs must be an integer >= 0, got {epochs!r}")
    dev = _device_of(device)
    d = normalize_desc(desc)
    detector = build_detector(d)
    load_weights(detector, d, weights)
    if data is not None:
        dataset, classes = folder_dataset(data, image_size)
        source = f"folder {data}"
    else:
        dataset, classes = crops_from_detection(from_detection, image_size, seed=seed)
        source = f"object crops of {from_detection}"
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
    atomic_torch_save(out / f"model_{arch_id}.pth", detector.state_dict())
    atomic_write_json(out / f"performance_{arch_id}.json", perf)
    log.info("reignition of %s: top-1 %.1f%% (train) on %s", arch_id, perf["top1_train"], source)
    return perf
