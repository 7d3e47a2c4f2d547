"""Instance masks of COCO annotations: polygons, uncompressed and compressed RLE, read through
pycocotools and checked before pycocotools' C code sees them.

:func:`annotation_rle` turns one annotation's ``segmentation`` into a compressed RLE of the
image's size (what :func:`decode` turns into a ``uint8 [H, W]`` mask). Malformed input is a
:class:`MaskProblem` (``kind``: ``missing`` or ``empty``, which a loader may skip and count)
or a :class:`~spnas.utils.errors.DataError` naming the file, the annotation and the value: an
odd-length polygon, an RLE of another size than the image, counts that do not add up to the
image's pixels. The counts of a compressed RLE are decoded here first, because pycocotools
writes a malformed RLE past the end of its mask buffer.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..utils.errors import DataError, brief
from .coco import _finite_number


class MaskProblem(Exception):
    """An annotation without a usable mask: ``kind`` is ``missing`` (no segmentation) or
    ``empty`` (no pixel inside the image)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def compressed_counts(text: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString`` format:
    6-bit groups offset by 48, the 6th bit a continuation flag, runs after the second coded as
    differences), or None when the string is not in that format."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                return None
            c = ord(text[pos]) - 48
            if not 0 <= c < 64:
                return None
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
    return counts


def annotation_rle(ann: dict[str, Any], height: int, width: int, where: str) -> dict[str, Any]:
    """The compressed RLE (``{"size": [h, w], "counts": bytes}``) of ``ann["segmentation"]`` on
    an image of ``height`` x ``width``; see the module docstring for what is refused."""
    from pycocotools import mask as mask_utils
    seg = ann.get("segmentation")
    what = f"{where}: annotation {ann.get('id')} segmentation"
    if seg is None or (isinstance(seg, list) and not seg):
        raise MaskProblem("missing", f"{where}: annotation {ann.get('id')} has no segmentation")
    if isinstance(seg, list):
        for i, poly in enumerate(seg):
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(_finite_number(v) for v in poly)):
                raise DataError(f"{what} polygon {i} {brief(poly)} is not [x1, y1, x2, y2, ...] of finite numbers "
                                "with at least 3 points")
            far = [v for v in poly[0::2] if not -width <= v <= 2 * width] + \
                [v for v in poly[1::2] if not -height <= v <= 2 * height]
            if far:  # pycocotools' rasteriser overflows (and crashes) on coordinates far outside
                raise DataError(f"{what} polygon {i} has coordinates far outside the {width} x {height} image "
                                f"(e.g. {brief(far[0])})")
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], height, width))
    elif isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and [int(v) if _finite_number(v) else None for v in size]
                == [height, width]):
            raise DataError(f"{what} RLE size {brief(size)} is not the image's [height, width] = [{height}, {width}]")
        if isinstance(counts, list):
            runs = counts if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts) else None
        elif isinstance(counts, str):
            runs = compressed_counts(counts)
        else:
            runs = None
        if runs is None:
            raise DataError(f"{what} RLE counts {brief(counts)} are neither a list of non-negative integers nor a "
                            "COCO compressed RLE string")
        if sum(runs) != height * width:
            raise DataError(f"{what} RLE counts add up to {sum(runs)} pixels, not the image's {height} x {width} = "
                            f"{height * width}")
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode("ascii")}
    else:
        raise DataError(f"{what} {brief(seg)} is neither a list of polygons nor an RLE object")
    if int(mask_utils.area(rle)) == 0:
        raise MaskProblem("empty", f"{where}: annotation {ann.get('id')} segmentation covers no pixel of the image")
    return rle


def decode(rle: dict[str, Any]) -> np.ndarray:
    """``uint8 [H, W]`` (0/1) of a compressed RLE from :func:`annotation_rle`."""
    from pycocotools import mask as mask_utils
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
