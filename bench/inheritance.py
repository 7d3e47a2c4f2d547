"""Weight inheritance (SPEC 3) versus training from scratch, on the same child architecture.

The goal: a child network that starts from its parent's weights
(``spnas.models.inherit.inherit_weights``) reaches after the search's short schedule at least twice
the mAP of the same child trained from a random initialisation -- ratio inherited / scratch
mAP >= 2 on the demo data. That is what lets SP-NAS rank candidates after one epoch.

The parent is the demo seed (configs/demo-model.json, code 1-2-2-2) fine-tuned with the demo
config's ``fine_tune`` trainer (2 epochs). The child is made from the parent's code by one
expand and then one swap (the SpNasS operators ``spnas.search.expand`` / ``swap`` with a seeded
``random.Random``), or given with ``--child``. The child is then trained twice per repeat with
the demo config's ``serial`` trainer (1 epoch; same TrainConfig, same seed, same data order):

* inherited: ``init=`` the state dict from ``inherit_weights(parent_desc, parent_state, child_desc)``;
* scratch: no ``init`` (``build_detector``'s random initialisation under the same seed).

Repeats use training seeds 0, 1, 2, ... (data order, fresh tensors); medians are reported.
Every training runs in its own folder (``train_architecture`` resumes from an existing one).

    python bench/inheritance.py [--repeats 3] [--child 1-12-2-2] [--epochs 1] [--data DIR] [--quick]

``--quick`` (a check that the script runs, not a measurement): 24 train + 8 val demo images, 1
parent epoch, 1 child epoch, 1 repeat.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from spnas.config import load_config
from spnas.data.demo import write_demo_dataset
from spnas.data.source import CocoSource
from spnas.models.checkpoint import load_checkpoint
from spnas.models.desc import normalize_desc
from spnas.models.inherit import inherit_weights
from spnas.orchestration.phases import fine_tune
from spnas.search import expand, swap
from spnas.training.architecture import train_architecture
from spnas.training.schedule import TrainConfig
from spnas.utils.fileio import read_json

ROOT = Path(__file__).resolve().parent.parent


def make_child(code: str, seed: int) -> tuple[str, list[str]]:
    """One expand, then one swap of ``code`` drawn with ``random.Random(seed)``: ``(child, steps)``."""
    rng = random.Random(seed)
    expanded = expand(code, rng)
    swapped = swap(expanded, rng)
    if swapped is None:  # cannot happen after an expand (some stage has two blocks), kept for safety
        return expanded, [f"expand -> {expanded}"]
    return swapped, [f"expand -> {expanded}", f"swap -> {swapped}"]


def train_child(data: CocoSource, desc: dict[str, Any], out: Path, cfg: TrainConfig,
                init: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Train ``desc`` once in ``out`` (a fresh folder); returns the performance dict and wall time."""
    t = time.perf_counter()
    perf = train_architecture(desc, data, out, cfg, arch_id=1, init=init, progress=False)
    perf["wall"] = time.perf_counter() - t
    return perf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO-layout data root (default: fresh demo data)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yml",
                    help="run config whose fine_tune and serial trainers are used")
    ap.add_argument("--desc", type=Path, default=ROOT / "configs" / "demo-model.json", help="parent description")
    ap.add_argument("--child", default=None, help="child serial code (default: expand + swap of the parent's)")
    ap.add_argument("--child-seed", type=int, default=0, help="random.Random seed of the expand + swap")
    ap.add_argument("--parent-epochs", type=int, default=None, help="fine-tune epochs (default: the config's)")
    ap.add_argument("--epochs", type=int, default=None, help="child epochs (default: the serial trainer's)")
    ap.add_argument("--repeats", type=int, default=3, help="child trainings per side, seeds 0..repeats-1")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny demo set, 1 parent epoch, 1 child epoch, 1 repeat: checks that the script runs")
    args = ap.parse_args()
    if args.quick:
        args.parent_epochs, args.epochs, args.repeats = 1, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="spnas-bench-") as tmp:
        tmp_dir = Path(tmp)
        data_root = args.data
        if data_root is None:
            t = time.perf_counter()
            data_root = write_demo_dataset(tmp_dir / "data", **({"train": 24, "val": 8} if args.quick else {}))
            print(f"demo data written in {time.perf_counter() - t:.1f} s")
        config = load_config(args.config, workdir=tmp_dir / "run",
                             overrides=[f"fine_tune.dataset.common.data_root={data_root}"])
        ft_step = config.step("fine_tune")
        data = ft_step.dataset.source
        ft_cfg, child_cfg = ft_step.trainer, config.step("serial").trainer
        if args.parent_epochs is not None:
            ft_cfg = dataclasses.replace(ft_cfg, epochs=args.parent_epochs, iters=None)
        if args.epochs is not None:
            child_cfg = dataclasses.replace(child_cfg, epochs=args.epochs, iters=None)

        # Parent: the fine-tuned seed, exactly as the fine_tune phase makes it, from --desc (no search
        # space code, no pretrained checkpoint) with the fine_tune trainer.
        parent_step = dataclasses.replace(ft_step, model_desc=json.loads(args.desc.read_text()), trainer=ft_cfg,
                                          codes=(), pretrained_model_file=None)
        t = time.perf_counter()
        parent = fine_tune(parent_step, data, tmp_dir / "parent")
        parent_desc = read_json(parent["desc"])
        parent_state = load_checkpoint(parent["model"])
        pm = parent["metrics"]
        print(f"parent {parent_desc['backbone']['code']}: {ft_cfg.epochs} epochs in {time.perf_counter() - t:.1f} s, "
              f"mAP {pm['mAP']:.2f} AP50 {pm['AP50']:.2f}, {pm['params']:,} params")

        if args.child:
            child_code, steps = args.child, ["given with --child"]
        else:
            child_code, steps = make_child(parent_desc["backbone"]["code"], args.child_seed)
        child_desc = json.loads(json.dumps(parent_desc))
        child_desc["backbone"]["code"] = child_code
        child_desc["neck"]["code"] = []  # all zeros for the child's stage count
        child_desc = normalize_desc(child_desc)
        print(f"child  {child_code}  ({'; '.join(steps)})")

        runs: dict[str, list[dict[str, Any]]] = {"inherited": [], "scratch": []}
        for r in range(args.repeats):
            cfg = dataclasses.replace(child_cfg, seed=child_cfg.seed + r)
            state, report = inherit_weights(parent_desc, parent_state, child_desc, seed=cfg.seed)
            n_inh, n_fresh = len(report["inherited"]), len(report["fresh"])
            order = [("inherited", state), ("scratch", None)]
            if r % 2:
                order.reverse()
            for name, init in order:
                perf = train_child(data, child_desc, tmp_dir / f"{name}_{r}", cfg, init)
                runs[name].append(perf)
                extra = f", {n_inh}/{n_inh + n_fresh} tensors inherited" if name == "inherited" else ""
                print(f"repeat {r + 1} seed {cfg.seed} {name:9s} mAP {perf['mAP']:6.2f}  AP50 {perf['AP50']:6.2f}  "
                      f"({perf['wall']:.1f} s{extra})")

    def med(name: str, key: str) -> float:
        return statistics.median(float(p[key]) for p in runs[name])

    def maps(name: str) -> str:
        return ", ".join(f"{p['mAP']:.2f}" for p in runs[name])

    m_inh, m_scr = med("inherited", "mAP"), med("scratch", "mAP")
    a_inh, a_scr = med("inherited", "AP50"), med("scratch", "AP50")
    print(f"threads {torch.get_num_threads()}, child {child_code} ({runs['scratch'][0]['params']:,} params), "
          f"{child_cfg.epochs} epoch(s) x {args.repeats} repeat(s) per side, batch {child_cfg.batch_size}, "
          f"lr {child_cfg.lr}; parent mAP {pm['mAP']:.2f} after {ft_cfg.epochs} epochs")
    print(f"inherited from parent   median mAP {m_inh:6.2f}  AP50 {a_inh:6.2f}  (mAPs {maps('inherited')})")
    print(f"from scratch            median mAP {m_scr:6.2f}  AP50 {a_scr:6.2f}  (mAPs {maps('scratch')})")
    ratio = f"{m_inh / m_scr:.2f}" if m_scr > 0 else "inf (scratch mAP is 0)"
    ratio50 = f"{a_inh / a_scr:.2f}" if a_scr > 0 else "inf"
    print(f"ratio inherited / scratch mAP {ratio}  (AP50 ratio {ratio50}; goal mAP ratio >= 2)")


if __name__ == "__main__":
    main()
