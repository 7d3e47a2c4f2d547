"""``spnas export``: a trained model (a detector, a Mask R-CNN or a semantic ``SemanticFPN``) as a
folder a server or a registry can take.

``export_model`` writes, into ``out_dir`` (every file atomically):

* ``model.onnx`` and ``model.torchscript.pt``: the whole detector (:mod:`.programs`);
* ``labels.json``: ``{"labels": [{"label", "category_id", "name"}]}``, the detector's contiguous
  labels mapped to the data set's category ids and names;
* ``parity.json``: the parity gate (:mod:`.parity`) of both programs against PyTorch on the
  data set's validation images, ``"passed": true|false`` with the measured figures;
* ``export.json``: what the folder holds (format version, input and outputs, opset, the model
  description, the data version, metrics, costs, parity verdict);
* ``MODEL_CARD.md`` (:mod:`.card`).

An export whose gate fails is still written (its ``parity.json`` says why) but
:func:`check_publishable` refuses it: nothing may publish or serve it.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..data.source import CocoSource
from ..models.checkpoint import load_weights
from ..models.cost import count_params, forward_cost, train_memory_mb
from ..models.desc import TASK_OF_TYPE, arch_string, normalize_desc
from ..models.detector import build_detector
from ..utils.errors import SpnasError
from ..utils.fileio import atomic_write_json, atomic_write_text, read_json
from . import card, parity
from .programs import (
    OPSET,
    Runner,
    eager_runner,
    export_onnx,
    export_torchscript,
    onnx_runner,
    output_names,
    torchscript_runner,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ONNX_FILE, TORCHSCRIPT_FILE = "model.onnx", "model.torchscript.pt"


class ExportRefused(SpnasError):
    """An export that failed its parity gate (or has none) was asked to be published or served."""


def _outputs(desc_type: str) -> list[dict[str, Any]]:
    """``export.json``'s ``outputs`` of a model type (:func:`~.programs.output_names`' order)."""
    if desc_type == "SemanticFPN":
        return [{"name": "sem_seg", "dtype": "int64", "shape": ["H", "W"],
                 "meaning": "labels.json label of every input pixel (0 background)"}]
    out = [{"name": "boxes", "dtype": "float32", "shape": ["N", 4], "meaning": "x1 y1 x2 y2, input pixels"},
           {"name": "labels", "dtype": "int64", "shape": ["N"], "meaning": "labels.json label"},
           {"name": "scores", "dtype": "float32", "shape": ["N"], "meaning": "descending"}]
    if desc_type == "MaskRCNN":
        out.append({"name": "masks", "dtype": "float32", "shape": ["N", 1, "H", "W"],
                    "meaning": "mask probability of each detection over the input's pixels (mask: > 0.5)"})
    return out


def labels_of(dataset: Any) -> list[dict[str, Any]]:
    """``[{"label", "category_id", "name"}]`` of a COCO split (label order)."""
    cats = dataset.coco.cats
    return [{"label": int(lab), "category_id": int(cat), "name": str(cats.get(cat, {}).get("name", cat))}
            for lab, cat in sorted(dataset.label_to_cat.items())]


def _latency_ms(run: Runner, image: torch.Tensor, repeats: int = 5) -> float:
    run(image)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(image)
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def lineage(reports: Mapping[str, Any], record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The training lineage of ``record`` in a ``spnas run``'s ``reports.json``: the record, then
    the one it was trained from, and so on back to fine_tune. A search candidate's parent is the
    record of its own phase with the ``parent`` id; a search seed (round -1) comes from the
    earlier record whose weights it starts from; a reignition or full-train record from the
    previous phase's record of its ``parent`` id. Each entry: phase, id, serial and parallel
    codes, mAP, iterations."""
    phases = {name: list(p.get("records") or []) for name, p in (reports.get("phases") or {}).items()}
    roles = {name: p.get("role", name) for name, p in (reports.get("phases") or {}).items()}
    names = list(phases)

    def phase_of(rec: Mapping[str, Any]) -> str | None:
        if rec.get("phase") in phases:
            return rec["phase"]
        for name in reversed(names):  # the latest phase holding this very record
            if any(r.get("id") == rec.get("id") and r.get("weights") == rec.get("weights") for r in phases[name]):
                return name
        return None

    def source(rec: Mapping[str, Any], phase: str) -> tuple[dict[str, Any] | None, str | None]:
        earlier = list(reversed(names[: names.index(phase)]))
        if roles[phase] in ("serial", "parallel") and (rec.get("round") is None or rec["round"] >= 0):
            found = [r for r in phases[phase] if r.get("id") == rec.get("parent") and r is not rec]
            return (found[0], phase) if found and rec.get("parent") is not None else (None, None)
        if roles[phase] in ("serial", "parallel"):  # a seed: the earlier record trained into its weights
            for name in earlier:
                found = [r for r in phases[name] if rec.get("weights") and r.get("weights") == rec["weights"]]
                if found:
                    return found[0], name
            arch = arch_string(rec.get("desc"))  # records without weights (output.csv rows)
            for name in earlier:
                found = [r for r in phases[name] if r.get("desc") and arch_string(r["desc"]) == arch]
                if found:
                    return found[0], name
            return None, None
        parent = rec.get("parent", rec.get("id"))  # reignition and full train keep their source's id
        if parent is None:
            return None, None
        for name in earlier:
            found = [r for r in phases[name] if r.get("id") == parent]
            if found:
                return found[0], name
        return None, None

    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = dict(record)
    phase = phase_of(record)
    seen: set[tuple[Any, Any]] = set()
    while cur is not None and (phase, cur.get("id")) not in seen:
        seen.add((phase, cur.get("id")))
        desc = normalize_desc(cur.get("desc"))
        m = cur.get("metrics") or {}
        out.append({"phase": phase, "id": cur.get("id"), "serial": desc["backbone"]["code"],
                    "parallel": list(desc["neck"]["code"]), "mAP": m.get("mAP"), "mIoU": m.get("mIoU"),
                    **({"segm_mAP": m["segm_mAP"]} if "segm_mAP" in m else {}),  # a Mask R-CNN's mask AP
                    "iters": cur.get("iters")})
        if phase is None:
            break
        cur, phase = source(cur, phase)
    return out


