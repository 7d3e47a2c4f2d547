"""The parity gate: an exported program must compute what PyTorch computed.

For every validation image the program's detections are matched to PyTorch's (same label, the
highest IoU not yet taken): a detection of either side without a partner of IoU >= ``iou``, or
a matched pair whose scores differ by more than ``score``, is a mismatch; both sides are also
scored with COCO box AP on the split, and their mAPs must agree within ``map``. ``passed`` only
when there is no mismatch and the mAPs agree. Images of other sizes and aspect ratios (the first
val images resized, :data:`PROBE_SCALES`) are checked the same way, reported apart and gate too:
the programs are traced on one image, and a server takes images of any size.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.ops import box_iou

from ..data.coco import CocoDetection
from ..training.evaluation import coco_metrics, to_coco_results
from .programs import Runner

log = logging.getLogger(__name__)

#: (height scale, width scale) of the probe images (beside the validation sizes).
PROBE_SCALES = ((0.75, 1.25), (1.5, 0.6))


@dataclass(frozen=True)
class Gate:
    """The thresholds of the gate (the issue's defaults)."""

    iou: float = 0.99
    score: float = 1e-3
    map: float = 0.1


def match(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], gate: Gate) -> dict[str, Any]:
    """Match one image's detections (see the module docstring): counts of ``reference`` and
    ``program`` detections, ``matched`` pairs, ``unmatched`` (either side), the smallest IoU
    and the largest score difference and box coordinate difference (pixels) of the matched pairs."""
    n_ref, n_got = len(ref["scores"]), len(got["scores"])
    taken = torch.zeros(n_got, dtype=torch.bool)
    ious = box_iou(ref["boxes"], got["boxes"]) if n_ref and n_got else torch.zeros(n_ref, n_got)
    matched, min_iou, max_diff, max_box, bad_score = 0, 1.0, 0.0, 0.0, 0
    for i in torch.argsort(ref["scores"], descending=True).tolist():
        cand = ious[i].clone()
        cand[taken | (got["labels"] != ref["labels"][i])] = -1.0
        if n_got == 0 or float(cand.max()) < gate.iou:
            continue
        j = int(cand.argmax())
        taken[j] = True
        matched += 1
        diff = abs(float(ref["scores"][i]) - float(got["scores"][j]))
        min_iou, max_diff = min(min_iou, float(cand[j])), max(max_diff, diff)
        max_box = max(max_box, float((ref["boxes"][i] - got["boxes"][j]).abs().max()))
        bad_score += diff > gate.score
    return {"reference": n_ref, "program": n_got, "matched": matched,
            "unmatched": (n_ref - matched) + (n_got - matched), "score_mismatch": bad_score,
            "min_iou": round(min_iou, 6) if matched else None, "max_score_diff": max_diff if matched else None,
            "max_box_diff": max_box if matched else None}


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ious = [r["min_iou"] for r in rows if r["min_iou"] is not None]
    diffs = [r["max_score_diff"] for r in rows if r["max_score_diff"] is not None]
    boxes = [r["max_box_diff"] for r in rows if r.get("max_box_diff") is not None]
    return {"images": len(rows), "detections": sum(r["reference"] for r in rows),
            "matched": sum(r["matched"] for r in rows), "unmatched": sum(r["unmatched"] for r in rows),
            "score_mismatch": sum(r["score_mismatch"] for r in rows),
            "min_iou": min(ious) if ious else None, "max_score_diff": max(diffs) if diffs else None,
            "max_box_diff": max(boxes) if boxes else None,
            "images_with_mismatch": sum(1 for r in rows if r["unmatched"] or r["score_mismatch"])}


def _resized(image: torch.Tensor, sh: float, sw: float) -> torch.Tensor:
    h, w = image.shape[-2:]
    size = (max(8, round(h * sh)), max(8, round(w * sw)))
    return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def check(reference: Runner, programs: Mapping[str, Runner], dataset: CocoDetection, gate: Gate | None = None,
          max_images: int | None = None, probes: bool = True) -> dict[str, Any]:
    """Run the gate of every program of ``programs`` against ``reference`` on ``dataset``'s
    images (the first ``max_images``; all by default). Returns ``{"passed", "gate", "images",
    "reference": {metrics}, "programs": {name: {"passed", "metrics", "mAP_diff", "val": summary,
    "probes": summary}}}``."""
    gate = gate or Gate()
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    dataset.set_epoch(0)
    images = [dataset[i] for i in range(n)]
    ids = [int(t["image_id"]) for _, t in images]
    coco = _restricted(dataset.coco, ids)  # scored on the checked images only
    ref_out = [reference(img) for img, _ in images]

    def results(outs: Sequence[Mapping[str, torch.Tensor]]) -> list[dict]:
        res: list[dict] = []
        for image_id, o in zip(ids, outs, strict=True):
            res.extend(to_coco_results(image_id, o["boxes"], o["scores"], o["labels"], dataset.label_to_cat))
        return res

    def metrics(outs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        return coco_metrics(coco, results(outs))

    ref_metrics = metrics(ref_out)
    # the probe images and PyTorch's detections on them: made once, every program checked on them
    probe_set = [(x, reference(x)) for x in (_resized(img, sh, sw) for sh, sw in PROBE_SCALES
                                            for img, _ in images[: min(n, 8)])] if probes else []
    report: dict[str, Any] = {"gate": asdict(gate), "images": n, "reference": ref_metrics, "programs": {}}
    for name, run in programs.items():
        outs = [run(img) for img, _ in images]
        rows = [match(r, o, gate) for r, o in zip(ref_out, outs, strict=True)]
        val = _summary(rows)
        m = metrics(outs)
        diff = abs((m["mAP"] or 0.0) - (ref_metrics["mAP"] or 0.0))
        entry = {"metrics": m, "mAP_diff": round(diff, 4), "val": val,
                 "passed": val["unmatched"] == 0 and val["score_mismatch"] == 0 and diff <= gate.map}
        if probes:
            probe_rows = [match(want, run(x), gate) for x, want in probe_set]
            entry["probes"] = {"scales": [list(s) for s in PROBE_SCALES], **_summary(probe_rows)}
            entry["passed"] = entry["passed"] and entry["probes"]["unmatched"] == 0 and \
                entry["probes"]["score_mismatch"] == 0
        report["programs"][name] = entry
        pr = entry.get("probes")
        log.info("parity of %s on %d image(s): %s (%d/%d detections matched, mAP %.2f vs %.2f%s)", name, n,
                 "passed" if entry["passed"] else "FAILED", val["matched"], val["detections"], m["mAP"] or 0,
                 ref_metrics["mAP"] or 0, f"; resized probes {pr['matched']}/{pr['detections']} matched" if pr else "")
    report["passed"] = bool(programs) and all(p["passed"] for p in report["programs"].values())
    return report


def _restricted(coco: Any, ids: Sequence[int]) -> Any:
    """``coco`` whose evaluation covers ``ids`` only (COCOeval evaluates ``getImgIds()``)."""
    if set(ids) == set(coco.getImgIds()):
        return coco
    import copy
    sub = copy.copy(coco)
    keep = set(ids)
    sub.imgs = {i: im for i, im in coco.imgs.items() if i in keep}
    return sub
