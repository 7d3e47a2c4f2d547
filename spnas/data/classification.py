"""Classification data for reignition: a folder-per-class image set (torchvision ``ImageFolder``
layout), or a stand-in cut from the object boxes of a detection training set.

Both give ``(image float32 [3, S, S] in [0, 1], label int64)`` samples of one square size ``S``.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..utils.errors import DataError
from .source import CocoSource


def crops_from_detection(source: CocoSource, image_size: int = 64, context: float = 0.1,
                         max_crops: int = 20000, seed: int = 0) -> tuple[TensorDataset, list[str]]:
    """Object crops of the detection training split, resized to ``image_size`` squares, labelled
    ``0..K-1`` by category; at most ``max_crops`` (a seeded sample)."""
    ds = source.load("train", train=False)
    items = [(i, b, lab) for i, r in enumerate(ds.records) for b, lab in zip(r["boxes"], r["labels"], strict=True)]
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


def folder_dataset(root: str | os.PathLike, image_size: int = 64) -> tuple[Dataset, list[str]]:
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
