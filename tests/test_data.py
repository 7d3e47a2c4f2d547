"""Demo data and the COCO loader: layout, determinism, label mapping and every bad input."""
import hashlib
import logging

import pytest
import torch
from helpers import demo, load_ann, remap_categories, save_ann

from spnas.data.coco import load_split, make_loader
from spnas.data.demo import write_demo_dataset
from spnas.utils.errors import DataError


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_data_layout_and_content(tmp_path):
    root = demo(tmp_path / "d", train=20, val=6, classes=4)
    for split, n in (("train", 20), ("val", 6)):
        ann = load_ann(root, split)
        assert len(ann["images"]) == n
        assert len(list((root / f"{split}2017").glob("*.jpg"))) == n
        assert [c["id"] for c in ann["categories"]] == [1, 2, 3, 4]
        per_image = {}
        for a in ann["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160 and w > 4 and h > 4
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert set(per_image) == {im["id"] for im in ann["images"]}  # every image has objects
        assert max(per_image.values()) <= 4
    assert load_split(root, "train", train=True).num_classes == 5


def test_demo_data_is_deterministic_and_prefix_stable(tmp_path):
    a = demo(tmp_path / "a", train=10, val=4, seed=3)
    b = demo(tmp_path / "b", train=10, val=4, seed=3)
    c = demo(tmp_path / "c", train=10, val=4, seed=4)
    assert _digest(a) == _digest(b) != _digest(c)
    big = demo(tmp_path / "big", train=14, val=4, seed=3)
    assert (big / "train2017" / "000000000010.jpg").read_bytes() == (a / "train2017" / "000000000010.jpg").read_bytes()


def _digests(root, without_masks=False):
    """(annotation files, images) sha256 of a data set; ``without_masks``: of the annotation
    files with every ``segmentation`` removed, written as the generator writes them."""
    import json
    ann, img = hashlib.sha256(), hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix != ".png":  # the label maps (later than the pins) are pinned apart
            h = ann if p.suffix == ".json" else img
            h.update(p.relative_to(root).as_posix().encode())
            data = p.read_bytes()
            if without_masks and p.suffix == ".json":
                doc = json.loads(data)
                for a in doc["annotations"]:
                    a.pop("segmentation")
                data = (json.dumps(doc, indent=2) + "\n").encode()
            h.update(data)
    return ann.hexdigest(), img.hexdigest()


#: The label maps' pixels (pinned when they were added; their agreement with the masks is
#: checked in test_semantic.py).
LABELS_A = "46ff0ce1f4fb6ae9ef14d98fc223aa5b11bfc46ad02654fd072c708ac30c2026"
LABELS_B = "abc7818b55e190e52ed295f6de3d40737a373feaca6990ca0e9d9493925cb49f"


def test_easy_demo_data_is_unchanged(tmp_path):
    """The default demo set is byte for byte what it was before the hard variant existed and
    before masks (the first pins were made with that code; without its masks the set still
    gives them); the second pins hold the masks. The images are JPEG bytes: a Pillow with
    another libjpeg may change them, the annotations never."""
    a, b = demo(tmp_path / "a", train=3, val=2, size=96), demo(tmp_path / "b", train=2, val=1, classes=8, seed=5)
    assert _digests(a, without_masks=True) == (
        "025022ae302b192bbfd738a3cfb5a1ff9620741899bd055cbaa7166de4ad5b9a",
        "612b4aeb9b287c52d974dae88cb66f147b2edcc9895ca87a64d21e75caa54f1b")
    assert _digests(b, without_masks=True) == (
        "6152fc368ca93d26070a0a3f110c4fbd884c04a92f7f6d215834250860b53653",
        "7bbc6b18406ce7e38ffde6ddccc2d052d1c55153cee099ddca65e24046303d96")
    assert _digests(a)[0] == "6635423e564d04ae73cd88f3e33895a1b7513e16ddbffc96e84e1b2be6d0a896" and _digests(b)[0] == "aecce959be116bb7cddca76468a2e356857414fa476560b576a7230f3e3c435f"
    assert _label_digest(a) == LABELS_A and _label_digest(b) == LABELS_B


def _label_digest(root) -> str:
    """sha256 of the demo's label maps as decoded pixels (not PNG bytes, which a zlib may change)."""
    import numpy as np
    from PIL import Image
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def test_hard_demo_data_is_deterministic_and_differs_from_the_easy_set(tmp_path):
    a = write_demo_dataset(tmp_path / "a", train=4, val=2, size=96, seed=3, hard=True)
    b = write_demo_dataset(tmp_path / "b", train=4, val=2, size=96, seed=3, hard=True)
    c = write_demo_dataset(tmp_path / "c", train=4, val=2, size=96, seed=4, hard=True)
    easy = write_demo_dataset(tmp_path / "e", train=4, val=2, size=96, seed=3, classes=8)
    assert _digests(a) == _digests(b)
    assert _digests(c)[1] != _digests(a)[1] != _digests(easy)[1]
    big = write_demo_dataset(tmp_path / "big", train=6, val=2, size=96, seed=3, hard=True)
    for i in (1, 4):  # image i depends only on (seed, split, i)
        assert (big / "train2017" / f"{i:012d}.jpg").read_bytes() == (a / "train2017" / f"{i:012d}.jpg").read_bytes()


def test_hard_demo_data_content(tmp_path):
    """COCO-valid, all 8 classes, 1-10 objects per image, every longer box side within the
    documented range and spread across it, occlusion present, and an info that says so."""
    from spnas.data.demo import HARD_BOX_SIDE, HARD_OBJECTS
    size = 128
    root = write_demo_dataset(tmp_path / "h", train=40, val=4, size=size, hard=True)
    assert load_split(root, "train", train=True).num_classes == 9
    assert len(load_split(root, "val", train=False)) == 4
    ann = load_ann(root)
    assert [c["name"] for c in ann["categories"]] == ["circle", "square", "triangle", "cross", "diamond", "ring",
                                                      "hexagon", "bar"]
    sides, per_image = [], {}
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
        sides.append(max(w, h) / size)
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert set(per_image) == set(range(1, 41))
    assert min(per_image.values()) >= 1 and max(per_image.values()) <= HARD_OBJECTS[1]
    assert len({a["category_id"] for a in ann["annotations"]}) == 8
    assert HARD_BOX_SIDE[0] <= min(sides) and max(sides) <= HARD_BOX_SIDE[1]
    assert min(sides) < 0.07 and max(sides) > 0.4  # spread over the range, small objects included
    info = ann["info"]
    assert info["variant"] == "hard" and info["box_side"]["range"] == list(HARD_BOX_SIDE)
    assert info["occlusion"]["objects"] == len(ann["annotations"]) and info["occlusion"]["objects_partly_covered"] > 0
    assert load_ann(demo(tmp_path / "e", train=1, val=1))["info"] == {"description": "spnas demo scenes (seed 0)"}


def test_demo_data_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"--classes: must be an integer in \[1, 8\], got 9"):
        write_demo_dataset(tmp_path, classes=9)
    with pytest.raises(ValueError, match="--size: must be an integer >= 64, got 10"):
        write_demo_dataset(tmp_path, size=10)


