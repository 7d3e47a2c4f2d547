"""Deterministic generated detection scenes in the standard COCO layout (demo and tests).

``write_demo_dataset(out, train=240, val=60, size=160, classes=3, seed=0)`` writes::

    out/annotations/instances_train2017.json   out/train2017/000000000001.jpg ...
    out/annotations/instances_val2017.json     out/val2017/...
    out/annotations/semantic_train2017/000000000001.png ...   (and semantic_val2017/)

Each class is a shape with its own colour family and size range (circle, square, triangle,
cross, diamond, ring, hexagon, bar) drawn 1-4 times per image on a textured background.
Image ``i`` of a split depends only on ``(seed, split, i)``, so a larger set starts with the
images of a smaller one. Every annotation also has an instance mask, ``segmentation``: COCO's
compressed RLE of the object's visible pixels (what later objects or distractors do not hide),
for instance segmentation; boxes, areas and images are those of the sets without masks. Each
image also has a semantic label map (PNG, the category id of every visible object pixel, 0
for the background: the layout of :mod:`.semantic`).

``hard=True`` writes a harder set in the same layout (all 8 classes by default), where backbone
capacity matters: 2-10 objects per image whose size (the longer box side) spreads log-uniformly
from 4 % to 50 % of the image side (:data:`HARD_BOX_SIDE`), partial occlusion (objects and
distractors drawn later may cover up to half of an earlier object's box; boxes stay the full
object), 3-8 unannotated distractors per image (stars, irregular blobs, scribbles, checker
patches, in any colour, class colours included), stronger colour jitter and a random lighting
per image. Its annotation files' ``info`` lists all of this. The default (easy) set is
unchanged by this option, byte for byte.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..utils import checks
from ..utils.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeClass:
    name: str
    rgb: tuple[int, int, int]
    size: tuple[float, float]  # min/max object size as a fraction of the image side


SHAPES = (
    ShapeClass("circle", (220, 50, 40), (0.16, 0.32)),
    ShapeClass("square", (40, 80, 220), (0.20, 0.40)),
    ShapeClass("triangle", (40, 190, 60), (0.24, 0.44)),
    ShapeClass("cross", (230, 200, 30), (0.18, 0.34)),
    ShapeClass("diamond", (200, 40, 200), (0.18, 0.36)),
    ShapeClass("ring", (30, 200, 210), (0.20, 0.38)),
    ShapeClass("hexagon", (240, 130, 20), (0.18, 0.34)),
    ShapeClass("bar", (120, 70, 30), (0.24, 0.44)),
)
SPLIT_IDS = {"train": 1, "val": 2}

#: Hard set: range of the longer box side of an object, as a fraction of the image side. The
#: drawn size is log-uniform in [0.05, 0.5]; rotated triangles fill 84 % of it at least.
HARD_BOX_SIDE = (0.04, 0.5)
HARD_DRAWN_SIZE = (0.05, 0.5)
HARD_OBJECTS = (2, 10)
HARD_DISTRACTORS = (3, 8)
HARD_DISTRACTOR_KINDS = ("star", "blob", "scribble", "checker")
#: Largest share of an object's box that anything drawn after it may cover.
HARD_MAX_COVER = 0.5
HARD_COLOUR_JITTER = 35.0


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.uniform(60, 190, size=3)
    grid = rng.normal(0, 28, size=(5, 5, 3))
    low = np.asarray(Image.fromarray(np.clip(grid + 128, 0, 255).astype(np.uint8)).resize(
        (size, size), Image.BILINEAR), dtype=np.float32) - 128
    yy, xx = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.25)
    stripes = 10 * np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)))[..., None]
    noise = rng.normal(0, 7, size=(size, size, 3))
    img = np.clip(base + low + stripes + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, offset: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(rot + offset + 2 * math.pi * k / n),
                 cy + radius * math.sin(rot + offset + 2 * math.pi * k / n)) for k in range(n)]
    if kind == "triangle":
        return ring(3, r, -math.pi / 2)
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    if kind == "hexagon":
        return ring(6, r)
    raise ValueError(kind)


class _Tee:
    """``ImageDraw`` calls drawn on the image and, with the value ``owner`` instead of the
    colour, on an ownership map: after the scene, each pixel of the map names the object
    (index + 1) it shows, 0 for the background and for distractors drawn over objects. The
    image is exactly what drawing on it alone gives."""

    def __init__(self, img: Image.Image) -> None:
        self.image = ImageDraw.Draw(img)
        self.map = Image.new("L", img.size, 0)
        self.owners = ImageDraw.Draw(self.map)
        self.owner = 0

    def ellipse(self, box: Any, fill: Any = None, outline: Any = None, width: int = 1) -> None:
        self.image.ellipse(box, fill=fill, outline=outline, width=width)
        self.owners.ellipse(box, fill=None if fill is None else self.owner,
                            outline=None if outline is None else self.owner, width=width)

    def rectangle(self, box: Any, fill: Any = None) -> None:
        self.image.rectangle(box, fill=fill)
        self.owners.rectangle(box, fill=self.owner)

    def polygon(self, pts: Any, fill: Any = None) -> None:
        self.image.polygon(pts, fill=fill)
        self.owners.polygon(pts, fill=self.owner)

    def line(self, pts: Any, fill: Any = None, width: int = 1) -> None:
        self.image.line(pts, fill=fill, width=width)
        self.owners.line(pts, fill=self.owner, width=width)

    def masks(self, count: int) -> list[np.ndarray]:
        """The visible part of objects ``1..count`` as ``uint8 [H, W]`` masks."""
        owners = np.asarray(self.map)
        return [(owners == k + 1).astype(np.uint8) for k in range(count)]


def _draw(draw: Any, cls: ShapeClass, cx: float, cy: float, r: float,
          colour: tuple[int, ...], rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draw one object and return its tight box (x0, y0, x1, y1)."""
    k = cls.name
    if k == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=colour)
        return box
    if k == "ring":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, outline=colour, width=max(2, int(r * 0.35)))
        return box
    if k == "square":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.rectangle(box, fill=colour)
        return box
    if k == "bar":
        box = (cx - r, cy - 0.35 * r, cx + r, cy + 0.35 * r)
        draw.rectangle(box, fill=colour)
        return box
    if k == "cross":
        t = 0.3 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
        return (cx - r, cy - r, cx + r, cy + r)
    pts = _polygon(k, cx, cy, r, float(rng.uniform(-0.3, 0.3)) if k != "diamond" else 0.0)
    draw.polygon(pts, fill=colour)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_scene(seed: int, split: str, index: int, size: int, classes: int, max_objects: int = 4,
                 masks: list | None = None) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """One scene: the image and its objects as ``(class_index, [x, y, w, h])``; ``masks`` (a
    list) receives each object's visible pixels as a ``uint8 [H, W]`` mask."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    img = _background(rng, size)
    draw = _Tee(img)
    n = int(rng.integers(1, max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []
    objects: list[tuple[int, list[float]]] = []
    for _ in range(n):
        c = int(rng.integers(0, classes))
        cls = SHAPES[c]
        for _attempt in range(20):  # bounded placement retries
            r = rng.uniform(*cls.size) * size / 2
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            probe = (cx - r, cy - r, cx + r, cy + r)
            if all(_iou(probe, p) < 0.15 for p in placed):
                break
        else:
            continue
        colour = tuple(int(np.clip(v + rng.normal(0, 18), 0, 255)) for v in cls.rgb)
        draw.owner = len(objects) + 1
        x0, y0, x1, y1 = _draw(draw, cls, cx, cy, r, colour, rng)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(size), x1), min(float(size), y1)
        placed.append(probe)
        objects.append((c, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]))
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    if masks is not None:
        masks.extend(draw.masks(len(objects)))
    return img, objects


def _cover(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """The share of box ``b`` that box ``a`` covers."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (b[2] - b[0]) * (b[3] - b[1])
    return ix * iy / area if area > 0 else 0.0


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Any colour, or (half the time) a jittered class colour, so that colour alone names no class."""
    if rng.random() < 0.5:
        base = SHAPES[int(rng.integers(0, len(SHAPES)))].rgb
        return tuple(int(np.clip(v + rng.normal(0, HARD_COLOUR_JITTER), 0, 255)) for v in base)
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _distractor(draw: Any, rng: np.random.Generator, kind: str, cx: float, cy: float,
                r: float) -> None:
    """Draw one unannotated distractor (no class's shape) of radius about ``r`` at ``(cx, cy)``."""
    colour = _random_colour(rng)
    if kind == "star":
        rot = float(rng.uniform(0, 2 * math.pi))
        pts = [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(rot + math.pi * k / 5),
                cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(rot + math.pi * k / 5)) for k in range(10)]
        draw.polygon(pts, fill=colour)
    elif kind == "blob":
        n = int(rng.integers(7, 11))
        radii = rng.uniform(0.5, 1.0, size=n) * r
        pts = [(cx + radii[k] * math.cos(2 * math.pi * k / n), cy + radii[k] * math.sin(2 * math.pi * k / n))
               for k in range(n)]
        draw.polygon(pts, fill=colour)
    elif kind == "scribble":
        pts = [(cx + float(rng.uniform(-r, r)), cy + float(rng.uniform(-r, r))) for _ in range(int(rng.integers(3, 6)))]
        draw.line(pts, fill=colour, width=max(1, int(r * float(rng.uniform(0.08, 0.2)))))
    else:  # checker: a small checkerboard patch of two colours
        other = _random_colour(rng)
        cells = int(rng.integers(3, 6))
        step = 2 * r / cells
        for i in range(cells):
            for j in range(cells):
                x0, y0 = cx - r + i * step, cy - r + j * step
                draw.rectangle((x0, y0, x0 + step, y0 + step), fill=colour if (i + j) % 2 else other)


