"""What a run reports: Vega's ``output.csv``, Pareto-front plots (matplotlib, Agg backend) and
the Markdown summary of the Kubeflow pipeline. Every file is written atomically. No torch."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.fileio import atomic_write_bytes


def pareto_plot(records: Sequence[dict], front_ids: Sequence, path: str | Path, title: str) -> Path:
    """mAP versus params (millions) for every evaluated record; the front highlighted and
    joined, failed candidates marked on the x axis, each point labelled with its id."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and (r.get("metrics") or {}).get("mAP") is not None]
    failed = [r for r in records if r.get("status") == "failed"]
    front = sorted((r for r in ok if r["id"] in set(front_ids)), key=lambda r: r["params"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r["params"] / 1e6 for r in ok], [r["metrics"]["mAP"] for r in ok], s=28, c="#9aa5b1",
               label=f"candidates ({len(ok)})", zorder=2)
    if front:
        ax.step([r["params"] / 1e6 for r in front], [r["metrics"]["mAP"] for r in front], where="post",
                c="#d1495b", lw=1.2, zorder=3)
        ax.scatter([r["params"] / 1e6 for r in front], [r["metrics"]["mAP"] for r in front], s=60, c="#d1495b",
                   edgecolors="black", linewidths=0.6, label=f"Pareto front ({len(front)})", zorder=4)
    if failed:
        ax.scatter([r["params"] / 1e6 for r in failed if r.get("params")], [0] * len([r for r in failed if r.get("params")]),
                   marker="x", c="black", label=f"failed ({len(failed)})", zorder=4)
    seeds = [r for r in ok if r.get("parent") is None]
    if seeds:
        ax.scatter([r["params"] / 1e6 for r in seeds], [r["metrics"]["mAP"] for r in seeds], s=90, marker="s",
                   facecolors="none", edgecolors="#1d3557", linewidths=1.2, label=f"seeds ({len(seeds)})", zorder=5)
    for r in ok:
        ax.annotate(str(r["id"]), (r["params"] / 1e6, r["metrics"]["mAP"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=7, color="#333333")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("mAP (COCO AP@[.5:.95] x 100)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
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


def report_markdown(phases_records: Mapping[str, Sequence[Mapping[str, Any]]], best: Mapping[str, Any]) -> str:
    """A Markdown summary: the best model and a table of every candidate of every phase."""
    lines = ["# SP-NAS run", "", f"**Best model**: `{best['desc']['backbone']['code']}` neck "
             f"`{best['desc']['neck']['code']}`: mAP {best['metrics']['mAP']:.2f}, AP50 {best['metrics']['AP50']:.2f}, "
             f"{best['params']:,} params, {best['gflops']:.2f} GFLOPs", "", f"weights: `{best['weights']}`", ""]
    for phase, recs in phases_records.items():
        lines += [f"## {phase}", "", "| id | parent | serial code | neck | status | mAP | AP50 | params | GFLOPs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in recs:
            m = r.get("metrics") or {}
            def fmt(v):
                return (f"{v:.2f}" if isinstance(v, (int, float)) else "-")
            lines.append(f"| {r['id']} | {r.get('parent')} | `{r['desc']['backbone']['code']}` | "
                         f"{r['desc']['neck']['code']} | {r.get('status')} | {fmt(m.get('mAP'))} | {fmt(m.get('AP50'))} | "
                         f"{r.get('params', 0):,} | {fmt(r.get('gflops'))} |")
        lines.append("")
    return "\n".join(lines)
