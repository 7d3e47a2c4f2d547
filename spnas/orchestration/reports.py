"""What a run reports: Vega's ``output.csv``, Pareto-front plots (matplotlib, Agg backend) and
the Markdown summary of the Kubeflow pipeline. Every file is written atomically. No torch."""
from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

_X_LABELS = {"params": ("parameters (millions)", 1e6), "gflops": ("GFLOPs", 1.0), "memory": ("training memory (MiB)", 1.0),
             "latency": ("latency (ms)", 1.0)}
#: Where a point's id label may go, tried in order (offset points): beside the point first, then on
#: rings further out in eight directions, until one covers no point and no other label.
_LABEL_OFFSETS = ((4, 3), (4, -10), (-12, 3), (-12, -10)) + tuple(
    (round(r * dx) - (6 if dx < 0 else 0), round(r * dy) - 3)
    for r in (12, 18, 26, 36, 48, 62) for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1), (0.7, 0.7), (-0.7, 0.7),
                                                     (-0.7, -0.7), (0.7, -0.7)))


_Y_LABELS = {"mAP": "mAP (COCO AP@[.5:.95] x 100)", "segm_mAP": "mask mAP (COCO segm AP@[.5:.95] x 100)",
             "segm_AP50": "mask AP50 (COCO segm AP@.5 x 100)", "mIoU": "mIoU (mean IoU over classes x 100)"}


