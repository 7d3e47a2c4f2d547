"""Instance masks in the COCO loader (#16): polygons, uncompressed and compressed RLE through
pycocotools, flipped with their boxes, and every malformed mask named or skipped and counted."""
import logging

import numpy as np
import pytest
import torch
from helpers import demo, load_ann, save_ann
from pycocotools import mask as mask_utils

from spnas.data.coco import _hflip_flag, load_split
from spnas.data.masks import compressed_counts
from spnas.utils.errors import DataError

SIZE = 96


@pytest.fixture
def root(tmp_path):
    return demo(tmp_path / "d", train=4, val=2, size=SIZE)


def _square(x0, y0, x1, y1, h=SIZE, w=SIZE):
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed(mask):
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def _three_kinds(root):
    """The first train image's first three annotations as a polygon, an uncompressed RLE and a
    compressed RLE, each a square inside its box; returns the annotation file and the squares."""
    ann = load_ann(root)
    img = ann["images"][0]
    anns = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
    while len(anns) < 3:  # the scene may hold fewer objects: add boxes
        new = dict(anns[0], id=max(a["id"] for a in ann["annotations"]) + 1)
        ann["annotations"].append(new)
        anns.append(new)
    squares = [(4, 6, 30, 40), (50, 10, 90, 30), (20, 60, 70, 90)]
    for a, (x0, y0, x1, y1) in zip(anns, squares, strict=False):
        a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
    x0, y0, x1, y1 = squares[0]
    anns[0]["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    anns[1]["segmentation"] = _uncompressed(_square(*squares[1]))
    rle = mask_utils.encode(_square(*squares[2]))
    anns[2]["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    for a in anns[3:]:
        ann["annotations"].remove(a)
    for a in ann["annotations"]:  # every other annotation: a polygon of its box
        if "segmentation" not in a:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    save_ann(root, ann)
    return ann, img, anns[:3], squares


def test_polygons_and_both_rle_forms_become_the_same_masks(root):
    _, img, anns, squares = _three_kinds(root)
    ds = load_split(root, "train", train=False, masks=True)
    i = [r["id"] for r in ds.records].index(img["id"])
    image, target = ds[i]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), SIZE, SIZE)
    assert ds.skipped == {"outside": 0, "non_positive": 0, "crowd": 0, "no_mask": 0, "empty_mask": 0}
    for k, (x0, y0, x1, y1) in enumerate(squares):
        m = masks[k]
        want = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
        want[y0:y1, x0:x1] = 1
        if k == 0:  # a polygon rasterised by pycocotools: the square up to its boundary pixels
            assert (m != want).sum() <= 2 * ((x1 - x0) + (y1 - y0)) + 4 and m[y0 + 1:y1 - 1, x0 + 1:x1 - 1].all()
        else:  # RLE: exact
            assert torch.equal(m, want), k
    # without masks=True the targets are unchanged
    assert "masks" not in load_split(root, "train", train=False)[i][1]


def test_masks_flip_with_their_boxes(root):
    _three_kinds(root)
    ds = load_split(root, "train", train=True, seed=0, masks=True)
    flipped = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            _, t = ds[i]
            for box, m in zip(t["boxes"], t["masks"], strict=True):
                ys, xs = torch.nonzero(m, as_tuple=True)
                # the mask lies inside its (flipped or not) box
                assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
            flipped += _hflip_flag(0, epoch, i) and t["boxes"].shape[0] > 0
    assert flipped > 0  # some samples were flipped: their masks moved with their boxes


def test_compressed_counts_read_pycocotools_strings():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        m = np.asfortranarray((rng.random((h, w)) < rng.random()).astype(np.uint8))
        rle = mask_utils.encode(m)
        assert compressed_counts(rle["counts"].decode("ascii")) == _uncompressed(m)["counts"]
    assert compressed_counts("\x01") is None and compressed_counts("o") is None  # a bad char, a dangling group


