"""Helpers to write small COCO data sets for tests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from spnas.demo_data import write_demo_dataset


def demo(tmp: Path, train: int = 24, val: int = 8, classes: int = 3, seed: int = 0, size: int = 160) -> Path:
    return write_demo_dataset(tmp, train=train, val=val, classes=classes, seed=seed, size=size)


def load_ann(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def save_ann(root: Path, data, split: str = "train") -> Path:
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(data))
    return path


def remap_categories(src: Path, dst: Path, mapping: dict[int, int]) -> Path:
    """Copy a data set, renumbering category ids (e.g. {1: 3, 2: 7, 3: 12})."""
    shutil.copytree(src, dst)
    for split in ("train", "val"):
        d = load_ann(dst, split)
        for c in d["categories"]:
            c["id"] = mapping[c["id"]]
        for a in d["annotations"]:
            a["category_id"] = mapping[a["category_id"]]
        save_ann(dst, d, split)
    return dst