def pareto_figure(records: Sequence[Mapping[str, Any]], front_ids: Sequence[Any], title: str,
                  control: Mapping[str, Any] | None = None, x_key: str = "params",
                  objectives: Sequence[str] = ()) -> tuple[Any, Any, dict[str, Any]]:
    """The Pareto plot as a matplotlib figure: quality (the first maximised of the search's
    ``objectives``: :func:`~spnas.search.settings.quality_key`; without them box mAP, a semantic
    model's mIoU) against ``x_key`` (params, gflops, memory or latency) for every evaluated
    record, the front highlighted and joined, seeds squared, failed candidates marked on the x
    axis, the equal-budget ``control`` as a diamond. The legend sits outside the axes and each id
    label takes the first place where it covers no point and no other label. Returns
    ``(fig, ax, layout)``; ``layout`` holds the display boxes of points,
    labels and the legend (``points``, ``labels``, ``legend``) for checks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    from ..search.settings import quality, quality_key
    label, scale = _X_LABELS.get(x_key, (x_key, 1.0))

    def xy(r: Mapping[str, Any]) -> tuple[float, float]:
        return r[x_key] / scale, quality(r["metrics"], objectives)

    ok = [r for r in records if r.get("status") == "ok" and quality(r.get("metrics"), objectives) is not None
          and r.get(x_key) is not None]
    q = quality_key(ok[0]["metrics"], objectives) if ok else "mAP"
    failed = [r for r in records if r.get("status") == "failed" and r.get(x_key) is not None]
    front = sorted((r for r in ok if r["id"] in set(front_ids)), key=lambda r: r[x_key])
    fig, ax = plt.subplots(figsize=(8.4, 4.5), dpi=110)
    ax.scatter([xy(r)[0] for r in ok], [xy(r)[1] for r in ok], s=28, c="#9aa5b1", label=f"candidates ({len(ok)})", zorder=2)
    if front:
        ax.step([xy(r)[0] for r in front], [xy(r)[1] for r in front], where="post", c="#d1495b", lw=1.2, zorder=3)
        ax.scatter([xy(r)[0] for r in front], [xy(r)[1] for r in front], s=60, c="#d1495b", edgecolors="black",
                   linewidths=0.6, label=f"Pareto front ({len(front)})", zorder=4)
    if failed:
        ax.scatter([r[x_key] / scale for r in failed], [0] * len(failed), marker="x", c="black",
                   label=f"failed ({len(failed)})", zorder=4)
    seeds = [r for r in ok if r.get("parent") is None]
    if seeds:
        ax.scatter([xy(r)[0] for r in seeds], [xy(r)[1] for r in seeds], s=90, marker="s", facecolors="none",
                   edgecolors="#1d3557", linewidths=1.2, label=f"seeds ({len(seeds)})", zorder=5)
    points = [xy(r) for r in ok] + [(r[x_key] / scale, 0.0) for r in failed]
    named = [(str(r["id"]), xy(r)) for r in ok]
    if control is not None and quality(control.get("metrics"), objectives) is not None and control.get(x_key) is not None:
        c = xy(control)
        ax.scatter([c[0]], [c[1]], s=110, marker="D", c="#2a9d8f", edgecolors="black", linewidths=0.8,
                   label="equal-budget control", zorder=6)
        points.append(c)
        named.append(("control", c))
    ax.set_xlabel(label)
    ax.set_ylabel(_Y_LABELS.get(q, q))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.12)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marks = [_point_box(ax, p, 5.0) for p in points]
    placed: list[Any] = []
    for text, p in named:
        for dx, dy in _LABEL_OFFSETS:
            ann = ax.annotate(text, p, textcoords="offset points", xytext=(dx, dy), fontsize=7, color="#333333",
                              arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#777777"} if abs(dx) + abs(dy) > 16
                              else None)
            box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            if not any(box.overlaps(m) for m in marks) and not any(box.overlaps(q) for q in placed):
                break
            ann.remove()
        else:  # more labels than places: the last ring's place, logged
            log.warning("pareto plot %r: no free place for label %s", title, text)
        placed.append(box)
    layout = {"points": marks, "labels": placed, "legend": legend.get_window_extent(renderer),
              "axes": ax.get_window_extent(renderer)}
    return fig, ax, layout


def _point_box(ax: Any, p: tuple[float, float], radius_px: float) -> Any:
    from matplotlib.transforms import Bbox
    x, y = ax.transData.transform(p)
    return Bbox.from_extents(x - radius_px, y - radius_px, x + radius_px, y + radius_px)


def pareto_plot(records: Sequence[Mapping[str, Any]], front_ids: Sequence[Any], path: str | Path, title: str,
                control: Mapping[str, Any] | None = None, x_key: str = "params", objectives: Sequence[str] = ()) -> Path:
    """:func:`pareto_figure` written as a PNG (atomically)."""
    import matplotlib.pyplot as plt
    fig, _, _ = pareto_figure(records, front_ids, title, control, x_key, objectives)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_output_csv(out_dir: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Vega's ``output.csv``: worker_id, performance, desc (one row per record given)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["worker_id", "performance", "desc"])
    for r in records:
        w.writerow([r["id"], json.dumps(r.get("metrics"), sort_keys=True), json.dumps(r.get("desc"), sort_keys=True)])
    return atomic_write_bytes(Path(out_dir) / "output.csv", buf.getvalue().encode())


def report_markdown(phases_records: Mapping[str, Sequence[Mapping[str, Any]]], best: Mapping[str, Any],
                    control: Mapping[str, Any] | None = None, objectives: Sequence[str] = ()) -> str:
    """A Markdown summary: the run's result, the searched model beside its equal-budget control
    (``control``: a :func:`control_summary`), and a table of every record of every phase given,
    all by the run's quality (``control["quality"]``, else the first maximised of ``objectives``)."""
    from ..search.settings import SECOND_FIGURE, quality_key
    q = (control or {}).get("quality") or quality_key(best["metrics"], objectives)
    q2 = SECOND_FIGURE.get(q, "AP50")  # the second figure of the task
    lines = ["# SP-NAS run", "", f"**Result**: `{best['desc']['backbone']['code']}` neck "
             f"`{best['desc']['neck']['code']}`: {q} {best['metrics'][q]:.2f}, {q2} {_f(best['metrics'].get(q2))}, "
             f"{best['params']:,} params, {best['gflops']:.2f} GFLOPs", "", f"weights: `{best['weights']}`", ""]
    if control:
        lines += ["## Searched model vs equal-budget control", "",
                  "The control is the seed architecture trained from the same fine-tuned weights for as many "
                  "iterations as the searched model's lineage received since fine_tune.", "",
                  f"| | code | neck | {q} | {q2} | params | GFLOPs | latency ms | memory MiB | iterations |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key in ("searched", "control"):
            e = control[key]
            lines.append(f"| {key} | `{e['desc']['backbone']['code']}` | {e['desc']['neck']['code']} | {_f(e[q])} | "
                         f"{_f(e.get(q2))} | {e['params']:,} | {_f(e['gflops'])} | {_f(e.get('latency'))} | "
                         f"{_f(e.get('memory'))} | {e.get('iterations')} |")
        lines += ["", f"delta {q} {control['delta_' + q]:+.2f}: the **{control['winner']}** model is the result "
                  f"({control['reason']}).", ""]
        for name, ph in control.get("phases", {}).items():
            if "delta_" + q in ph:
                lines.append(f"- {name}: best candidate {ph['searched']['id']} {q} {_f(ph['searched'][q])} vs its "
                             f"control {_f(ph['control'][q])} ({ph['delta_' + q]:+.2f}, "
                             f"{ph['control']['iterations']} iterations each)")
            if ph.get("seed") is not None:
                lines.append(f"  - {seed_line(ph, q)}")
        lines.append("")
    for phase, recs in phases_records.items():
        lines += [f"## {phase}", "", f"| id | parent | serial code | neck | status | {q} | {q2} | params | GFLOPs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            m = r.get("metrics") or {}
            lines.append(f"| {r['id']} | {r.get('parent')} | `{r['desc']['backbone']['code']}` | "
                         f"{r['desc']['neck']['code']} | {r.get('status')} | {_f(m.get(q))} | {_f(m.get(q2))} | "
                         f"{r.get('params', 0):,} | {_f(r.get('gflops'))} |")
        lines.append("")
    return "\n".join(lines)


def _entry(record: Mapping[str, Any], iterations: Any) -> dict[str, Any]:
    """One model's line of ``control.json``: its quality figures (``mAP``, ``AP50``; a Mask
    R-CNN's ``segm_mAP``, ``segm_AP50`` too; a semantic model's ``mIoU``, ``pixel_acc``), costs,
    iterations and weights."""
    from ..search.settings import quality_key
    m = record.get("metrics") or {}
    figures = ("mAP", "AP50") if quality_key(m) == "mAP" else ("mIoU", "pixel_acc")
    if "segm_mAP" in m:
        figures += ("segm_mAP", "segm_AP50")
    return {"id": record.get("id"), "desc": record.get("desc"), **{k: m.get(k) for k in figures},
            "params": record.get("params"), "gflops": record.get("gflops"), "latency": record.get("latency"),
            "memory": record.get("memory"), "iterations": iterations, "weights": record.get("weights")}


def control_summary(searched: Mapping[str, Any], control: Mapping[str, Any],
                    phase_controls: Mapping[str, Mapping[str, Any]], keys: Sequence[str],
                    phase_records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """``control.json``: the searched model beside its equal-budget control (the seed trained
    from the same fine-tuned weights for as many iterations as the searched model's lineage
    received since fine_tune), ``delta_mAP`` = searched - control, which one is the run's result
    (``winner``, ``reason``) and, per search phase, its best candidate beside that phase's
    control. The deltas are of the run's quality, the first maximised of ``keys`` (box ``mAP``
    unless a search ranks by another: ``delta_segm_mAP`` for a Mask R-CNN searched by mask AP;
    ``delta_mIoU`` for a semantic model); ``quality`` names it. For a semantic model the figures
    are ``mIoU`` and ``pixel_acc``; a Mask R-CNN's entries carry box and mask figures.

    Each phase entry also says how its candidates fared against the phase's seeds as they came
    in (no further training): ``seed`` (the best seed's id and quality), ``candidates`` (ok
    candidates) and ``beat_seed`` (how many of them have a higher quality). ``beat_seed`` 0
    means the Pareto front never left the seeds' quality: every candidate's schedule cost more
    than its change gained (on the hard demo scenes a converged seed lost 0.5 mAP to 60 more
    iterations of the candidates' schedule, and every one-mutation child 3-21)."""
    from ..search.settings import quality_key
    from .steps import winner
    q = quality_key(searched.get("metrics"), keys)
    win, why = winner(searched, control, keys)
    phases = {}
    for name, ctrl in phase_controls.items():
        if ctrl is None or ctrl.get("best") is None:
            continue
        recs = {r["id"]: r for r in (phase_records or {}).get(name, [])}
        best = recs.get(ctrl["best"])
        entry = {"control": _entry(ctrl, ctrl.get("iters")), "generations": ctrl.get("generations")}
        if best is not None:
            entry["searched"] = _entry(best, ctrl.get("planned_iters"))
            entry["delta_" + q] = best["metrics"][q] - ctrl["metrics"][q]
        entry.update(_against_seeds(list(recs.values()), q))
        phases[name] = entry
    return {"searched": _entry(searched, searched.get("lineage_iters")), "control": _entry(control, control.get("iters")),
            "delta_" + q: searched["metrics"][q] - control["metrics"][q], "quality": q, "winner": win, "reason": why,
            "objectives": list(keys), "phases": phases}


def _against_seeds(records: Sequence[Mapping[str, Any]], q: str) -> dict[str, Any]:
    """``seed`` (the best ok seed: id and ``q``), ``candidates`` and ``beat_seed`` (ok candidates,
    and those of them above the best seed's ``q``) of one phase's records; {} without a seed."""
    ok = [r for r in records if r.get("status", "ok") == "ok" and (r.get("metrics") or {}).get(q) is not None]
    seeds = [r for r in ok if (r.get("round") or 0) < 0]
    if not seeds:
        return {}
    top = max(seeds, key=lambda r: r["metrics"][q])
    cands = [r for r in ok if (r.get("round") or 0) >= 0]
    return {"seed": {"id": top.get("id"), q: top["metrics"][q]}, "candidates": len(cands),
            "beat_seed": sum(r["metrics"][q] > top["metrics"][q] for r in cands)}


def phase_compute(records: Sequence[Mapping[str, Any]], control: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a phase's trainings cost: iterations, images (images x iterations summed) and
    training seconds, of its own records and of its control apart."""
    def total(recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"iterations": sum(r.get("iters") or 0 for r in recs), "images": sum(r.get("images") or 0 for r in recs),
                "train_seconds": round(sum(r.get("seconds") or 0 for r in recs), 2)}
    out = total(records)
    if control is not None:
        out["control"] = total([control])
    return out


def run_compute(phases: Mapping[str, Mapping[str, Any]], seconds: float) -> dict[str, Any]:
    """The whole run's compute: per phase (its ``compute`` and wall ``seconds``) and in total."""
    per = {name: {**(ph.get("compute") or phase_compute(ph.get("records") or [])), "seconds": ph.get("seconds")}
           for name, ph in phases.items()}
    search = {k: sum(p[k] for p in per.values()) for k in ("iterations", "images")}
    ctrl = {k: sum((p.get("control") or {}).get(k, 0) for p in per.values()) for k in ("iterations", "images")}
    return {"phases": per, "search": search, "controls": ctrl, "seconds": seconds}


def seed_line(phase: Mapping[str, Any], q: str) -> str:
    """One sentence on a phase's candidates against its seeds (a :func:`control_summary` phase
    entry with ``seed``)."""
    seed, n, beat = phase["seed"], phase["candidates"], phase["beat_seed"]
    if beat:
        return f"{beat} of {n} candidate(s) beat the best seed ({q} {_f(seed[q])})"
    return (f"no candidate of {n} beat the best seed ({q} {_f(seed[q])}): the search kept the seed's quality, its "
            "candidates' schedule cost more than their changes gained")


def _f(value: Any) -> str:
    """A number with 2 decimals, or "-"."""
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
