"""Instance masks as COCO compressed RLEs, the form ``spnas serve`` answers them in (numpy and
pycocotools only: no torch, no kserve).

An RLE is ``{"size": [h, w], "counts": "<ascii>"}``: pycocotools' compressed run-length
encoding of a binary ``h x w`` mask (column-major runs), ``counts`` decoded to text so that the
object is JSON. ``pycocotools.mask.decode`` of it (``counts`` encoded back to bytes, or passed as
the text) gives the ``uint8 [h, w]`` mask again.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..utils.errors import ServeError

log = logging.getLogger(__name__)

#: a pixel belongs to a detection's mask when its probability is above this (torchvision's rule)
MASK_THRESHOLD = 0.5


def encode(masks: np.ndarray, threshold: float = MASK_THRESHOLD) -> list[dict[str, Any]]:
    """Mask probabilities ``[N, 1, H, W]`` (a Mask R-CNN program's ``masks``) -> ``N`` RLEs of the
    pixels above ``threshold``, in detection order. :class:`ServeError` for another shape."""
    from pycocotools import mask as mask_utils
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ServeError(f"masks must be [N, 1, H, W] probabilities, got shape {list(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants uint8 [H, W, N] in column-major order
    binary = np.asfortranarray((masks[:, 0] > threshold).transpose(1, 2, 0).astype(np.uint8))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in mask_utils.encode(binary)]


def decode(rle: dict[str, Any]) -> np.ndarray:
    """One RLE of :func:`encode` (``counts`` text or bytes) -> its ``uint8 [h, w]`` mask."""
    from pycocotools import mask as mask_utils
    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]),
                              "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