def test_non_contiguous_category_ids_map_to_contiguous_labels(tmp_path):
    src = demo(tmp_path / "d", train=12, val=4)
    root = remap_categories(src, tmp_path / "r", {1: 3, 2: 7, 3: 12})
    ds = load_split(root, "train", train=True)
    assert ds.cat_ids == [3, 7, 12] and ds.num_classes == 4
    assert ds.label_to_cat == {1: 3, 2: 7, 3: 12}
    raw = load_ann(root)
    first = [a["category_id"] for a in raw["annotations"] if a["image_id"] == ds.records[0]["id"]]
    assert [ds.label_to_cat[lab] for lab in ds.records[0]["labels"]] == first


def test_training_drops_images_without_boxes_evaluation_keeps_them(tmp_path):
    root = demo(tmp_path / "d", train=10, val=4)
    ann = load_ann(root)
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] not in (2, 5)]
    save_ann(root, ann)
    assert len(load_split(root, "train", train=True)) == 8
    assert len(load_split(root, "train", train=False)) == 10


def test_samples_and_seeded_flips(tmp_path):
    root = demo(tmp_path / "d", train=16, val=4)
    plain = load_split(root, "train", train=False)
    ds = load_split(root, "train", train=True, seed=1)
    flips = 0
    for i in range(len(ds)):
        img, tgt = ds[i]
        ref_img, ref = plain[i]
        assert img.dtype == torch.float32 and tuple(img.shape) == (3, 160, 160) and img.min() >= 0 and img.max() <= 1
        if torch.equal(img, ref_img):
            assert torch.equal(tgt["boxes"], ref["boxes"])
        else:
            flips += 1
            assert torch.equal(img, ref_img.flip(-1))
            assert torch.allclose(tgt["boxes"][:, [0, 2]], 160 - ref["boxes"][:, [2, 0]])
    assert 0 < flips < len(ds)
    again = load_split(root, "train", train=True, seed=1)
    assert all(torch.equal(ds[i][0], again[i][0]) for i in range(len(ds)))
    l1 = [t["image_id"] for _, ts in make_loader(ds, 4, True, seed=0, epoch=2) for t in ts]
    l2 = [t["image_id"] for _, ts in make_loader(ds, 4, True, seed=0, epoch=2) for t in ts]
    l3 = [t["image_id"] for _, ts in make_loader(ds, 4, True, seed=0, epoch=3) for t in ts]
    assert l1 == l2 != l3 and sorted(l1) == sorted(l3)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def root(tmp_path):
    return demo(tmp_path / "d", train=8, val=4)


