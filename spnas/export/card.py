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


def _metrics_rows(info: Mapping[str, Any]) -> list[str]:
    m, ctrl = info["metrics"], info.get("control")
    keys = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
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
    if ctrl.get("delta_mAP") is not None:
        rows.append(f"In the run the searched model scored {ctrl['delta_mAP']:+.2f} mAP against the seed trained with "
                    f"the same budget from the same weights; the run's result was the **{ctrl.get('winner')}** model "
                    f"({ctrl.get('reason', '')}).")
    return rows


def render(info: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    """The model card's Markdown."""
    d, costs, data = info["desc"], info["costs"], info["data"]
    bb = d["backbone"]
    lat = costs["latency_ms"]
    lines = [f"# Model card: {info['name']}", "",
             f"A Faster R-CNN detector whose backbone was found by SP-NAS (spnas {info['spnas']}), exported "
             f"{info['created']}.", "",
             "## Architecture", "",
             f"- serial code `{bb['code']}` ({bb['block']} blocks, stem width {bb['base_channels']}, norm {bb['norm']})",
             f"- parallel code `{list(d['neck']['code'])}`, FPN width {d['neck'].get('out_channels')}",
             f"- {d['num_classes'] - 1} object classes (+ background); detector resize "
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
              f"- metrics below: COCO box AP (x100) on its {data['val_images']} validation images, measured at export",
              "", "## Metrics", "", *_metrics_rows(info), "", "## Parity of the exported programs", ""]
    gate = report["gate"]
    lines.append(f"Gate: every detection matched (same label, IoU >= {gate['iou']}), scores within {gate['score']}, "
                 f"mAP within {gate['map']}, on {report['images']} validation image(s) and on probes (the first "
                 f"of them resized to other sizes and aspect ratios). Verdict: "
                 f"**{'passed' if report['passed'] else 'FAILED: not to be published'}**.")
    lines += ["", "| program | verdict | matched / detections | min IoU | max box diff (px) | max score diff | mAP | "
              "probes: unmatched, max score diff |", "|---|---|---|---|---|---|---|---|"]
    for name, p in report["programs"].items():
        v, pr = p["val"], p.get("probes") or {}
        lines.append(f"| {name} | {'passed' if p['passed'] else 'FAILED'} | {v['matched']} / {v['detections']} | "
                     f"{_f(v['min_iou'], 4)} | {_e(v.get('max_box_diff'))} | {_e(v['max_score_diff'])} | "
                     f"{_f(p['metrics']['mAP'])} | "
                     f"{pr.get('unmatched', 'n/a')}, {_e(pr.get('max_score_diff'))} |")
    scales = [tuple(s) for p in list(report["programs"].values())[:1] for s in (p.get("probes") or {}).get("scales", [])]
    lines += ["", f"Probes: the first validation images resized by (height, width) factors {scales}: both programs "
              "are traced on one image, so sizes unlike it are checked too, and gate like the validation images.",
              "", "## Lineage", ""]
    if info.get("lineage"):
        lines += ["| phase | id | serial | parallel | mAP | iterations |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['phase']} | {e['id']} | {e['serial']} | {e['parallel']} | {_f(e['mAP'])} | {_f(e['iters'])} |"
                  for e in info["lineage"]]
    else:
        lines.append("Not given (export from a `spnas run` output with `spnas export --run` to record it).")
    lines += ["", "## Intended use and limits", "",
              f"- Detects the {data['classes']} categories of `labels.json` in images like those of the data set above; "
              "it was neither trained nor evaluated on any other data: measure it on yours before relying on it.",
              "- Input: one RGB image, values in [0, 1]; the program resizes and normalises it as in training. "
              "Outputs: boxes (x1 y1 x2 y2, input pixels), labels (map with `labels.json`), scores.",
              "- The metrics are validation metrics of the data set the search also selected on (no held-out test "
              "split): they are optimistic for new data.",
              "- Latency was measured on the exporting machine's CPU; serving hardware will differ.", ""]
    return "\n".join(lines)
