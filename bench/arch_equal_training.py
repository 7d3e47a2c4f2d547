"""Does the architecture matter at equal training? The ceiling of what a search can gain.

Each architecture (serial code + neck code) inherits a run's fine-tuned seed weights (the same
morphisms the search uses: ``inherit_weights`` from the seed) and is trained with one schedule,
the same for all, then evaluated; every architecture is trained under each ``--seeds`` value
(data order, fresh tensors) so the spread between seeds shows the noise. An architecture that
does not beat the seed here cannot make the search beat its equal-budget control, whatever
the search does: this bench separates "the search picks badly" from "nothing better exists at
this budget".

    python bench/arch_equal_training.py RUN_DIR DATA_ROOT [--epochs 4] [--seeds 0 1]
        [--arch 1-2-2-2:0,0,0,0 1-21-2-2:0,0,0,0 ...] [--scratch] [--out DIR]

RUN_DIR is a ``spnas run`` workdir (its ``output/fine_tune/desc_0.json`` and ``model_0.pth``)
or any folder holding a ``desc_0.json`` and ``model_0.pth`` (e.g. one training of this bench,
to start from a seed trained longer); the schedule is SGD lr 0.08 per 16 images (linear
scaling), 50 warm-up iterations, cosine, the seed's batch size. ``--scratch`` trains every
architecture from fresh weights instead (only the seed's description is read): does capacity
pay off at all on this data and schedule? Prints one line per architecture: params, mAP per
seed, mean.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

DEFAULT_ARCHS = ["1-2-2-2:0,0,0,0", "1-21-2-2:0,0,0,0", "1-2-21-2:0,0,0,0", "11-2-2-2:0,0,0,0",
                 "1-2-2-2:1,0,0,0", "1-2-2-2:0,0,0,1", "11-21-21-2:0,0,0,0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a spnas run workdir (output/fine_tune/ is read)")
    ap.add_argument("data", help="the COCO-layout data root the run trained on")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arch", nargs="+", default=DEFAULT_ARCHS, help="CODE:NECK, e.g. 1-21-2-2:0,0,0,0")
    ap.add_argument("--scratch", action="store_true", help="fresh weights for every architecture (no inheritance)")
    ap.add_argument("--out", type=Path, default=None, help="keep the trainings here (default: a temporary folder)")
    args = ap.parse_args()
    import torch

    from spnas.data.source import CocoSource
    from spnas.models.checkpoint import load_checkpoint
    from spnas.models.inherit import inherit_weights
    from spnas.training.architecture import train_architecture
    from spnas.training.schedule import TrainConfig

    ft = args.run / "output" / "fine_tune"
    ft = ft if (ft / "desc_0.json").is_file() else args.run
    seed_desc = json.loads((ft / "desc_0.json").read_text())
    state = None if args.scratch else load_checkpoint(ft / "model_0.pth")
    out = args.out or Path(tempfile.mkdtemp(prefix="spnas-arch-"))
    print(f"seed {seed_desc['backbone']['code']} from {ft}{' (description only: --scratch)' if args.scratch else ''}, "
          f"{args.epochs} epochs, seeds {args.seeds}, torch threads {torch.get_num_threads()}")
    rows = []
    for arch in args.arch:
        code, _, neck_text = arch.partition(":")
        neck = [int(v) for v in neck_text.split(",")] if neck_text else [0] * len(code.split("-"))
        child = json.loads(json.dumps(seed_desc))
        child["backbone"]["code"], child["neck"]["code"] = code, neck
        init = None if state is None else inherit_weights(seed_desc, state, child)[0]
        maps, params = [], None
        for s in args.seeds:
            cfg = TrainConfig(epochs=args.epochs, batch_size=seed_desc.get("batch_size", 4), lr=0.08, warmup_iters=50,
                              schedule="cosine", seed=s, eval_every=0)
            perf = train_architecture(child, CocoSource(args.data), out / f"{code}_{'-'.join(map(str, neck))}_{s}", cfg,
                                      init=init)
            maps.append(perf["mAP"])
            params = perf["params"]
        rows.append({"code": code, "neck": neck, "params": params, "mAP": maps, "mean": statistics.mean(maps),
                     "epochs": args.epochs, "scratch": args.scratch})
        print(f"{code:12s} {str(neck):14s} params {params:>10,}  mAP " + " ".join(f"{m:6.2f}" for m in maps)
              + f"  mean {statistics.mean(maps):6.2f}", flush=True)
    (out / "arch_equal_training.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"details: {out / 'arch_equal_training.json'}")


if __name__ == "__main__":
    main()
