"""Share of ``spnas run`` wall time spent outside training and evaluation.

The goal: the orchestration around the work that matters -- model building, weight loading and
inheritance, parameter/FLOP counting, data-set loading, search bookkeeping, file writes, plots --
takes less than 10% of a run's wall time.

The demo config (configs/demo.yml: fine_tune, serial, reignition, parallel, fully_train) runs
in-process with ``spnas.orchestration.local.run(load_config(...), workers=1, progress=False)`` on
demo data in a temporary folder. Before that, the functions the callers use are wrapped (by their
module attribute, where the caller looks them up) to accumulate wall time:

* work: ``train`` as ``spnas.training.architecture`` calls it (every detector training; it
  evaluates after each epoch and writes its own checkpoints), ``evaluate`` as it is called there
  (evaluations outside ``train``: the reignited detectors) and ``reignite`` as
  ``spnas.orchestration.phases`` calls it (the backbone's classification training, crops cut from
  the detection set included).
* overhead, by part: model building, weight loading, inheritance, params/FLOPs counting,
  data-set loading, search state (propose/update/init), file writes and reads, plots.

A call made while another wrapped call is running counts once: inside a work call it stays
work (listed as "of which ..." under it, for information); inside an overhead call it is
taken off the outer call's time (exclusive times). What no wrapper sees is "other" (logging, JSON copies,
Python glue). The share is (wall - work) / wall.

    python bench/overhead.py [--config configs/demo.yml] [--set key=value ...] [--data DIR] [--quick]

``--quick`` (a check that the script runs, not a measurement): 16 train + 6 val demo images of
96 px and :data:`QUICK` (the demo config shrunk to a run of seconds, as the tests do it).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spnas.config import load_config
from spnas.data.demo import write_demo_dataset
from spnas.orchestration.local import run

ROOT = Path(__file__).resolve().parent.parent
ARCH, PHASES, ROUNDS = "spnas.training.architecture", "spnas.orchestration.phases", "spnas.orchestration.rounds"

#: (module, attribute, part). Work parts are timed inclusively; overhead parts exclusively.
WORK = [
    (ARCH, "train", "training"),
    (ARCH, "evaluate", "evaluation"),
    (PHASES, "reignite", "reignition training"),
]
INSIDE_WORK = [  # only seen inside work calls: reported for information
    ("spnas.training.engine", "evaluate", "evaluation in train()"),
    ("spnas.training.engine", "save_checkpoint", "checkpoint writes in train()"),
    ("spnas.training.reignite", "crops_from_detection", "crop cutting in reignite()"),
]
OVERHEAD = [
    (ARCH, "build_detector", "model building"),
    ("spnas.models.inherit", "build_detector", "model building"),
    (ARCH, "load_weights", "weight loading"),
    (PHASES, "inherit_weights", "inheritance"),
    (ARCH, "model_cost", "params/FLOPs counting"),
    ("spnas.search.state", "measure", "params/FLOPs counting"),
    ("spnas.models.cost", "stage_pass_gflops", "params/FLOPs counting"),  # imported at call time by the operators
    ("spnas.data.coco", "load_split", "data-set loading"),  # imported at call time by CocoSource.load
    (PHASES, "search_init", "search state"),
    (ROUNDS, "search_propose", "search state"),
    (ROUNDS, "search_update", "search state"),
    (ARCH, "atomic_write_json", "file writes"),
    (ARCH, "save_checkpoint", "file writes"),
    (PHASES, "atomic_write_json", "file writes"),
    (ROUNDS, "atomic_write_json", "file writes"),
    ("spnas.orchestration.reports", "atomic_write_bytes", "file writes"),
    ("spnas.orchestration.local", "atomic_write_json", "file writes"),
    (PHASES, "write_output_csv", "file writes"),
    (ROUNDS, "write_output_csv", "file writes"),
    (PHASES, "_cleanup", "file writes"),
    (PHASES, "load_checkpoint", "file reads"),
    (ARCH, "load_checkpoint", "file reads"),
    (PHASES, "read_json", "file reads"),
    (ROUNDS, "read_json", "file reads"),
    ("spnas.orchestration.local", "read_json", "file reads"),
    (ROUNDS, "pareto_plot", "plots"),
]

#: ``--quick``: configs/demo.yml shrunk to a run of seconds (the tests' tiny run).
QUICK = ["fine_tune.model.model_desc.min_size=96", "fine_tune.model.model_desc.max_size=96",
         "fine_tune.model.model_desc.backbone.base_channels=8", "fine_tune.trainer.epochs=1",
         "fine_tune.trainer.lr_scheduler.params.warmup_iters=2",
         "serial.search_algorithm.max_sample=2", "serial.search_algorithm.flops_size=96",
         "parallel.search_algorithm.max_sample=2", "parallel.search_algorithm.flops_size=96",
         "reignition.top_k=1", "fully_train.trainer.epochs=1",
         "fully_train.trainer.lr_scheduler.params.after_scheduler_config.params.milestones=[1]"]


@dataclass
class _Frame:
    work: bool
    child: float = 0.0


class Clock:
    """Wall time per part of wrapped calls, nested calls counted once."""

    def __init__(self) -> None:
        self.work: dict[str, float] = defaultdict(float)
        self.overhead: dict[str, float] = defaultdict(float)
        self.inside: dict[str, float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)  # (kind, part) -> calls
        self._stack: list[_Frame] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, module: str, attr: str, part: str, work: bool) -> None:
        """Replace ``module.attr`` by a timed wrapper (undone by :meth:`restore`)."""
        mod = importlib.import_module(module)
        fn: Callable[..., Any] = getattr(mod, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            in_work = any(f.work for f in self._stack)
            frame = _Frame(work or in_work)
            self._stack.append(frame)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self._stack.pop()
                if in_work:
                    self.inside[part] += dt
                    self.calls["inside", part] += 1
                elif work:
                    self.work[part] += dt
                    self.calls["work", part] += 1
                else:
                    self.overhead[part] += dt - frame.child
                    self.calls["overhead", part] += 1
                if self._stack:
                    self._stack[-1].child += dt

        self._undo.append((mod, attr, fn))
        setattr(mod, attr, timed)

    def restore(self) -> None:
        for mod, attr, fn in reversed(self._undo):
            setattr(mod, attr, fn)
        self._undo.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO-layout data root (default: fresh demo data)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, as `spnas run --set` (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny demo set and config: checks that the script runs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="spnas-bench-") as tmp:
        tmp_dir = Path(tmp)
        data_root = args.data
        if data_root is None:
            t = time.perf_counter()
            sizes = {"train": 16, "val": 6, "size": 96} if args.quick else {}
            data_root = write_demo_dataset(tmp_dir / "data", **sizes)
            print(f"demo data written in {time.perf_counter() - t:.1f} s")
        quick = QUICK if args.quick else []
        config = load_config(args.config, workdir=tmp_dir / "run",
                             overrides=[f"fine_tune.dataset.common.data_root={data_root}", *quick, *args.overrides])
        clock = Clock()
        for table, work in ((WORK, True), (INSIDE_WORK, True), (OVERHEAD, False)):
            for module, attr, part in table:
                clock.wrap(module, attr, part, work)
        try:
            t = time.perf_counter()
            reports = run(config, workers=1, progress=False)
            wall = time.perf_counter() - t
        finally:
            clock.restore()

    work = sum(clock.work.values())
    seen = sum(clock.overhead.values())
    rest = wall - work
    print(f"threads {torch.get_num_threads()}, config {args.config.name} "
          f"({', '.join(s.name for s in config.steps)}), workers 1")
    print("phases: " + ", ".join(f"{name} {p['seconds']:.1f} s" for name, p in reports["phases"].items()))
    print(f"{'total wall':44s} {wall:8.2f} s")
    print(f"{'training + evaluation':44s} {work:8.2f} s  ({100 * work / wall:.1f}%)")
    for part, sec in clock.work.items():
        print(f"  {part:42s} {sec:8.2f} s  ({clock.calls['work', part]} calls)")
    for part, sec in clock.inside.items():
        print(f"    {'of which ' + part:40s} {sec:8.2f} s  ({clock.calls['inside', part]} calls)")
    print(f"{'remainder (overhead)':44s} {rest:8.2f} s  ({100 * rest / wall:.1f}%)")
    for part, sec in sorted(clock.overhead.items(), key=lambda kv: -kv[1]):
        print(f"  {part:42s} {sec:8.2f} s  ({100 * sec / wall:4.1f}%, {clock.calls['overhead', part]} calls)")
    print(f"  {'other (not wrapped)':42s} {rest - seen:8.2f} s  ({100 * (rest - seen) / wall:4.1f}%)")
    print(f"overhead share {rest / wall:.3f} ({100 * rest / wall:.1f}% of wall; goal < 10%)")


if __name__ == "__main__":
    main()
