"""Peak resident memory of the demo training on CPU (goal: < 4 GB).

A child Python process (this script with ``--child``) writes the demo data set (unless
``--data DIR`` is given), then trains the demo model (configs/demo-model.json) with
``spnas.training.architecture.train_architecture`` -- 2 epochs, batch size 4, 50 warm-up
iterations, with evaluation after each epoch -- on the CPU, exactly as ``spnas train`` would.
The parent waits for it and reads the child's peak resident set size from
``resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss`` (KiB on Linux). The parent imports
neither torch nor spnas, so the number is that of the training process alone.

    python bench/peak_memory.py [--epochs 2] [--data DIR] [--quick]

``--quick`` (a check that the script runs, not a measurement): 24 train + 8 val demo images, 1 epoch.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_BYTES = 4 * 10**9  # 4 GB


def child(data: Path | None, desc_path: Path, epochs: int, result_path: Path, work: Path, quick: bool = False) -> None:
    """Write the demo data (unless given; a small set when ``quick``), train the demo model, write a
    JSON summary."""
    sys.path.insert(0, str(ROOT))
    from spnas.data.demo import write_demo_dataset
    from spnas.data.source import CocoSource
    from spnas.training.architecture import train_architecture
    from spnas.training.schedule import TrainConfig

    t = time.perf_counter()
    sizes = {"train": 24, "val": 8} if quick else {}
    data_root = data if data is not None else write_demo_dataset(work / "data", **sizes)
    data_seconds = time.perf_counter() - t
    cfg = TrainConfig(epochs=epochs, batch_size=4, warmup_iters=50)
    source = CocoSource(str(data_root))
    # train_architecture loads the splits itself (and takes the class count from them); they
    # are loaded here only to count the images, and dropped before the training.
    n_train, n_val = len(source.load("train", train=True, seed=cfg.seed)), len(source.load("val", train=False))
    desc = json.loads(desc_path.read_text())
    t = time.perf_counter()
    perf = train_architecture(desc, source, work / "out", cfg, device="cpu", resume=False)
    wall = time.perf_counter() - t
    summary = {"mAP": perf.get("mAP"), "AP50": perf.get("AP50"), "iters": perf["iters"],
               "train_seconds": perf["train_seconds"], "wall_seconds": wall, "data_seconds": data_seconds,
               "train_images": n_train, "val_images": n_val,
               "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    result_path.write_text(json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO-layout data root (default: fresh demo data)")
    ap.add_argument("--desc", type=Path, default=ROOT / "configs" / "demo-model.json")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny demo set and 1 epoch: checks that the script runs")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # internal: result file
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)  # internal: scratch folder
    args = ap.parse_args()
    if args.quick:
        args.epochs = 1

    if args.child is not None:
        child(args.data, args.desc, args.epochs, args.child, args.work, args.quick)
        return

    with tempfile.TemporaryDirectory(prefix="spnas-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_path), "--work", tmp,
               "--desc", str(args.desc.resolve()), "--epochs", str(args.epochs)]
        if args.data is not None:
            cmd += ["--data", str(args.data.resolve())]
        if args.quick:
            cmd.append("--quick")
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        total = time.perf_counter() - t
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"the training child failed with exit status {proc.returncode}")
        summary = json.loads(result_path.read_text())

    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_bytes = peak_kib * 1024
    m_ap, ap50 = summary["mAP"], summary["AP50"]
    print(f"demo training on cpu: {summary['train_images']} train / {summary['val_images']} val images, "
          f"{args.epochs} epochs = {summary['iters']} iterations, batch 4, evaluation after each epoch")
    print(f"mAP {m_ap if m_ap is None else f'{m_ap:.2f}'}  AP50 {ap50 if ap50 is None else f'{ap50:.2f}'}")
    print(f"training {summary['train_seconds']:.1f} s (train_architecture {summary['wall_seconds']:.1f} s, "
          f"demo data {summary['data_seconds']:.1f} s, child process {total:.1f} s)")
    print(f"peak RSS of the child  {peak_kib / 1024:8.1f} MiB = {peak_bytes / 1e9:.3f} GB "
          f"(child's own RUSAGE_SELF: {summary['self_maxrss_kib'] / 1024:.1f} MiB)")
    print(f"ratio peak / 4 GB goal {peak_bytes / GOAL_BYTES:.3f}  (goal < 1.000: "
          f"{'met' if peak_bytes < GOAL_BYTES else 'NOT met'})")


if __name__ == "__main__":
    main()