@pytest.mark.parametrize("segmentation, message", [
    ([[1, 2, 3, 4, 5]], r"polygon 0 \[1, 2, 3, 4, 5\] is not \[x1, y1, x2, y2, ...\]"),
    ([[1, 2, 3, 4]], "polygon 0 .* with at least 3 points"),
    ([[1, 2, 3, "x", 5, 6]], "of finite numbers"),
    ({"size": [10, 10], "counts": [SIZE * SIZE]}, r"RLE size \[10, 10\] is not the image's \[height, width\] = "
                                                  rf"\[{SIZE}, {SIZE}\]"),
    ({"size": [SIZE, SIZE], "counts": [5, 5]}, f"RLE counts add up to 10 pixels, not the image's {SIZE} x {SIZE}"),
    ({"size": [SIZE, SIZE], "counts": [5, -5]}, "neither a list of non-negative integers"),
    ({"size": [SIZE, SIZE], "counts": "Pa1"}, "RLE counts add up to"),  # a valid string of the wrong length
    ({"size": [SIZE, SIZE], "counts": "\x00\x01"}, "nor a COCO compressed RLE string"),
    ("square", "is neither a list of polygons nor an RLE object"),
    ([[0, 0, 1e300, 0, 0, 5]], r"polygon 0 has coordinates far outside the 96 x 96 image \(e.g. 1e\+300\)"),  # fuzz:
    # pycocotools' rasteriser crashed the process on it
])
def test_malformed_masks_are_named(root, segmentation, message):
    ann = load_ann(root)
    a = ann["annotations"][0]
    a["segmentation"] = segmentation
    save_ann(root, ann)
    with pytest.raises(DataError, match=f"instances_train2017.json': annotation {a['id']} segmentation .*{message}"):
        load_split(root, "train", train=False, masks=True)
    load_split(root, "train", train=False)  # boxes alone: the segmentation is not read


def test_missing_and_empty_masks_are_skipped_and_counted_or_rejected(root, caplog):
    ann = load_ann(root)
    a0, a1 = ann["annotations"][0], ann["annotations"][1]
    a0.pop("segmentation", None)
    a1["segmentation"] = {"size": [SIZE, SIZE], "counts": [SIZE * SIZE]}  # all background
    for a in ann["annotations"][2:]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    save_ann(root, ann)
    with caplog.at_level(logging.WARNING, logger="spnas.data"):
        ds = load_split(root, "train", train=False, masks=True)
    assert (ds.skipped["no_mask"], ds.skipped["empty_mask"]) == (1, 1)
    assert "1 without a segmentation, 1 with an empty mask" in caplog.text
    assert sum(len(r["boxes"]) for r in ds.records) == len(ann["annotations"]) - 2
    assert all(len(r["masks"]) == len(r["boxes"]) for r in ds.records)
    with pytest.raises(DataError, match=f"annotation {a0['id']} has no segmentation"):
        load_split(root, "train", train=False, masks=True, bad_boxes="error")


def test_masks_need_the_image_size_and_an_image_of_that_size(root):
    ann = load_ann(root)
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    img = ann["images"][0]
    img["height"] = SIZE + 8  # the annotations disagree with the image file
    save_ann(root, ann)
    ds = load_split(root, "train", train=False, masks=True)
    i = [r["id"] for r in ds.records].index(img["id"])
    with pytest.raises(DataError, match=rf"image {img['id']} is {SIZE} x {SIZE} px in .* but {SIZE + 8} x {SIZE} in "
                                        "the annotations"):
        ds[i]
    del img["height"]
    save_ann(root, ann)
    with pytest.raises(DataError, match=f"image {img['id']} has no integer width and height"):
        load_split(root, "train", train=False, masks=True)


@pytest.mark.parametrize("hard", [False, True])
def test_demo_masks_are_the_visible_objects(tmp_path, hard):
    """Every demo annotation (the easy set and the hard one, with its occlusions) has a
    non-empty mask inside its box that the loader reads without a skip."""
    from spnas.data.demo import write_demo_dataset
    root = write_demo_dataset(tmp_path / "d", train=12, val=2, size=SIZE, hard=hard)
    ds = load_split(root, "train", train=False, masks=True)
    assert sum(ds.skipped.values()) == 0
    n = 0
    for i in range(len(ds)):
        _, t = ds[i]
        assert t["masks"].shape[0] == t["boxes"].shape[0] > 0
        for box, m in zip(t["boxes"], t["masks"], strict=True):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert len(xs) > 0
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
            n += 1
    assert n == len(load_ann(root)["annotations"])


def test_a_set_without_masks_says_so_when_masks_are_needed(root):
    ann = load_ann(root)
    for a in ann["annotations"]:
        a.pop("segmentation", None)
    save_ann(root, ann)
    n = len(ann["annotations"])
    with pytest.raises(DataError, match=rf"empty training set \(no image has a usable box with a mask: skipped {n} "
                                        r"annotation\(s\) without a segmentation, 0 with an empty one\)"):
        load_split(root, "train", train=True, masks=True)