def export_model(desc: Mapping[str, Any], weights: str | os.PathLike, data: CocoSource, out_dir: str | os.PathLike,
                 *, name: str = "spnas", control: Mapping[str, Any] | None = None,
                 lineage_: Sequence[Mapping[str, Any]] | None = None, max_images: int | None = None,
                 gate: parity.Gate | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Export ``desc``/``weights`` into ``out_dir`` (see the module docstring); the gate runs on
    ``data``'s validation split (its first ``max_images`` images; all by default). ``control``: a
    run's ``control.json`` (searched vs equal-budget control), ``lineage_``: :func:`lineage`'s
    entries; both go into the model card. Returns ``export.json``'s content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = normalize_desc(desc)
    val = data.load("val", train=False, semantic=d["type"] == "SemanticFPN")
    if len(val) == 0:
        raise SpnasError(f"the validation split of {data.root!r} has no image: the parity gate needs some")
    if d["num_classes"] != val.num_classes:
        raise SpnasError(f"the description has num_classes {d['num_classes']} but the data set {data.root!r} has "
                         f"{val.num_classes - 1} categories (+ background = {val.num_classes})")
    detector = build_detector(d)
    load_weights(detector, d, weights)
    detector.eval()
    val.set_epoch(0)
    sample = val[0][0]
    log.info("exporting %s to %s (ONNX opset %d, TorchScript)", weights, out, opset)
    export_onnx(detector, out / ONNX_FILE, sample, opset)
    export_torchscript(detector, out / TORCHSCRIPT_FILE, sample)
    labels = labels_of(val)
    if d["type"] == "SemanticFPN":
        labels = [{"label": 0, "category_id": 0, "name": "background"}, *labels]
    atomic_write_json(out / "labels.json", {"labels": labels}, mode=0o644)
    eager = eager_runner(detector)
    runners = {"onnx": onnx_runner(out / ONNX_FILE), "torchscript": torchscript_runner(out / TORCHSCRIPT_FILE)}
    report = parity.check(eager, runners, val, gate, max_images)
    atomic_write_json(out / "parity.json", report, mode=0o644)
    size = int(d.get("max_size", 800))
    gflops, _ = forward_cost(detector.backbone, size, "cpu")
    costs = {"params": count_params(detector)["total"], "gflops": round(gflops, 3), "size": size,
             "latency_ms": {"pytorch_cpu": _latency_ms(eager, sample), "onnxruntime_cpu": _latency_ms(runners["onnx"], sample),
                            "image": list(sample.shape[-2:]), "threads": torch.get_num_threads()},
             "train_memory_mb_batch4": round(train_memory_mb(d, size, 4), 1),
             "files_mb": {f: round((out / f).stat().st_size / 2 ** 20, 2) for f in (ONNX_FILE, TORCHSCRIPT_FILE)}}
    manifest = data.manifest()
    info = {"name": name, "format_version": FORMAT_VERSION, "spnas": __version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE, "opset": opset, "labels": "labels.json",
            "input": {"name": "images", "dtype": "float32", "shape": [3, "H", "W"],
                      "meaning": "one RGB image, values in [0, 1], any size"},
            "task": TASK_OF_TYPE[d["type"]], "outputs": _outputs(d["type"]),
            "desc": d, "weights": str(weights),
            "data": {"root": data.root, "version": manifest["version"], "val_images": len(val),
                     "classes": len(labels)},
            "metrics": report["reference"], "costs": costs, "parity": {"passed": report["passed"],
                                                                       "file": "parity.json"},
            "control": dict(control) if control else None, "lineage": list(lineage_ or [])}
    assert tuple(o["name"] for o in info["outputs"]) == output_names(d["type"])
    atomic_write_json(out / "export.json", info, mode=0o644)
    atomic_write_text(out / "MODEL_CARD.md", card.render(info, report))
    (out / "MODEL_CARD.md").chmod(0o644)
    return info


def check_publishable(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``export.json`` of an export folder whose parity gate passed; :class:`ExportRefused`
    naming the file otherwise (no ``parity.json``, or ``"passed": false`` with the figures)."""
    out = Path(out_dir)
    path = out / "parity.json"
    if not path.is_file():
        raise ExportRefused(f"{path} does not exist: an export without a parity gate cannot be published")
    report = read_json(path, "parity report")
    if report.get("passed") is not True:
        def probes(p: Mapping[str, Any]) -> str:
            pr = p.get("probes")
            if pr and "disagree" in pr:
                return (f", on resized probes {pr['images_with_mismatch']} image(s) under the pixel agreement"
                        if pr["images_with_mismatch"] else "")
            bad = pr and (pr["unmatched"] or pr["score_mismatch"] or pr.get("mask_mismatch"))
            return (f", on resized probes {pr['unmatched']} unmatched, {pr['score_mismatch']} score mismatch(es)"
                    + (f", {pr['mask_mismatch']} mask mismatch(es)" if "mask_mismatch" in pr else "") if bad else "")

        def figures(p: Mapping[str, Any]) -> str:
            v = p["val"]
            if "disagree" in v:
                return (f"{v['disagree']} of {v['pixels']} pixels labelled otherwise, {v['images_with_mismatch']} "
                        f"image(s) under the pixel agreement, mIoU difference {p['mIoU_diff']}")
            return (f"{v['unmatched']} unmatched detection(s), {v['score_mismatch']} score mismatch(es), "
                    + (f"{v['mask_mismatch']} mask mismatch(es), " if "mask_mismatch" in v else "")
                    + f"mAP difference {p['mAP_diff']}"
                    + (f", segm_mAP difference {p['segm_mAP_diff']}" if "segm_mAP_diff" in p else ""))
        why = "; ".join(f"{n}: {figures(p)}{probes(p)}"
                        for n, p in report.get("programs", {}).items() if not p.get("passed"))
        raise ExportRefused(f"{path}: the exported programs do not compute what PyTorch computed ({why}); "
                            "this export is refused for publishing")
    return read_json(out / "export.json", "export description")
