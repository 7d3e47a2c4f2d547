"""Semantic label maps of a COCO split: PNG files next to the COCO layout, or painted from the
instance masks.

Layout (documented in the README)::

    data_root/annotations/instances_train2017.json          the COCO file (images, categories)
    data_root/annotations/semantic_train2017/<image>.png     one label map per image

``<image>`` is the image's ``file_name`` with its extension replaced by ``.png`` (sub-folders
kept). A label map has the image's size and holds, per pixel, the COCO **category id** of its
class, ``0`` for background and :data:`IGNORE_VALUE` (255) for pixels that count nowhere (as
COCO-Stuff's pixel maps): 8-bit grey (``L``), palette (``P``: the palette index is the value) or
16-bit (``I;16``/``I``) PNGs. Category ids 0 and 255 are therefore not allowed in a semantic
data set. The loader maps category ids to the detectors' contiguous labels (``1..K``, 0
background); a value that is neither 0, 255 nor a category id, a map of another size than its
image, or a missing file is a :class:`~spnas.utils.errors.DataError` naming the file.

Without a ``semantic_<split><img_prefix>`` folder the maps are painted from the instance masks
(:mod:`.masks`): every non-crowd annotation's mask with its class, in annotation order (a later
annotation paints over an earlier one), crowd regions :data:`IGNORE_VALUE`, the rest background.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.errors import DataError, brief

#: Pixel value (and label) that counts neither in training nor in the metrics.
IGNORE_VALUE = 255
_MODES = {"L", "P", "I;16", "I"}


def label_dir(ann_file: Path, img_prefix: str, split: str) -> Path:
    """``annotations/semantic_<split><img_prefix>/`` next to ``ann_file``."""
    return Path(ann_file).parent / f"semantic_{split}{img_prefix}"


def label_file(folder: Path, file_name: str) -> Path:
    """The label map of image ``file_name`` in ``folder`` (extension replaced by ``.png``)."""
    return folder / Path(file_name).with_suffix(".png")


def check_categories(cat_ids: Sequence[int], where: str) -> None:
    """Category ids 0 and 255 collide with the background and ignore values of a label map."""
    bad = [c for c in cat_ids if c in (0, IGNORE_VALUE)]
    if bad:
        raise DataError(f"{where}: category id(s) {bad} cannot be told apart in a semantic label map (0 is "
                        f"background, {IGNORE_VALUE} ignored): renumber the categories")


def lookup_table(cat_to_label: Mapping[int, int]) -> np.ndarray:
    """``int64 [65536]``: category id -> contiguous label, 0 -> 0, 255 -> 255, anything else -1."""
    lut = np.full(1 << 16, -1, dtype=np.int64)
    lut[0], lut[IGNORE_VALUE] = 0, IGNORE_VALUE
    for cat, label in cat_to_label.items():
        if 0 <= cat < lut.size:
            lut[cat] = label
    return lut


def read_label_map(path: Path, size: tuple[int, int], lut: np.ndarray) -> np.ndarray:
    """``int64 [H, W]`` labels of the PNG at ``path``, checked: readable, an accepted mode, the
    image's ``size`` (height, width), every value known to ``lut`` (:func:`lookup_table`)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in _MODES:
                raise DataError(f"label map {str(path)!r} has PNG mode {mode!r}: expected one class value per "
                                "pixel (8-bit grey 'L', palette 'P' or 16-bit 'I;16')")
            values = np.asarray(im, dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"label map {str(path)!r} does not exist") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"label map {str(path)!r} cannot be decoded: {exc}") from None
    if values.shape != tuple(size):
        raise DataError(f"label map {str(path)!r} is {values.shape[0]} x {values.shape[1]} px, its image "
                        f"{size[0]} x {size[1]}")
    if values.min() < 0 or values.max() >= lut.size:
        raise DataError(f"label map {str(path)!r} holds values outside 0..{lut.size - 1}")
    labels = lut[values]
    if (labels < 0).any():
        unknown = sorted(int(v) for v in np.unique(values[labels < 0]))
        raise DataError(f"label map {str(path)!r} holds value(s) {brief(unknown)} that are neither 0 (background), "
                        f"{IGNORE_VALUE} (ignored) nor a category id of the annotation file")
    return labels


def paint_instances(layers: Sequence[tuple[int, dict[str, Any]]], size: tuple[int, int]) -> np.ndarray:
    """``int64 [H, W]`` labels painted from ``(label, compressed RLE)`` pairs in order (later over
    earlier; label :data:`IGNORE_VALUE` for crowd regions), 0 elsewhere."""
    from .masks import decode
    out = np.zeros(size, dtype=np.int64)
    for label, rle in layers:
        out[decode(rle).astype(bool)] = label
    return out

