"""COCO evaluation time of spnas.training.evaluation.coco_metrics versus bare pycocotools.

The goal: ``coco_metrics`` (the wrapper every evaluation in this project goes through) adds
next to nothing on top of pycocotools -- median time ratio spnas / bare <= 1.1.

Detections come from a freshly built, randomly initialised demo detector (seed 0,
configs/demo-model.json with ``box_score_thresh=0.0``) run with
``spnas.training.evaluation.predict`` on the demo validation split, so there are many low-score
boxes. If that yields fewer than ``--min-per-image`` detections per image (or with
``--synthetic``), detections are synthesized instead: ground-truth boxes jittered with a seeded
numpy RNG plus random false positives.

The bare side is ``coco_gt.loadRes`` + ``COCOeval(coco_gt, dt, "bbox")`` evaluate / accumulate /
summarize, with pycocotools' prints sent to a buffer exactly as ``coco_metrics`` does. Each call
gets its own fresh copy of the detections (``loadRes`` adds keys to the dicts it is given), made
outside the timing. The two sides alternate so that machine noise hits both alike.

    python bench/eval_speed.py [--repeats 5] [--synthetic] [--data DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spnas.data.coco import CocoDetection, load_split
from spnas.data.demo import write_demo_dataset
from spnas.models.detector import build_detector
from spnas.training.evaluation import coco_metrics, predict

ROOT = Path(__file__).resolve().parent.parent


def model_detections(val_set: CocoDetection, desc_path: Path, batch_size: int) -> list[dict]:
    """Detections of a randomly initialised (seed 0) demo model that keeps every score."""
    desc: dict[str, Any] = json.loads(desc_path.read_text())
    desc["num_classes"] = val_set.num_classes
    desc["box_score_thresh"] = 0.0
    torch.manual_seed(0)
    model = build_detector(desc)
    return predict(model, val_set, "cpu", batch_size)


def synthetic_detections(val_set: CocoDetection, per_image: int, seed: int = 0) -> list[dict]:
    """Jittered ground-truth boxes (a few copies each) plus random false positives, ``per_image``
    detections per image on average, seeded."""
    rng = np.random.default_rng(seed)
    coco = val_set.coco
    cat_ids = sorted(coco.getCatIds())
    out: list[dict] = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.imgs[img_id]
        w, h = float(info.get("width", 640)), float(info.get("height", 480))
        n = 0
        for ann in coco.imgToAnns.get(img_id, []):
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            for _ in range(3):
                dx, dy, sw, sh = rng.normal(0.0, 0.1, size=4)
                nw, nh = max(1.0, bw * (1 + sw)), max(1.0, bh * (1 + sh))
                nx = float(np.clip(x + dx * bw, 0, w - nw))
                ny = float(np.clip(y + dy * bh, 0, h - nh))
                out.append({"image_id": img_id, "category_id": int(ann["category_id"]),
                            "bbox": [nx, ny, nw, nh], "score": float(rng.uniform(0.3, 1.0))})
                n += 1
        for _ in range(max(per_image - n, 0)):
            nw, nh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.5) * h
            nx, ny = rng.uniform(0, w - nw), rng.uniform(0, h - nh)
            out.append({"image_id": img_id, "category_id": int(rng.choice(cat_ids)),
                        "bbox": [float(nx), float(ny), float(nw), float(nh)], "score": float(rng.uniform(0, 0.6))})
    return out


def bare_pycocotools(coco_gt: Any, results: list[dict]) -> list[float]:
    """COCO bbox evaluation straight through pycocotools (prints discarded)."""
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def timed(fn: Callable[[Any, list[dict]], Any], coco_gt: Any, results: list[dict]) -> tuple[float, Any]:
    fresh = copy.deepcopy(results)  # untimed: loadRes mutates its input
    t = time.perf_counter()
    out = fn(coco_gt, fresh)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO-layout data root (default: fresh demo data)")
    ap.add_argument("--desc", type=Path, default=ROOT / "configs" / "demo-model.json")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per side, alternating")
    ap.add_argument("--synthetic", action="store_true", help="synthesize detections instead of running the model")
    ap.add_argument("--min-per-image", type=int, default=20,
                    help="fall back to synthetic detections below this many per image")
    ap.add_argument("--per-image", type=int, default=100, help="synthetic detections per image")
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="spnas-bench-") as tmp:
        data_root = args.data if args.data is not None else write_demo_dataset(Path(tmp) / "data")
        val_set = load_split(data_root, "val", train=False)
        coco_gt = val_set.coco
        n_images = len(coco_gt.getImgIds())
        source = "synthetic"
        results: list[dict] = []
        if not args.synthetic:
            t = time.perf_counter()
            results = model_detections(val_set, args.desc, args.batch_size)
            print(f"model detections: {len(results)} on {n_images} images in {time.perf_counter() - t:.1f} s")
            source = "random-init demo model, box_score_thresh 0"
            if len(results) < args.min_per_image * n_images:
                print(f"fewer than {args.min_per_image} per image: using synthetic detections instead")
                results = []
        if not results:
            results = synthetic_detections(val_set, args.per_image)
            source = "synthetic (jittered ground truth + false positives)"

        # One untimed call of each side: warms caches and checks that both agree.
        _, ours_metrics = timed(coco_metrics, coco_gt, results)
        _, bare_stats = timed(bare_pycocotools, coco_gt, results)
        bare_map = bare_stats[0] * 100
        if abs((ours_metrics["mAP"] or 0.0) - bare_map) > 1e-9:
            print(f"WARNING: mAP differs: spnas {ours_metrics['mAP']} vs bare {bare_map}")

        t_ours: list[float] = []
        t_bare: list[float] = []
        for i in range(args.repeats):
            pair = [(coco_metrics, t_ours), (bare_pycocotools, t_bare)]
            if i % 2:
                pair.reverse()
            for fn, acc in pair:
                acc.append(timed(fn, coco_gt, results)[0])

    m_ours, m_bare = statistics.median(t_ours), statistics.median(t_bare)
    print(f"{len(results)} detections ({len(results) / n_images:.1f} per image) on {n_images} images, "
          f"{len(coco_gt.getAnnIds())} ground-truth boxes; source: {source}")
    print(f"mAP {bare_map:.3f} (both sides agree: {abs((ours_metrics['mAP'] or 0.0) - bare_map) <= 1e-9}); "
          f"{args.repeats} alternating repeats")
    print(f"bare pycocotools          median {m_bare * 1000:8.1f} ms  (min {min(t_bare) * 1000:.1f})")
    print(f"spnas coco_metrics        median {m_ours * 1000:8.1f} ms  (min {min(t_ours) * 1000:.1f})")
    print(f"ratio spnas / bare        {m_ours / m_bare:.3f}  (goal <= 1.1)")


if __name__ == "__main__":
    main()
