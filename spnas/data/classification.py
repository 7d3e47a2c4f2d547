"""Classification data for reignition: a folder-per-class image set (torchvision ``ImageFolder``
layout), or a stand-in cut from the object boxes of a detection training set.

Both give ``(image float32 [3, S, S], label int64)`` samples of one square size ``S``, the image
normalised as the detector normalises its inputs: ``(x - mean) / std`` per channel with ``x`` in
``[0, 1]`` and the detector transform's ``image_mean``/``image_std`` (torchvision's ImageNet
values unless the description sets its own). ``S`` defaults to :data:`FOLDER_IMAGE_SIZE` (224,
ImageNet's crop) for a folder and :data:`CROP_IMAGE_SIZE` (64, about the size of the demo's
objects) for object crops.
"""
from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..utils.errors import DataError
from .source import CocoSource

#: Default square side of a folder-per-class set's images (ImageNet's 224 crop).
FOLDER_IMAGE_SIZE = 224
#: Default square side of object crops cut from a detection set.
CROP_IMAGE_SIZE = 64
#: torchvision's ImageNet statistics: ``GeneralizedRCNNTransform``'s default ``image_mean``/``image_std``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalizer(mean: Sequence[float], std: Sequence[float]):
    """``x -> (x - mean) / std`` per channel of a ``[..., 3, H, W]`` tensor: the arithmetic of
    the detector's ``GeneralizedRCNNTransform.normalize``."""
    from torchvision import transforms
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise DataError(f"image normalisation needs 3 means and 3 positive stds, got {list(mean)} / {list(std)}")
    return transforms.Normalize([float(m) for m in mean], [float(s) for s in std])


def crops_from_detection(source: CocoSource, image_size: int = CROP_IMAGE_SIZE, context: float = 0.1,
                         max_crops: int = 20000, seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD) -> tuple[TensorDataset, list[str]]:
    """Object crops of the detection training split (``source``'s own file prefixes), resized to
    ``image_size`` squares and normalised with ``mean``/``std``, labelled ``0..K-1`` by category;
    at most ``max_crops`` (a seeded sample)."""
    norm = normalizer(mean, std)
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
    return TensorDataset(norm(torch.stack(images)), torch.tensor(labels)), ds.cat_names


def folder_dataset(root: str | os.PathLike, image_size: int = FOLDER_IMAGE_SIZE,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                   ) -> tuple[Dataset, list[str]]:
    """A folder-per-class image set (``root/<class>/<image>``) resized to ``image_size`` squares
    and normalised with ``mean``/``std``."""
    norm = normalizer(mean, std)
    from torchvision import datasets, transforms
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"classification folder {str(root)!r} does not exist")
    try:
        ds = datasets.ImageFolder(str(root), transform=transforms.Compose([
            transforms.Resize((image_size, image_size)), transforms.ToTensor(), norm]))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"classification folder {str(root)!r}: {exc}") from None
    return ds, list(ds.classes)
