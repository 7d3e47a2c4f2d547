"""COCO-format detection data, read with pycocotools.

Standard layout (Vega's ``CocoDataset``)::

    data_root/annotations/{ann_prefix}_{split}{img_prefix}.json   e.g. instances_train2017.json
    data_root/{split}{img_prefix}/                                 e.g. train2017/

Category ids are mapped to contiguous labels ``1..K`` (0 is background) and back for
evaluation. Training drops images without usable boxes; evaluation keeps every image.
Malformed input is rejected with a :class:`DataError` naming the file and the entry, or, for
individual bad boxes, skipped and counted in one warning.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.errors import DataError, brief

log = logging.getLogger(__name__)

#: Largest image side accepted (pixels). float32 counts whole pixels exactly up to 2**24, and
#: boxes of images without a width/height are clipped to it, so no inf reaches the model.
MAX_SIDE = 1 << 24


@dataclass(frozen=True)
class CocoSplit:
    """Where one split lives: the annotation file and the image folder."""

    ann_file: Path
    img_dir: Path


def resolve_split(data_root: str | os.PathLike, split: str, img_prefix: str = "2017",
                  ann_prefix: str = "instances") -> CocoSplit:
    """The standard COCO layout under ``data_root`` for ``split`` (``train``/``val``)."""
    from ..storage import is_uri, local_path
    if is_uri(str(data_root)):  # s3:// or minio://: fetched once into the ETag-keyed cache
        data_root = local_path(str(data_root))
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist")
    return CocoSplit(root / "annotations" / f"{ann_prefix}_{split}{img_prefix}.json", root / f"{split}{img_prefix}")


def _load_coco(ann_file: Path):
    import json

    from pycocotools.coco import COCO
    if not ann_file.is_file():
        raise DataError(f"annotation file {str(ann_file)!r} does not exist")
    try:
        with open(ann_file, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {str(ann_file)!r} cannot be read: {exc}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of over 4300 digits, deep nesting
        raise DataError(f"annotation file {str(ann_file)!r} is not valid JSON: {exc}") from None
    _validate_coco(raw, ann_file)
    coco = COCO()
    coco.dataset = raw
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _finite_number(value: Any) -> bool:
    """True for an int or float (not bool) that is finite as a float (huge ints are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _validate_coco(raw: Any, ann_file: Path) -> None:
    where = f"annotation file {str(ann_file)!r}"
    if not isinstance(raw, dict):
        raise DataError(f"{where} is not COCO: the top level is a {type(raw).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if key not in raw:
            raise DataError(f"{where} is not COCO: it has no {key!r} list")
        if not isinstance(raw[key], list):
            raise DataError(f"{where} is not COCO: {key!r} is a {type(raw[key]).__name__}, not a list")
    if not raw["categories"]:
        raise DataError(f"{where} has no categories")
    seen: dict[str, set] = {"images": set(), "categories": set(), "annotations": set()}
    for kind, required in (("categories", ("id", "name")), ("images", ("id", "file_name")),
                           ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for n, entry in enumerate(raw[kind]):
            if not isinstance(entry, dict):
                raise DataError(f"{where}: {kind}[{n}] is not an object")
            for key in required:
                if key not in entry:
                    raise DataError(f"{where}: {kind}[{n}] has no {key!r}")
            if isinstance(entry["id"], bool) or not isinstance(entry["id"], int):
                raise DataError(f"{where}: {kind}[{n}] id {brief(entry['id'])} is not an integer")
            if entry["id"] in seen[kind]:
                raise DataError(f"{where}: {kind}[{n}] repeats id {entry['id']}")
            seen[kind].add(entry["id"])
    for n, cat in enumerate(raw["categories"]):
        if not isinstance(cat["name"], str):
            raise DataError(f"{where}: categories[{n}] name {brief(cat['name'])} is not a string")
    for n, img in enumerate(raw["images"]):
        name = img["file_name"]
        if not isinstance(name, str) or not name or "\x00" in name:
            raise DataError(f"{where}: images[{n}] file_name {brief(name)} is not a file name")
        parts = Path(name).parts
        if os.path.isabs(name) or ".." in parts or name.startswith(("/", "\\")):
            raise DataError(f"{where}: images[{n}] file_name {brief(name)} points outside the image folder")
        for key in ("width", "height"):
            if key in img and not (_finite_number(img[key]) and 0 < img[key] <= MAX_SIDE):
                raise DataError(f"{where}: images[{n}] {key} {brief(img[key])} is not a positive number "
                                f"up to {MAX_SIDE}")
    for n, ann in enumerate(raw["annotations"]):
        for key, kind in (("image_id", "images"), ("category_id", "categories")):
            ref = ann[key]
            if isinstance(ref, bool) or not isinstance(ref, int):
                raise DataError(f"{where}: annotations[{n}] {key} {brief(ref)} is not an integer")
            if ref not in seen[kind]:
                raise DataError(f"{where}: annotations[{n}] refers to unknown {key} {brief(ref)}")
        b = ann["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(_finite_number(v) for v in b)):
            raise DataError(f"{where}: annotations[{n}] bbox {brief(b)} is not [x, y, width, height] "
                            "of finite numbers")


def _hflip_flag(seed: int, epoch: int, index: int) -> bool:
    return random.Random((seed * 1_000_003 + epoch) * 1_000_033 + index).random() < 0.5


class CocoDetection(Dataset):
    """A COCO split as torchvision detection samples.

    ``dataset[i] -> (image, target)``: image ``float32 [3, H, W]`` in ``[0, 1]``; target
    ``{"boxes": float32 [N, 4] (x0, y0, x1, y1), "labels": int64 [N] in 1..K, "image_id": int}``
    and, with ``masks=True``, ``"masks": uint8 [N, H, W]`` (0/1, from each annotation's polygons
    or RLE, :mod:`.masks`; an annotation without a usable mask is skipped and counted like a bad
    box, or an error under ``bad_boxes="error"``); with ``semantic=True``, ``"sem_seg": int64
    [H, W]``, the image's label map (0 background, ``1..K``, 255 ignored; from the PNGs in
    ``label_dir`` when that folder exists, else painted from the instance masks: :mod:`.semantic`).
    ``train=True`` drops images without usable boxes (not for ``semantic``: a scene of background
    alone still teaches) and flips horizontally with probability 0.5, decided by ``(seed, epoch, index)`` (call
    :meth:`set_epoch`), so any worker count and any resume point give the same samples.
    """

    def __init__(self, ann_file: str | os.PathLike, img_dir: str | os.PathLike, train: bool = False,
                 seed: int = 0, bad_boxes: str = "skip", hflip: bool = True, masks: bool = False,
                 semantic: bool = False, label_dir: str | os.PathLike | None = None) -> None:
        if bad_boxes not in ("skip", "error"):
            raise ValueError(f"bad_boxes must be 'skip' or 'error', got {bad_boxes!r}")
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        self.train, self.seed, self.hflip, self.epoch = train, seed, hflip and train, 0
        self.masks, self.semantic = masks, semantic
        if not self.img_dir.is_dir():
            raise DataError(f"image folder {str(self.img_dir)!r} does not exist")
        self.coco = _load_coco(self.ann_file)
        self.cat_ids: list[int] = sorted(self.coco.getCatIds())
        self.cat_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}

        missing = [img["file_name"] for img in self.coco.dataset["images"] if not self._is_file(img["file_name"])]
        if missing:
            raise DataError(f"{len(missing)} image(s) listed in {str(self.ann_file)!r} are missing from "
                            f"{str(self.img_dir)!r}, e.g. {missing[:3]}")

        self.skipped: dict[str, int] = {"outside": 0, "non_positive": 0, "crowd": 0}
        if masks:
            self.skipped.update({"no_mask": 0, "empty_mask": 0})
        self.label_dir: Path | None = None
        if semantic:
            self._setup_semantic(label_dir)
        self.records: list[dict[str, Any]] = []
        for img in sorted(self.coco.dataset["images"], key=lambda r: r["id"]):
            boxes, labels, rles = self._boxes_for(img, bad_boxes)
            if train and not boxes and not semantic:
                continue
            rec = {"id": img["id"], "file_name": img["file_name"], "boxes": boxes, "labels": labels}
            if masks:
                rec["masks"], rec["size"] = rles, (int(img["height"]), int(img["width"]))
            if semantic and self.label_dir is None:
                rec["layers"], rec["size"] = self._layers_for(img, bad_boxes), (int(img["height"]), int(img["width"]))
            self.records.append(rec)
        if any(self.skipped.values()):
            log.warning("%s: skipped %d box(es) outside the image, %d with non-positive size, %d crowd%s",
                        self.ann_file, self.skipped["outside"], self.skipped["non_positive"], self.skipped["crowd"],
                        f", {self.skipped['no_mask']} without a segmentation, {self.skipped['empty_mask']} with an "
                        "empty mask" if "no_mask" in self.skipped else "")
        if not self.records:
            raise DataError(f"{str(self.ann_file)!r} gives an empty {'training' if train else 'evaluation'} set"
                            + ((" (no image has a usable box with a mask: skipped "
                                f"{self.skipped['no_mask']} annotation(s) without a segmentation, "
                                f"{self.skipped['empty_mask']} with an empty one)" if masks else
                                " (no image has a usable box)") if train else ""))

    def _setup_semantic(self, label_dir: str | os.PathLike | None) -> None:
        """Label maps: the PNG folder when it exists (every image's map present), else painted
        from the instance masks (integer image sizes needed)."""
        from .semantic import check_categories, label_file, lookup_table
        check_categories(self.cat_ids, f"annotation file {str(self.ann_file)!r}")
        self.lut = lookup_table(self.cat_to_label)
        if label_dir is not None and Path(label_dir).is_dir():
            self.label_dir = Path(label_dir)
            missing = [img["file_name"] for img in self.coco.dataset["images"]
                       if not label_file(self.label_dir, img["file_name"]).is_file()]
            if missing:
                raise DataError(f"{len(missing)} label map(s) of the images in {str(self.ann_file)!r} are missing "
                                f"from {str(self.label_dir)!r}, e.g. "
                                f"{[str(label_file(self.label_dir, m).name) for m in missing[:3]]}")
            log.info("%s: semantic label maps read from %s", self.ann_file, self.label_dir)
        else:
            self.skipped.update({"no_mask": 0, "empty_mask": 0})
            log.info("%s: no label map folder%s; semantic label maps painted from the instance masks", self.ann_file,
                     f" {str(label_dir)!r}" if label_dir is not None else "")

    def _layers_for(self, img: dict, bad_boxes: str) -> list[tuple[int, dict]]:
        """``(label, compressed RLE)`` of every annotation of ``img`` in file order (crowd regions
        labelled ignore), for painting its label map."""
        from .masks import MaskProblem, annotation_rle
        from .semantic import IGNORE_VALUE
        w, h = img.get("width"), img.get("height")
        if w is None or h is None or int(w) != w or int(h) != h:
            raise DataError(f"{str(self.ann_file)!r}: image {img['id']} has no integer width and height "
                            f"({brief(w)} x {brief(h)}): label maps painted from instance masks need them")
        layers = []
        for ann in self.coco.imgToAnns.get(img["id"], []):
            try:
                rle = annotation_rle(ann, int(h), int(w), repr(str(self.ann_file)))
            except MaskProblem as exc:
                if bad_boxes == "error":
                    raise DataError(str(exc)) from None
                self.skipped["no_mask" if exc.kind == "missing" else "empty_mask"] += 1
                continue
            layers.append((IGNORE_VALUE if ann.get("iscrowd", 0) else self.cat_to_label[ann["category_id"]], rle))
        return layers

    def label_map(self, index: int, shape: Any) -> np.ndarray:
        """``int64 [H, W]`` label map of record ``index`` (an image of ``shape`` (H, W))."""
        from .semantic import label_file, paint_instances, read_label_map
        rec = self.records[index]
        if self.label_dir is not None:
            return read_label_map(label_file(self.label_dir, rec["file_name"]), tuple(shape), self.lut)
        if tuple(shape) != rec["size"]:
            raise DataError(f"{str(self.ann_file)!r}: image {rec['id']} is {shape[0]} x {shape[1]} px in "
                            f"{str(self.img_dir / rec['file_name'])!r} but {rec['size'][0]} x {rec['size'][1]} in the "
                            "annotations: its masks would not fit")
        return paint_instances(rec["layers"], rec["size"])

    def _is_file(self, name: str) -> bool:
        """``img_dir/name`` is a file; a name the OS refuses (too long, ...) is a DataError."""
        try:
            return (self.img_dir / name).is_file()
        except (OSError, ValueError) as exc:
            raise DataError(f"{str(self.ann_file)!r}: image file_name {brief(name)} cannot be checked "
                            f"in {str(self.img_dir)!r}: {exc}") from None

    def _boxes_for(self, img: dict, bad_boxes: str) -> tuple[list[list[float]], list[int], list[dict]]:
        """Boxes ``[x0, y0, x1, y1]`` clipped to the image, with positive size after clipping,
        their labels and (``masks``) their compressed RLE masks (:mod:`.masks`).

        Without a width (height) in the file, only boxes reaching past :data:`MAX_SIDE` count
        as outside and the clip is at ``MAX_SIDE``; masks need both."""
        from .masks import MaskProblem, annotation_rle
        w, h = img.get("width"), img.get("height")
        if self.masks and (w is None or h is None or int(w) != w or int(h) != h):
            raise DataError(f"{str(self.ann_file)!r}: image {img['id']} has no integer width and height "
                            f"({brief(w)} x {brief(h)}): instance masks need them")
        rles: list[dict] = []
        wmax = float(w) if w is not None else float(MAX_SIDE)
        hmax = float(h) if h is not None else float(MAX_SIDE)
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(img["id"], []):
            if ann.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            problem = None
            if bw <= 0 or bh <= 0:
                problem = "non_positive"
            elif (w is not None and x < -1) or (h is not None and y < -1) or x + bw > wmax + 1 or y + bh > hmax + 1:
                problem = "outside"
            else:  # clipped to the image (all in [0, MAX_SIDE + 1]) and rounded as the model sees it, in float32
                x0, y0, x1, y1 = (float(np.float32(v)) for v in (
                    max(0.0, x), max(0.0, y), min(wmax, max(0.0, x + bw)), min(hmax, max(0.0, y + bh))))
                if x1 <= x0 or y1 <= y0:  # nothing left inside ([-1, -1, 0.5, 0.5]) or thinner than float32 resolves
                    problem = "outside" if x + bw <= 0 or y + bh <= 0 or x >= wmax or y >= hmax else "non_positive"
            if problem:
                if bad_boxes == "error":
                    raise DataError(f"{str(self.ann_file)!r}: annotation {ann['id']} bbox {ann['bbox']} "
                                    f"{'lies outside' if problem == 'outside' else 'has non-positive size in'} "
                                    f"image {img['id']} ({w}x{h})")
                self.skipped[problem] += 1
                continue
            if self.masks:
                try:
                    rles.append(annotation_rle(ann, int(h), int(w), repr(str(self.ann_file))))
                except MaskProblem as exc:
                    if bad_boxes == "error":
                        raise DataError(str(exc)) from None
                    self.skipped["no_mask" if exc.kind == "missing" else "empty_mask"] += 1
                    continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[ann["category_id"]])
        return boxes, labels, rles

    @property
    def num_classes(self) -> int:
        """Number of object classes + 1 (background), as torchvision's FasterRCNN counts."""
        return len(self.cat_ids) + 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, index: int) -> torch.Tensor:
        """The image as ``uint8 [3, H, W]`` RGB (decoded by Pillow)."""
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor
        path = self.img_dir / self.records[index]["file_name"]
        try:
            with Image.open(path) as im:
                return pil_to_tensor(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"image {str(path)!r} cannot be decoded: {exc}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rec = self.records[index]
        image = self.read_image(index).float().div_(255)
        boxes = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(rec["labels"], dtype=torch.int64)
        target: dict[str, Any] = {"boxes": boxes, "labels": labels, "image_id": rec["id"]}
        if self.masks:
            target["masks"] = self._masks(index, image.shape[-2:])
        if self.semantic:
            target["sem_seg"] = torch.from_numpy(self.label_map(index, image.shape[-2:]))
        if self.hflip and _hflip_flag(self.seed, self.epoch, index):
            image = image.flip(-1)
            width = image.shape[-1]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
            if self.semantic:
                target["sem_seg"] = target["sem_seg"].flip(-1)
        return image, target

    def _masks(self, index: int, shape: Any) -> torch.Tensor:
        """``uint8 [N, H, W]`` masks of record ``index``, checked against the image's size."""
        from .masks import decode
        rec = self.records[index]
        if tuple(shape) != rec["size"]:
            raise DataError(f"{str(self.ann_file)!r}: image {rec['id']} is {shape[0]} x {shape[1]} px in "
                            f"{str(self.img_dir / rec['file_name'])!r} but {rec['size'][0]} x {rec['size'][1]} in the "
                            "annotations: its masks would not fit")
        if not rec["masks"]:
            return torch.zeros((0, *rec["size"]), dtype=torch.uint8)
        return torch.from_numpy(np.stack([decode(r) for r in rec["masks"]]))


def collate(batch: Sequence) -> tuple:
    return tuple(zip(*batch, strict=False))


def load_split(data_root: str | os.PathLike, split: str, train: bool, seed: int = 0,
               img_prefix: str = "2017", ann_prefix: str = "instances", bad_boxes: str = "skip",
               masks: bool = False, semantic: bool = False) -> CocoDetection:
    """One split of the standard COCO layout under ``data_root`` (see :func:`resolve_split`);
    ``masks``: targets carry the instance masks too; ``semantic``: the label maps
    (``annotations/semantic_<split><img_prefix>/``, else painted from the instance masks)."""
    from .semantic import label_dir
    s = resolve_split(data_root, split, img_prefix, ann_prefix)
    return CocoDetection(s.ann_file, s.img_dir, train=train, seed=seed, bad_boxes=bad_boxes, masks=masks,
                         semantic=semantic, label_dir=label_dir(s.ann_file, img_prefix, split) if semantic else None)


def make_loader(dataset: CocoDetection, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                workers: int = 0, pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader whose order depends only on ``(seed, epoch)`` (and ``rank`` of ``world_size``).

    With ``world_size > 1`` a ``DistributedSampler`` (seeded by ``seed``, its epoch set) gives
    rank ``rank`` every ``world_size``-th image of the epoch's permutation (the permutation is
    padded by repeating its start to a multiple of ``world_size``): together the ranks' batches
    of one step hold ``world_size * batch_size`` distinct images whenever the data set is at
    least that large."""
    dataset.set_epoch(epoch)
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=seed * 10_007, drop_last=False)
        sampler.set_epoch(epoch)
        # a generator of its own: the loader's worker seed is then not drawn from the global RNG
        # (which a resumed training restores: drawing from it here would shift it)
        g = torch.Generator().manual_seed((seed * 10_007 + epoch) * 1_009 + rank)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          pin_memory=pin_memory, persistent_workers=False, generator=g)
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory, persistent_workers=False)


def batches_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of ``n_images`` at ``batch_size`` per process over
    ``world_size`` processes (each process gets ``ceil(n / world_size)`` images)."""
    return math.ceil(math.ceil(n_images / world_size) / batch_size)