def test_missing_annotation_file(tmp_path, root):
    (root / "annotations" / "instances_train2017.json").unlink()
    with pytest.raises(DataError, match="annotation file '.*instances_train2017.json' does not exist"):
        load_split(root, "train", train=True)
    with pytest.raises(DataError, match="dataset folder '.*nowhere' does not exist"):
        load_split(tmp_path / "nowhere", "train", train=True)


def test_unreadable_and_non_json_annotation(root):
    path = root / "annotations" / "instances_train2017.json"
    path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(DataError, match="cannot be read|is not valid JSON"):
        load_split(root, "train", train=True)
    path.write_text("{\"images\": [")
    with pytest.raises(DataError, match="is not valid JSON"):
        load_split(root, "train", train=True)


def _ann0(**fields):
    """Keep only the first annotation, with ``fields`` changed."""
    return lambda d: {**d, "annotations": [{**d["annotations"][0], **fields}]}


def _img0(**fields):
    """Keep only the first image, with ``fields`` changed."""
    return lambda d: {**d, "images": [{**d["images"][0], **fields}]}


def _cat0(**fields):
    """Change ``fields`` of the first category."""
    return lambda d: {**d, "categories": [{**d["categories"][0], **fields}] + d["categories"][1:]}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: [1, 2], "is not COCO: the top level is a list"),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, "is not COCO: it has no 'categories' list"),
    (lambda d: {**d, "images": {}}, "'images' is a dict, not a list"),
    (lambda d: {**d, "categories": []}, "has no categories"),
    (lambda d: {**d, "images": d["images"] + [d["images"][0]]}, "repeats id 1"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": 999}]}, "unknown image_id 999"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": 42}]}, "unknown category_id 42"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [1, 2, 3]}]}, "bbox \\[1, 2, 3\\] is not"),
    (lambda d: {**d, "annotations": [{k: v for k, v in d["annotations"][0].items() if k != "bbox"}]}, "has no 'bbox'"),
    (lambda d: {**d, "images": [{**d["images"][0], "file_name": "../../etc/passwd"}]}, "points outside the image folder"),
    (lambda d: {**d, "images": [{**d["images"][0], "file_name": "/etc/passwd"}]}, "points outside the image folder"),
    (lambda d: {**d, "images": [{**d["images"][0], "id": "1"}]}, "id '1' is not an integer"),
    # hostile values: each is an error naming the file and the entry, never a crash or NaN in the model
    (lambda d: {**d, "annotations": d["annotations"] + [{**d["annotations"][0], "bbox": [1, 1, 5, 5]}]},
     "annotations\\[{n}\\] repeats id 1"),  # {n}: the appended entry's index
    (_ann0(bbox=[1, 2, float("nan"), 4]), "annotations\\[0\\] bbox \\[1, 2, nan, 4\\] is not \\[x, y, width, height\\] "
                                          "of finite numbers"),
    (_ann0(bbox=[1, 2, float("inf"), 4]), "bbox \\[1, 2, inf, 4\\] is not"),
    (_ann0(bbox=[-float("inf"), 2, 3, 4]), "bbox \\[-inf, 2, 3, 4\\] is not"),
    (_ann0(bbox=["1", "2", "3", "4"]), "bbox \\['1', '2', '3', '4'\\] is not"),
    (_ann0(bbox="1 2 3 4"), "bbox '1 2 3 4' is not"),
    (_ann0(bbox=[1, 2, True, 4]), "bbox \\[1, 2, True, 4\\] is not"),
    (_ann0(category_id="1"), "annotations\\[0\\] category_id '1' is not an integer"),
    (_ann0(category_id=1.0), "annotations\\[0\\] category_id 1.0 is not an integer"),
    (_ann0(category_id=[1]), "annotations\\[0\\] category_id \\[1\\] is not an integer"),
    (_ann0(image_id=None), "annotations\\[0\\] image_id None is not an integer"),
    (_img0(width=-160), "images\\[0\\] width -160 is not a positive number"),
    (_img0(height=0), "images\\[0\\] height 0 is not a positive number"),
    (_img0(height="160"), "images\\[0\\] height '160' is not a positive number"),
    (_img0(width=float("inf")), "images\\[0\\] width inf is not a positive number"),
    (_cat0(id="1"), "categories\\[0\\] id '1' is not an integer"),
    (_cat0(id=1.0), "categories\\[0\\] id 1.0 is not an integer"),
])
def test_malformed_coco_is_rejected(root, mutate, message):
    raw = load_ann(root)
    save_ann(root, mutate(raw))
    message = message.replace("{n}", str(len(raw["annotations"])))
    with pytest.raises(DataError, match="instances_train2017.json'.*" + message):
        load_split(root, "train", train=True)


