"""``MODEL_CARD.md`` of an export: what the model is, what it costs, what it scored beside its
equal-budget control, where it came from, whether its programs passed the parity gate, and
what it is not for. Every figure comes from ``export.json`` and ``parity.json`` (measured at
export time); what was not measured says so."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models.cost import stage_table


def _f(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _n(value: Any) -> str:
    """A count with thousands separators."""
    return "n/a" if value is None else f"{int(value):,}"


def _e(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1e}"


#: The metrics a card shows, per task.
METRIC_KEYS = {"detection": ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"),
               "instance_segmentation": ("mAP", "AP50", "segm_mAP", "segm_AP50", "segm_AP75"),
               "semantic_segmentation": ("mIoU", "pixel_acc", "mAcc")}
_KIND = {"detection": "A Faster R-CNN detector", "instance_segmentation": "A Mask R-CNN (instance segmentation)",
         "semantic_segmentation": "A SemanticFPN (semantic segmentation)"}
_MEASURE = {"detection": "COCO box AP (x100)", "instance_segmentation": "COCO box and mask AP (x100)",
            "semantic_segmentation": "mean IoU, pixel and mean class accuracy (x100)"}
_OUTPUTS = {"detection": "boxes (x1 y1 x2 y2, input pixels), labels (map with `labels.json`), scores",
            "instance_segmentation": "boxes (x1 y1 x2 y2, input pixels), labels (map with `labels.json`), scores, "
                                     "and each detection's mask probability over the input's pixels (mask: > 0.5)",
            "semantic_segmentation": "the label of every input pixel (map with `labels.json`; 0 is background)"}


def _task(info: Mapping[str, Any]) -> str:
    return info.get("task", "detection")


def _metrics_rows(info: Mapping[str, Any]) -> list[str]:
    m, ctrl = info["metrics"], info.get("control")
    keys = METRIC_KEYS[_task(info)]
    if not ctrl:
        return ["| metric | this model |", "|---|---|", *(f"| {k} | {_f(m.get(k))} |" for k in keys),
                "", "No equal-budget control was given (`spnas export --run` or `--control` adds it)."]
    s, c = ctrl.get("searched", {}), ctrl.get("control", {})
    rows = ["| | this model (at export) | searched (in the run) | equal-budget control (in the run) |",
            "|---|---|---|---|",
            *(f"| {k} | {_f(m.get(k))} | {_f(s.get(k))} | {_f(c.get(k))} |" for k in keys),
            f"| params | {_n(info['costs']['params'])} | {_n(s.get('params'))} | {_n(c.get('params'))} |",
            f"| GFLOPs | {info['costs']['gflops']:.3f} | {_f(s.get('gflops'), 3)} | {_f(c.get('gflops'), 3)} |",
            f"| training iterations after fine_tune | n/a | {_n(s.get('iterations'))} | {_n(c.get('iterations'))} |", ""]
    q = ctrl.get("quality", "mAP")
    if ctrl.get("delta_" + q) is not None:
        rows.append(f"In the run the searched model scored {ctrl['delta_' + q]:+.2f} {q} against the seed trained with "
                    f"the same budget from the same weights; the run's result was the **{ctrl.get('winner')}** model "
                    f"({ctrl.get('reason', '')}).")
    return rows


def _lineage_rows(info: Mapping[str, Any]) -> list[str]:
    """The lineage table, in the run's quality (its control's ``quality``: a Mask R-CNN searched
    by mask AP shows ``segm_mAP``; else mAP, a semantic model's mIoU)."""
    if not info.get("lineage"):
        return ["Not given (export from a `spnas run` output with `spnas export --run` to record it)."]
    q = (info.get("control") or {}).get("quality") or ("mIoU" if _task(info) == "semantic_segmentation" else "mAP")
    return [f"| phase | id | serial | parallel | {q} | iterations |", "|---|---|---|---|---|---|",
            *(f"| {e['phase']} | {e['id']} | {e['serial']} | {e['parallel']} | {_f(e.get(q))} | {_f(e['iters'])} |"
              for e in info["lineage"])]


