"""The parity gate: an exported program must compute what PyTorch computed.

For every validation image the program's detections are matched to PyTorch's (same label, the
highest IoU not yet taken): a detection of either side without a partner of IoU >= ``iou``, or
a matched pair whose scores differ by more than ``score``, is a mismatch; both sides are also
scored with COCO box AP on the split, and their mAPs must agree within ``map``. ``passed`` only
when there is no mismatch and the mAPs agree. Images of other sizes and aspect ratios (the first
val images resized, :data:`PROBE_SCALES`) are checked the same way, reported apart and gate too:
the programs are traced on one image, and a server takes images of any size.

A Mask R-CNN's matched detections must also have masks (above 0.5) of IoU >= ``mask_iou`` with
PyTorch's (pixels whose PyTorch probability lies within ``score`` of 0.5 left out: a float
rounding flips them either way; the largest probability difference is reported), and its mask AP
(``segm_mAP``, when the split's annotations have masks) agree within ``map``. A semantic model's
label maps must agree with PyTorch's on at least ``pixels`` of every image's pixels (ignored
nowhere), and its mIoU on the split agree within ``map``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision.ops import box_iou

from ..data.coco import CocoDetection
from ..training.evaluation import SEGM, coco_metrics, mask_rles, pixel_counts, semantic_metrics, to_coco_results
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
    mask_iou: float = 0.99
    pixels: float = 0.999


def match(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], gate: Gate) -> dict[str, Any]:
    """Match one image's detections (see the module docstring): counts of ``reference`` and
    ``program`` detections, ``matched`` pairs, ``unmatched`` (either side), the smallest IoU
    and the largest score difference and box coordinate difference (pixels) of the matched pairs."""
    n_ref, n_got = len(ref["scores"]), len(got["scores"])
    taken = torch.zeros(n_got, dtype=torch.bool)
    ious = box_iou(ref["boxes"], got["boxes"]) if n_ref and n_got else torch.zeros(n_ref, n_got)
    matched, min_iou, max_diff, max_box, bad_score = 0, 1.0, 0.0, 0.0, 0
    masks = "masks" in ref and "masks" in got
    min_mask, bad_mask, max_mask = 1.0, 0, 0.0
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
        if masks:
            p_ref, p_got = ref["masks"][i, 0], got["masks"][j, 0]
            if p_ref.shape == p_got.shape:
                decisive = (p_ref - 0.5).abs() > gate.score  # a rounding may flip a pixel at 0.5 either way
                a, b = (p_ref > 0.5) & decisive, (p_got > 0.5) & decisive
                union = int((a | b).sum())
                m_iou = int((a & b).sum()) / union if union else 1.0
                max_mask = max(max_mask, float((p_ref - p_got).abs().max()))
            else:  # a mask over another image size: nothing of it matches
                m_iou, max_mask = 0.0, 1.0
            min_mask, bad_mask = min(min_mask, m_iou), bad_mask + (m_iou < gate.mask_iou)
    row = {"reference": n_ref, "program": n_got, "matched": matched,
           "unmatched": (n_ref - matched) + (n_got - matched), "score_mismatch": bad_score,
           "min_iou": round(min_iou, 6) if matched else None, "max_score_diff": max_diff if matched else None,
           "max_box_diff": max_box if matched else None}
    if masks:
        row.update(min_mask_iou=round(min_mask, 6) if matched else None, mask_mismatch=bad_mask,
                   max_mask_diff=max_mask if matched else None)
    return row


def match_maps(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], gate: Gate) -> dict[str, Any]:
    """Compare one image's label maps: ``pixels``, ``disagree`` (pixels of another label or a
    map of another shape: all of them), ``agreement`` (share) and ``mismatch`` (1 when the
    agreement is under ``gate.pixels``)."""
    a, b = ref["sem_seg"], got["sem_seg"]
    n = a.numel()
    disagree = int((a != b).sum()) if a.shape == b.shape else n
    agreement = 1.0 - disagree / n if n else 1.0
    return {"pixels": n, "disagree": disagree, "agreement": agreement, "mismatch": int(agreement < gate.pixels)}


def _map_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"images": len(rows), "pixels": sum(r["pixels"] for r in rows),
            "disagree": sum(r["disagree"] for r in rows),
            "min_agreement": min((r["agreement"] for r in rows), default=None),
            "images_with_mismatch": sum(r["mismatch"] for r in rows)}


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ious = [r["min_iou"] for r in rows if r["min_iou"] is not None]
    diffs = [r["max_score_diff"] for r in rows if r["max_score_diff"] is not None]
    boxes = [r["max_box_diff"] for r in rows if r.get("max_box_diff") is not None]
    out = {"images": len(rows), "detections": sum(r["reference"] for r in rows),
            "matched": sum(r["matched"] for r in rows), "unmatched": sum(r["unmatched"] for r in rows),
            "score_mismatch": sum(r["score_mismatch"] for r in rows),
            "min_iou": min(ious) if ious else None, "max_score_diff": max(diffs) if diffs else None,
            "max_box_diff": max(boxes) if boxes else None,
            "images_with_mismatch": sum(1 for r in rows if r["unmatched"] or r["score_mismatch"]
                                        or r.get("mask_mismatch"))}
    if rows and "mask_mismatch" in rows[0]:
        mious = [r["min_mask_iou"] for r in rows if r.get("min_mask_iou") is not None]
        mdiffs = [r["max_mask_diff"] for r in rows if r.get("max_mask_diff") is not None]
        out.update(mask_mismatch=sum(r["mask_mismatch"] for r in rows), min_mask_iou=min(mious) if mious else None,
                   max_mask_diff=max(mdiffs) if mdiffs else None)
    return out


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
    if getattr(dataset, "semantic", False):
        return _check_maps(reference, programs, dataset, images, gate, probes)
    ids = [int(t["image_id"]) for _, t in images]
    coco = _restricted(dataset.coco, ids)  # scored on the checked images only
    ref_out = [reference(img) for img, _ in images]

    segm = "masks" in ref_out[0] and all(a.get("segmentation") for a in coco.dataset.get("annotations", []))

    def results(outs: Sequence[Mapping[str, torch.Tensor]]) -> list[dict]:
        res: list[dict] = []
        for image_id, o in zip(ids, outs, strict=True):
            found = to_coco_results(image_id, o["boxes"], o["scores"], o["labels"], dataset.label_to_cat)
            if segm:
                for r, rle in zip(found, mask_rles(o["masks"]), strict=True):
                    r["segmentation"] = rle
            res.extend(found)
        return res

    def metrics(outs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        res = results(outs)
        m = coco_metrics(coco, [{k: v for k, v in r.items() if k != "segmentation"} for r in res])
        if segm:
            masks = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
            m.update({SEGM + k: v for k, v in coco_metrics(coco, masks, "segm").items()})
        return m

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
                 "passed": val["unmatched"] == 0 and val["score_mismatch"] == 0 and not val.get("mask_mismatch")
                 and diff <= gate.map}
        if segm:
            entry["segm_mAP_diff"] = round(abs((m["segm_mAP"] or 0.0) - (ref_metrics["segm_mAP"] or 0.0)), 4)
            entry["passed"] = entry["passed"] and entry["segm_mAP_diff"] <= gate.map
        if probes:
            probe_rows = [match(want, run(x), gate) for x, want in probe_set]
            entry["probes"] = {"scales": [list(s) for s in PROBE_SCALES], **_summary(probe_rows)}
            entry["passed"] = entry["passed"] and entry["probes"]["unmatched"] == 0 and \
                entry["probes"]["score_mismatch"] == 0 and not entry["probes"].get("mask_mismatch")
        report["programs"][name] = entry
        pr = entry.get("probes")
        log.info("parity of %s on %d image(s): %s (%d/%d detections matched, mAP %.2f vs %.2f%s)", name, n,
                 "passed" if entry["passed"] else "FAILED", val["matched"], val["detections"], m["mAP"] or 0,
                 ref_metrics["mAP"] or 0, f"; resized probes {pr['matched']}/{pr['detections']} matched" if pr else "")
    report["passed"] = bool(programs) and all(p["passed"] for p in report["programs"].values())
    return report


def _check_maps(reference: Runner, programs: Mapping[str, Runner], dataset: CocoDetection,
                images: Sequence[tuple[torch.Tensor, dict]], gate: Gate, probes: bool) -> dict[str, Any]:
    """:func:`check` of a semantic model: label maps compared pixel for pixel, mIoU on the split."""
    names = ["background", *dataset.cat_names]
    n_cls = len(names)

    def metrics(outs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
        conf = torch.zeros(n_cls * n_cls, dtype=torch.int64)
        for (_, t), o in zip(images, outs, strict=True):  # clamped: a malformed program cannot index past the matrix
            conf += pixel_counts(t["sem_seg"], o["sem_seg"].clamp(0, n_cls - 1), n_cls, f"image {t['image_id']}")
        m = semantic_metrics(conf.reshape(n_cls, n_cls), names)
        return {k: m[k] for k in ("mIoU", "pixel_acc", "mAcc")}

    ref_out = [reference(img) for img, _ in images]
    ref_metrics = metrics(ref_out)
    probe_set = [(x, reference(x)) for x in (_resized(img, sh, sw) for sh, sw in PROBE_SCALES
                                            for img, _ in images[:8])] if probes else []
    report: dict[str, Any] = {"gate": asdict(gate), "images": len(images), "reference": ref_metrics, "programs": {}}
    for name, run in programs.items():
        outs = [run(img) for img, _ in images]
        val = _map_summary([match_maps(r, o, gate) for r, o in zip(ref_out, outs, strict=True)])
        m = metrics(outs)
        diff = abs(m["mIoU"] - ref_metrics["mIoU"])
        entry = {"metrics": m, "mIoU_diff": round(diff, 4), "val": val,
                 "passed": val["images_with_mismatch"] == 0 and diff <= gate.map}
        if probes:
            entry["probes"] = {"scales": [list(s) for s in PROBE_SCALES],
                               **_map_summary([match_maps(want, run(x), gate) for x, want in probe_set])}
            entry["passed"] = entry["passed"] and entry["probes"]["images_with_mismatch"] == 0
        report["programs"][name] = entry
        log.info("parity of %s on %d image(s): %s (%d of %d pixels disagree, mIoU %.2f vs %.2f)", name, len(images),
                 "passed" if entry["passed"] else "FAILED", val["disagree"], val["pixels"], m["mIoU"],
                 ref_metrics["mIoU"])
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
