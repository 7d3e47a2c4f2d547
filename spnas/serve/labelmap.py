"""Label maps as PNG, the compact form ``spnas serve`` answers a semantic model in (numpy and
Pillow only: no torch, no kserve).

The PNG has the layout of the training label maps (:mod:`spnas.data.semantic`): one value per
pixel, the COCO category id (0 background), 8-bit grey (``L``) when every category id is below
256, else 16-bit grey (``I;16``). ``decode(encode(m))`` is ``m`` again, pixel for pixel.
"""
from __future__ import annotations

import io
import logging

import numpy as np

from ..utils.errors import ServeError

log = logging.getLogger(__name__)

#: the largest category id a 16-bit PNG label map holds
MAX_CATEGORY_ID = 65535


def png_bits(max_category_id: int) -> int:
    """8 or 16: the PNG depth that holds category ids up to ``max_category_id``;
    :class:`ServeError` beyond :data:`MAX_CATEGORY_ID`."""
    if max_category_id > MAX_CATEGORY_ID:
        raise ServeError(f"category id {max_category_id} does not fit a 16-bit PNG label map (at most "
                         f"{MAX_CATEGORY_ID})")
    return 8 if max_category_id < 256 else 16


def encode(label_map: np.ndarray, bits: int = 8) -> bytes:
    """An integer ``[H, W]`` label map (values 0..2**bits-1) -> PNG bytes of ``bits`` per pixel;
    :class:`ServeError` for another shape or a value out of range."""
    from PIL import Image
    if label_map.ndim != 2:
        raise ServeError(f"a label map must be [H, W], got shape {list(label_map.shape)}")
    if bits not in (8, 16):
        raise ServeError(f"a PNG label map has 8 or 16 bits per pixel, not {bits}")
    if label_map.size and (int(label_map.min()) < 0 or int(label_map.max()) >= 1 << bits):
        raise ServeError(f"label map values {int(label_map.min())}..{int(label_map.max())} do not fit {bits} bits")
    dtype = np.uint8 if bits == 8 else np.uint16
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label_map, dtype=dtype)).save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """PNG bytes of :func:`encode` -> its ``int64 [H, W]`` label map."""
    from PIL import Image
    with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        return np.asarray(im).astype(np.int64)