def render(info: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """The model card's Markdown."""
    d, costs, data = info["desc"], info["costs"], info["data"]
    bb = d["backbone"]
    lat = costs["latency_ms"]
    lines = [f"# Model card: {info['name']}", "",
             f"{_KIND[_task(info)]} whose backbone was found by SP-NAS (spnas {info['spnas']}), exported "
             f"{info['created']}.", "",
             "## Architecture", "",
             f"- serial code `{bb['code']}` ({bb['block']} blocks, stem width {bb['base_channels']}, norm {bb['norm']})",
             f"- parallel code `{list(d['neck']['code'])}`, FPN width {d['neck'].get('out_channels')}",
             f"- {d['num_classes'] - 1} object classes (+ background); input resize "
             f"{d.get('min_size')}-{d.get('max_size')} px",
             "", "| stage | code | blocks | in ch | out ch | stride | parallel passes |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['code']} | {r['blocks']} | {r['in_channels']} | {r['out_channels']} | {r['stride']} | "
              f"{r['parallel']} |" for r in stage_table(d)]
    lines += ["", "## Cost", "",
              f"- parameters: {costs['params']:,}",
              f"- GFLOPs (backbone + parallel + FPN at {costs['size']}x{costs['size']}): {costs['gflops']}",
              f"- latency, one {lat['image'][0]}x{lat['image'][1]} image, CPU, {lat['threads']} thread(s), median of 5: "
              f"PyTorch {lat['pytorch_cpu']} ms, ONNX Runtime {lat['onnxruntime_cpu']} ms; GPU: not measured",
              f"- training memory (estimate, batch 4 at {costs['size']} px): {costs['train_memory_mb_batch4']} MiB",
              f"- files: {', '.join(f'{k} {v} MiB' for k, v in costs['files_mb'].items())}",
              "", "## Data", "",
              f"- data set `{data['root']}`, version `{data['version']}` (SHA-256 over its files; "
              "`CocoSource.manifest`)",
              f"- metrics below: {_MEASURE[_task(info)]} on its {data['val_images']} validation images, measured at "
              "export",
              "", "## Metrics", "", *_metrics_rows(info), "", "## Parity of the exported programs", ""]
    if _task(info) == "semantic_segmentation":
        lines += _semantic_parity(report)
    else:
        lines += _detection_parity(report, _task(info) == "instance_segmentation")
    scales = [tuple(s) for p in list(report["programs"].values())[:1] for s in (p.get("probes") or {}).get("scales", [])]
    lines += ["", f"Probes: the first validation images resized by (height, width) factors {scales}: both programs "
              "are traced on one image, so sizes unlike it are checked too, and gate like the validation images.",
              "", "## Lineage", ""]
    lines += _lineage_rows(info)
    lines += ["", "## Intended use and limits", "",
              f"- Handles the {data['classes']} categories of `labels.json` in images like those of the data set above; "
              "it was neither trained nor evaluated on any other data: measure it on yours before relying on it.",
              "- Input: one RGB image, values in [0, 1]; the program resizes and normalises it as in training. "
              f"Outputs: {_OUTPUTS[_task(info)]}.",
              "- The metrics are validation metrics of the data set the search also selected on (no held-out test "
              "split): they are optimistic for new data.",
              "- Latency was measured on the exporting machine's CPU; serving hardware will differ.", ""]
    return "\n".join(lines)


def _semantic_parity(report: Mapping[str, Any]) -> list[str]:
    gate = report["gate"]
    lines = [f"Gate: the label maps agree with PyTorch's on at least {gate['pixels']:.1%} of every image's pixels and "
             f"mIoU within {gate['map']}, on {report['images']} validation image(s) and on probes (the first of them "
             f"resized to other sizes and aspect ratios). Verdict: "
             f"**{'passed' if report['passed'] else 'FAILED: not to be published'}**.",
             "", "| program | verdict | pixels labelled otherwise | lowest agreement | mIoU | probes: pixels otherwise |",
             "|---|---|---|---|---|---|"]
    for name, p in report["programs"].items():
        v, pr = p["val"], p.get("probes") or {}
        lines.append(f"| {name} | {'passed' if p['passed'] else 'FAILED'} | {v['disagree']} / {v['pixels']} | "
                     f"{_f(v['min_agreement'], 6)} | {_f(p['metrics']['mIoU'])} | {pr.get('disagree', 'n/a')} |")
    return lines


def _detection_parity(report: Mapping[str, Any], masks: bool) -> list[str]:
    gate = report["gate"]
    lines: list[str] = []
    mask_rule = (f", matched masks of IoU >= {gate.get('mask_iou')}, segm_mAP within {gate['map']}" if masks else "")
    lines.append(f"Gate: every detection matched (same label, IoU >= {gate['iou']}), scores within {gate['score']}, "
                 f"mAP within {gate['map']}{mask_rule}, on {report['images']} validation image(s) and on probes (the first "
                 f"of them resized to other sizes and aspect ratios). Verdict: "
                 f"**{'passed' if report['passed'] else 'FAILED: not to be published'}**.")
    extra = " min mask IoU | segm_mAP |" if masks else ""
    lines += ["", "| program | verdict | matched / detections | min IoU | max box diff (px) | max score diff | mAP |"
              f"{extra} probes: unmatched, max score diff |", "|---" * (10 if masks else 8) + "|"]
    for name, p in report["programs"].items():
        v, pr = p["val"], p.get("probes") or {}
        cells = f" {_f(v.get('min_mask_iou'), 4)} | {_f(p['metrics'].get('segm_mAP'))} |" if masks else ""
        lines.append(f"| {name} | {'passed' if p['passed'] else 'FAILED'} | {v['matched']} / {v['detections']} | "
                     f"{_f(v['min_iou'], 4)} | {_e(v.get('max_box_diff'))} | {_e(v['max_score_diff'])} | "
                     f"{_f(p['metrics']['mAP'])} |{cells} "
                     f"{pr.get('unmatched', 'n/a')}, {_e(pr.get('max_score_diff'))} |")
    return lines