def render_hard_scene(seed: int, split: str, index: int, size: int, classes: int, masks: list | None = None
                      ) -> tuple[Image.Image, list[tuple[int, list[float]]], int]:
    """One scene of the hard set (see the module docstring): the image, its objects as
    ``(class_index, [x, y, w, h])`` and how many of them something drawn later partly covers;
    ``masks`` (a list) receives each object's visible pixels."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, 1])  # 1: the hard set's own stream
    img = _background(rng, size)
    draw = _Tee(img)
    n_distract = int(rng.integers(HARD_DISTRACTORS[0], HARD_DISTRACTORS[1] + 1))
    n_behind = int(rng.integers(0, n_distract + 1))  # the rest is drawn over the objects
    kinds = [HARD_DISTRACTOR_KINDS[int(k)] for k in rng.integers(0, len(HARD_DISTRACTOR_KINDS), size=n_distract)]
    for kind in kinds[:n_behind]:
        r = float(rng.uniform(0.05, 0.35)) * size / 2
        _distractor(draw, rng, kind, float(rng.uniform(0, size)), float(rng.uniform(0, size)), r)
    lo, hi = math.log(HARD_DRAWN_SIZE[0]), math.log(HARD_DRAWN_SIZE[1])
    boxes: list[tuple[float, float, float, float]] = []
    objects: list[tuple[int, list[float]]] = []
    covered: set[int] = set()

    def fits(probe: tuple[float, ...]) -> bool:
        return all(_cover(probe, b) <= HARD_MAX_COVER for b in boxes)
    for _ in range(int(rng.integers(HARD_OBJECTS[0], HARD_OBJECTS[1] + 1))):
        c = int(rng.integers(0, classes))
        cls = SHAPES[c]
        for _attempt in range(30):  # bounded placement retries
            r = math.exp(rng.uniform(lo, hi)) * size / 2
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            probe = (cx - r, cy - r, cx + r, cy + r)
            if fits(probe):
                break
        else:
            continue
        colour = tuple(int(np.clip(v + rng.normal(0, HARD_COLOUR_JITTER), 0, 255)) for v in cls.rgb)
        draw.owner = len(objects) + 1
        box = _draw(draw, cls, cx, cy, r, colour, rng)
        covered.update(i for i, b in enumerate(boxes) if _cover(box, b) > 0)
        boxes.append(box)
        x0, y0, x1, y1 = box
        objects.append((c, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]))
    draw.owner = 0  # distractors drawn over objects hide them
    for kind in kinds[n_behind:]:
        for _attempt in range(30):
            r = float(rng.uniform(0.05, 0.15)) * size / 2
            cx, cy = float(rng.uniform(0, size)), float(rng.uniform(0, size))
            if fits((cx - r, cy - r, cx + r, cy + r)):
                _distractor(draw, rng, kind, cx, cy, r)
                covered.update(i for i, b in enumerate(boxes) if _cover((cx - r, cy - r, cx + r, cy + r), b) > 0)
                break
    gain, offset = rng.uniform(0.75, 1.25), rng.uniform(-20, 20)
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * gain + offset, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(radius=0.6))
    if masks is not None:
        masks.extend(draw.masks(len(objects)))
    return img, objects, len(covered)


def hard_info(seed: int, classes: int, occluded: int, objects: int) -> dict:
    """What a hard set's annotation file says about itself (its ``info``)."""
    return {"description": f"spnas demo scenes, hard variant (seed {seed})", "variant": "hard",
            "classes": [s.name for s in SHAPES[:classes]],
            "objects_per_image": list(HARD_OBJECTS),
            "box_side": {"range": list(HARD_BOX_SIDE), "of": "image side", "measure": "longer box side",
                         "drawn_size": list(HARD_DRAWN_SIZE), "distribution": "log-uniform"},
            "distractors_per_image": list(HARD_DISTRACTORS), "distractor_kinds": list(HARD_DISTRACTOR_KINDS),
            "distractors_annotated": False,
            "occlusion": {"max_cover_of_a_box": HARD_MAX_COVER, "boxes": "full object extent",
                          "objects_partly_covered": occluded, "objects": objects},
            "colour_jitter_std": HARD_COLOUR_JITTER, "lighting": {"gain": [0.75, 1.25], "offset": [-20, 20]}}


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed RLE of a ``uint8 [H, W]`` mask (JSON-ready)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_demo_dataset(out: str | Path, train: int = 240, val: int = 60, size: int = 160,
                       classes: int | None = None, seed: int = 0, progress: bool = False, hard: bool = False) -> Path:
    """Write the demo set in COCO layout under ``out`` and return ``out``. Category ids are
    ``1..classes`` (default 3, or all 8 for the ``hard`` set); image and annotation ids start
    at 1."""
    for name, v, lo in (("train", train, 1), ("val", val, 1), ("size", size, 64)):
        checks.integer(v, f"demo-data --{name}", lo)
    checks.boolean(hard, "demo-data --hard")
    classes = (len(SHAPES) if hard else 3) if classes is None else classes
    checks.integer(classes, "demo-data --classes", 1, len(SHAPES))
    out = Path(out)
    categories = [{"id": i + 1, "name": SHAPES[i].name, "supercategory": "shape"} for i in range(classes)]
    for split, count in (("train", train), ("val", val)):
        images, annotations, occluded = [], [], 0
        it = range(count)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"demo {split}", unit="img")
        for i in it:
            masks: list[np.ndarray] = []
            if hard:
                img, objects, n_covered = render_hard_scene(seed, split, i, size, classes, masks=masks)
                occluded += n_covered
            else:
                img, objects = render_scene(seed, split, i, size, classes, masks=masks)
            file_name = f"{i + 1:012d}.jpg"
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=92)
            atomic_write_bytes(out / f"{split}2017" / file_name, buf.getvalue())
            images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
            label_map = np.zeros((size, size), dtype=np.uint8)
            for (c, (x, y, w, h)), mask in zip(objects, masks, strict=True):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                                    "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0,
                                    "segmentation": _rle(mask)})
                label_map[mask.astype(bool)] = c + 1  # visible pixels: the masks do not overlap
            buf = io.BytesIO()
            Image.fromarray(label_map).save(buf, format="PNG", optimize=True)
            atomic_write_bytes(out / "annotations" / f"semantic_{split}2017" / f"{i + 1:012d}.png", buf.getvalue())
        info = hard_info(seed, classes, occluded, len(annotations)) if hard else \
            {"description": f"spnas demo scenes (seed {seed})"}
        atomic_write_json(out / "annotations" / f"instances_{split}2017.json",
                          {"info": info, "images": images, "annotations": annotations, "categories": categories})
        log.info("wrote %d %s images with %d objects to %s", count, split, len(annotations), out)
    return out
