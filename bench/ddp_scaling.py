"""Data-parallel scaling: training throughput of one process against N (torch.distributed).

The same training (the demo detector, configs/demo-model.json, on the demo data) runs with
``nproc`` 1 and N through the library's own path (``train_architecture(..., nproc=N)``, a
``torch.distributed.run`` launch for N > 1): the per-process batch is fixed, so N processes
train N times the images per step. Reported per run: images/s of the training loop (the
engine's own timing: data, steps, checkpoints; no evaluation, no process start-up) and the wall
time of the whole call (start-up and the final evaluation included). Scaling efficiency =
images/s(N) / (N x images/s(1)); the goal on GPUs is >= 0.9 per added GPU. On a 2-core CPU
expect little: both processes share the cores (each gets one thread) and gloo's all-reduce of
the gradients is not free. Runs alternate 1, N, 1, N... so machine noise hits both.

    python bench/ddp_scaling.py [--nproc 2] [--device cpu|cuda] [--iters 30] [--batch-size 4] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from spnas.data.demo import write_demo_dataset
from spnas.data.source import CocoSource
from spnas.training.architecture import train_architecture
from spnas.training.schedule import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def one_run(nproc: int, data: Path, out: Path, iters: int, batch: int, device: str) -> dict[str, float]:
    desc = json.loads((ROOT / "configs" / "demo-model.json").read_text())
    cfg = TrainConfig(iters=iters, batch_size=batch, warmup_iters=5, eval_every=0, checkpoint_every=0)
    t = time.perf_counter()
    perf = train_architecture(desc, CocoSource(str(data)), out, cfg, device=device, resume=False, nproc=nproc)
    return {"images_per_second": perf["images_per_second"], "wall": time.perf_counter() - t,
            "global_batch": perf["global_batch"], "mAP": perf["mAP"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", default=None, help="demo data folder (default: generated in a temp folder)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else write_demo_dataset(Path(tmp) / "data", train=240, val=20)
        runs: dict[int, list[dict[str, float]]] = {1: [], args.nproc: []}
        for r in range(args.rounds):
            for n in (1, args.nproc):
                res = one_run(n, data, Path(tmp) / f"run_{n}_{r}", args.iters, args.batch_size, args.device)
                runs[n].append(res)
                print(f"round {r}: nproc {n}: {res['images_per_second']:.1f} images/s in the loop, "
                      f"{res['wall']:.1f} s wall (global batch {res['global_batch']})", flush=True)
    one = statistics.median(x["images_per_second"] for x in runs[1])
    many = statistics.median(x["images_per_second"] for x in runs[args.nproc])
    eff = many / (args.nproc * one)
    summary = {"device": args.device, "nproc": args.nproc, "iters": args.iters, "batch_per_process": args.batch_size,
               "images_per_second_1": round(one, 2), f"images_per_second_{args.nproc}": round(many, 2),
               "speedup": round(many / one, 3), "efficiency": round(eff, 3),
               "wall_1": round(statistics.median(x["wall"] for x in runs[1]), 1),
               f"wall_{args.nproc}": round(statistics.median(x["wall"] for x in runs[args.nproc]), 1)}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