def test_bad_boxes_are_skipped_and_counted_or_rejected(root, caplog):
    ann = load_ann(root)
    a0, a1 = ann["annotations"][0], ann["annotations"][1]
    a0["bbox"] = [150.0, 150.0, 40.0, 40.0]   # outside a 160x160 image
    a1["bbox"] = [10.0, 10.0, 0.0, 5.0]       # zero width
    save_ann(root, ann)
    with caplog.at_level(logging.WARNING, logger="spnas.data"):
        ds = load_split(root, "train", train=False)
    assert ds.skipped == {"outside": 1, "non_positive": 1, "crowd": 0}
    assert "skipped 1 box(es) outside the image, 1 with non-positive size" in caplog.text
    assert sum(len(r["boxes"]) for r in ds.records) == len(ann["annotations"]) - 2
    with pytest.raises(DataError, match=f"annotation {a0['id']} bbox .* lies outside image"):
        load_split(root, "train", train=False, bad_boxes="error")


@pytest.mark.parametrize("bbox, kind", [
    ([0.0, 0.0, 1e30, 10.0], "outside"),          # huge width: past the 160x160 image
    ([1e30, 1e30, 1e30, 1e30], "outside"),
    ([-1e30, 0.0, 1e30, 10.0], "outside"),        # starts far left of the image
    ([0.0, 0.0, 1e308, 1e308], "outside"),        # float32(1e308) would be inf
    ([10.0, 10.0, -5.0, 5.0], "non_positive"),    # negative width
])
def test_hostile_boxes_are_skipped_counted_and_logged(root, caplog, bbox, kind):
    ann = load_ann(root)
    ann["annotations"][0]["bbox"] = bbox
    save_ann(root, ann)
    with caplog.at_level(logging.WARNING, logger="spnas.data"):
        ds = load_split(root, "train", train=False)
    assert ds.skipped == {"outside": 0, "non_positive": 0, "crowd": 0, kind: 1}
    assert "skipped" in caplog.text and "instances_train2017.json" in caplog.text
    boxes = torch.tensor([b for r in ds.records for b in r["boxes"]], dtype=torch.float32)
    assert len(boxes) == len(ann["annotations"]) - 1
    assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= 160).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    with pytest.raises(DataError, match=f"annotation {ann['annotations'][0]['id']} bbox .* image"):
        load_split(root, "train", train=False, bad_boxes="error")


def test_missing_images_are_listed(root):
    (root / "train2017" / "000000000003.jpg").unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) listed in .* are missing from .*\\['000000000003.jpg'\\]"):
        load_split(root, "train", train=True)


def test_empty_training_set(root):
    ann = load_ann(root)
    ann["annotations"] = []
    save_ann(root, ann)
    with pytest.raises(DataError, match="gives an empty training set \\(no image has a usable box\\)"):
        load_split(root, "train", train=True)


def test_undecodable_image(root):
    (root / "train2017" / "000000000001.jpg").write_bytes(b"not an image")
    ds = load_split(root, "train", train=True)
    with pytest.raises(DataError, match="000000000001.jpg' cannot be decoded"):
        ds[0]
