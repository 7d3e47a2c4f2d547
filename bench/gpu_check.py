"""The GPU check: mixed precision, memory, data-parallel scaling and candidate fan-out on the GPUs
of this machine, through the project's own training engine. Run by ``bench/gpu_check.sh``.

1. AMP against fp32: training throughput (images/s of ``spnas.training.engine.train``, after an
   untimed warm-up that lets cudnn.benchmark tune) and peak GPU memory, for the demo model at
   the demo's 160 px and for the ResNet-50 code (``111-2111-211111-211`` bottleneck, 64
   channels) at 800 px, on generated scenes of that size. Goal: AMP >= 1.5x fp32 on the
   ResNet-50 code.
2. Data-parallel scaling 1 -> N GPUs (N > 1 only): ``bench/ddp_scaling.py`` (the library's own
   ``torch.distributed.run`` launch); goal: efficiency >= 0.9 per added GPU.
3. Candidate fan-out (N > 1 only): N trainings of the demo model at once, one per GPU (what
   ``spnas run --workers N`` does with a search round), against one alone: fan-out efficiency =
   time(1) / time(N at once).

``--quick`` shrinks everything (tiny images, few steps) so the script can be checked on a CPU.

    python bench/gpu_check.py [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spnas.data.coco import load_split
from spnas.data.demo import write_demo_dataset
from spnas.models.detector import build_detector
from spnas.training.engine import train
from spnas.training.schedule import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RESNET50 = {"backbone": {"code": "111-2111-211111-211", "block": "bottleneck", "base_channels": 64}}


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(desc: dict[str, Any], data: Path, amp: bool, iters: int, warmup: int, batch: int, dev: str) -> dict:
    """images/s and peak memory (MiB) of ``iters`` training steps after ``warmup`` untimed ones."""
    ds = load_split(data, "train", train=True)
    torch.manual_seed(0)
    model = build_detector({**desc, "num_classes": ds.num_classes})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(iters=warmup, batch_size=batch, amp=amp, warmup_iters=0, eval_every=0)
        train(model, ds, None, cfg, tmp, device=dev, resume=False)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(iters=iters, batch_size=batch, amp=amp, warmup_iters=0, eval_every=0)
        _sync(dev)
        res = train(model, ds, None, cfg, Path(tmp) / "timed", device=dev, resume=False)
        _sync(dev)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.startswith("cuda") else None
    return {"images_per_second": round(res["images_this_call"] / res["seconds"], 2),
            "peak_memory_mib": None if peak is None else round(peak), "iters": iters, "batch": batch}


def fan_out(n: int, data: Path, iters: int) -> dict:
    """Wall time of one demo-model training alone against ``n`` at once, one per GPU."""
    code = ("import sys; sys.path.insert(0, 'bench'); from gpu_check import throughput; import json; "
            "desc = json.load(open('configs/demo-model.json')); "
            f"print(throughput(desc, sys.argv[1], True, {iters}, 5, 4, sys.argv[2]))")

    def run(devices: list[str]) -> float:
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", code, str(data), d], cwd=ROOT) for d in devices]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a fan-out training failed")
        return time.perf_counter() - t

    alone = run(["cuda:0"])
    together = run([f"cuda:{i}" for i in range(n)])
    return {"gpus": n, "seconds_alone": round(alone, 1), "seconds_together": round(together, 1),
            "efficiency": round(alone / together, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the script itself)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("gpu_check: no CUDA device here: nothing measured (run with --quick to check the script on a CPU)")
        return
    dev = "cuda" if cuda else "cpu"
    gpus = torch.cuda.device_count() if cuda else 0
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": gpus,
                              "torch": torch.__version__,
                              "bf16": bool(cuda and torch.cuda.is_bf16_supported())}
    demo_desc = json.loads((ROOT / "configs" / "demo-model.json").read_text())
    q = args.quick
    with tempfile.TemporaryDirectory() as tmp:
        small = write_demo_dataset(Path(tmp) / "demo", train=16 if q else 200, val=4, size=160)
        big_size = 128 if q else 800
        big = write_demo_dataset(Path(tmp) / "big", train=8 if q else 48, val=4, size=big_size)
        r50 = {**RESNET50, "min_size": big_size, "max_size": big_size}
        for name, desc, data, iters, batch in (("demo model 160 px", demo_desc, small, 3 if q else 60, 8),
                                               (f"ResNet-50 code {big_size} px", r50, big, 2 if q else 30, 2 if q else 4)):
            row = {}
            for amp in (False, True):
                row["amp" if amp else "fp32"] = throughput(desc, data, amp, iters, 1 if q else 5, batch, dev)
                print(name, "amp" if amp else "fp32", row["amp" if amp else "fp32"], flush=True)
            row["amp_speedup"] = round(row["amp"]["images_per_second"] / row["fp32"]["images_per_second"], 3)
            report[name] = row
        if gpus > 1:
            out = Path(tmp) / "ddp.json"
            subprocess.run([sys.executable, str(ROOT / "bench" / "ddp_scaling.py"), "--device", "cuda", "--nproc",
                            str(gpus), "--iters", "40", "--rounds", "1", "--data", str(small), "--json", str(out)],
                           check=True, cwd=ROOT)
            report["ddp_scaling"] = json.loads(out.read_text())
            report["fan_out"] = fan_out(gpus, small, 60)
        else:
            report["ddp_scaling"] = report["fan_out"] = f"not measured: {gpus} GPU(s) (needs 2 or more)"
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
