"""Training throughput of spnas.training.engine.train versus a plain torchvision-references loop.

The goal: the project's training loop (seeded data order, LR schedule, non-finite loss check,
checkpointing, tqdm hooks) costs no more than a bare loop written the way torchvision's
``references/detection/engine.py`` ``train_one_epoch`` trains -- images/s ratio
spnas / reference >= 0.97.

Both sides train the same demo detector (configs/demo-model.json) from the same initial
weights (a copied state dict) on the same demo data in the same order, with SGD (lr 0.02,
momentum 0.9, weight decay 1e-4), batch size 4 and the same number of steps. Each side first
runs a few untimed warm-up steps; then timed runs alternate A, B, A, B... so that machine
noise hits both alike. Every timed run starts from the initial weights and is timed end to end
from outside: optimizer and scheduler set-up, data loading, every step, and (for spnas) the
checkpoint that ``train`` writes at the end. No evaluation (``val_set=None``).

    python bench/train_throughput.py [--steps 40] [--warmup-steps 5] [--rounds 3] [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from spnas.data.coco import CocoDetection, collate, load_split
from spnas.data.demo import write_demo_dataset
from spnas.models.detector import build_detector
from spnas.training.engine import train
from spnas.training.schedule import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
LR, MOMENTUM, WEIGHT_DECAY, WARMUP_FACTOR, WARMUP_ITERS = 0.02, 0.9, 1e-4, 0.001, 100


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_spnas(model: nn.Module, train_set: CocoDetection, steps: int, batch_size: int, workers: int,
              ckpt_dir: Path, device: str) -> dict[str, float]:
    """``steps`` iterations of ``spnas.training.engine.train``; wall time measured around the call."""
    # AMP and channels_last only apply on CUDA; turned off so both sides do the same fp32 work.
    cfg = TrainConfig(iters=steps, batch_size=batch_size, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                      warmup_iters=WARMUP_ITERS, warmup_factor=WARMUP_FACTOR, workers=workers,
                      amp=False, channels_last=False, eval_every=1, checkpoint_every=0,
                      lr_scaling="none")  # the reference loop runs at LR as it is
    _sync(device)
    t = time.perf_counter()
    out = train(model, train_set, None, cfg, ckpt_dir, device=device, resume=False, progress=False)
    _sync(device)
    wall = time.perf_counter() - t
    return {"wall": wall, "images": float(out["images"]), "inner": float(out["seconds"])}


def run_reference(model: nn.Module, train_set: CocoDetection, steps: int, batch_size: int, workers: int,
                  device: str) -> dict[str, float]:
    """``steps`` iterations of a loop in the style of torchvision's ``train_one_epoch``."""
    _sync(device)
    t = time.perf_counter()
    torch.manual_seed(0)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    warmup = min(WARMUP_ITERS, max(steps - 1, 0))
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_FACTOR, total_iters=warmup)
    model.train()
    step, images_seen, epoch = 0, 0, 0
    while step < steps:
        train_set.set_epoch(epoch)  # same flips and order as spnas.data.coco.make_loader(seed=0, epoch)
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(epoch), collate_fn=collate)
        for images, targets in loader:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in tgt.items() if k != "image_id"} for tgt in targets]
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"reference loop: loss is {loss_value} at step {step}")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            lr_scheduler.step()
            step += 1
            images_seen += len(images)
            if step >= steps:
                break
        epoch += 1
    _sync(device)
    wall = time.perf_counter() - t
    return {"wall": wall, "images": float(images_seen), "inner": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO-layout data root (default: fresh demo data)")
    ap.add_argument("--desc", type=Path, default=ROOT / "configs" / "demo-model.json")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per side before the runs")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per side, alternating")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="spnas-bench-") as tmp:
        tmp_dir = Path(tmp)
        data_root = args.data
        if data_root is None:
            t = time.perf_counter()
            data_root = write_demo_dataset(tmp_dir / "data")
            print(f"demo data written in {time.perf_counter() - t:.1f} s")
        train_set = load_split(data_root, "train", train=True, seed=0)

        desc: dict[str, Any] = json.loads(args.desc.read_text())
        desc["num_classes"] = train_set.num_classes
        torch.manual_seed(0)
        ours = build_detector(desc)
        initial = {k: v.detach().clone() for k, v in ours.state_dict().items()}
        ref = build_detector(desc)
        ref.load_state_dict(initial, strict=True)

        ckpt_dir = tmp_dir / "ckpt"

        def side_a(n: int) -> dict[str, float]:
            return run_spnas(ours, train_set, n, args.batch_size, args.workers, ckpt_dir, args.device)

        def side_b(n: int) -> dict[str, float]:
            return run_reference(ref, train_set, n, args.batch_size, args.workers, args.device)

        if args.warmup_steps > 0:  # untimed warm-up of both sides
            side_a(args.warmup_steps)
            side_b(args.warmup_steps)

        runs: dict[str, list[dict[str, float]]] = {"spnas": [], "reference": []}
        for r in range(args.rounds):
            order = [("spnas", ours, side_a), ("reference", ref, side_b)]
            if r % 2:
                order.reverse()
            for name, model, run in order:
                model.load_state_dict(initial, strict=True)  # every run starts from the same weights
                res = run(args.steps)
                runs[name].append(res)
                print(f"round {r + 1} {name:9s} {res['wall']:7.2f} s  {res['images'] / res['wall']:6.2f} images/s")

    def ips(name: str) -> list[float]:
        return [x["images"] / x["wall"] for x in runs[name]]

    m_ours, m_ref = statistics.median(ips("spnas")), statistics.median(ips("reference"))
    inner = statistics.median(x["images"] / x["inner"] for x in runs["spnas"])
    print(f"device {args.device}, threads {torch.get_num_threads()}, {len(train_set)} training images, "
          f"batch {args.batch_size}, {args.steps} timed steps x {args.rounds} alternating rounds "
          f"(after {args.warmup_steps} warm-up steps each)")
    print(f"reference loop (torchvision style)  median {m_ref:7.2f} images/s  (max {max(ips('reference')):.2f})")
    print(f"spnas.training.engine.train         median {m_ours:7.2f} images/s  (max {max(ips('spnas')):.2f}; "
          f"{inner:.2f} by train()'s own clock)")
    print(f"ratio spnas / reference             {m_ours / m_ref:.3f}  (goal >= 0.97)")


if __name__ == "__main__":
    main()
