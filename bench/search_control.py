"""Does the search beat its own control? SP-NAS against equal-budget baselines, side by side in one run.

On the demo scenes (``spnas demo-data``; ``--hard`` for the harder set: 8 classes, clutter, small
and occluded objects), one ``spnas run`` of configs/demo.yml (every phase, controls on), then,
from the same fine-tuned seed and the same data:

1. **equal-budget control** (from the run's control.json): the seed trained from the same
   fine-tuned weights for as many iterations as the final searched model's lineage received
   since fine_tune. Goal: the searched model is +2 mAP or more at no more params.
2. **the seed trained for the whole search's compute**: every training iteration of the run
   after fine_tune (all candidates of both searches, the full train) spent on the seed instead
   (the full train's schedule stretched).
3. **random search at the same budget, same inheritance** (serial phase): the same number of
   candidates, the same operators, each child inheriting its parent's weights and trained with
   the same schedule, but parents drawn uniformly from every evaluated model instead of the
   Pareto front. Compared with the run's serial phase: best mAP and hypervolume.
4. **ranking fidelity**: Kendall tau between the serial candidates' short-schedule mAP and their
   mAP after a schedule ``--long-factor`` times longer from the same inherited weights. Goal >= 0.7.

Every figure is printed as measured, misses included.

    python bench/search_control.py [--hard] [--train 240] [--val 60] [--workers 1] [--long-factor 3] [--quick]
        [--set serial.search_algorithm.refresh_seeds=true ...]

The default is the demo scenes. On the hard scenes the demo's 2-epoch fine_tune learns too
little to compare anything (mAP 1.0 with the 1024-wide head); give it ``--fine-tune-epochs 8``
(mAP 23.9 after 480 iterations, 9 minutes for the whole bench with ``--workers 2`` on the 2-core
CPU, 2026-12-04). ``bench/arch_equal_training.py`` measures the ceiling: whether any
architecture beats the seed at all when both train the same schedule from the same weights.

``--quick`` (a check that the script runs, not a measurement): tiny data, 1 epoch everywhere,
2 candidates per search.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two paired lists (ties counted in both denominators)."""
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) ** 0.5
    return (concordant - discordant) / denom if denom else float("nan")


def hypervolume(points: list[tuple[float, float]], ref_params: float) -> float:
    """Area dominated by (params, mAP) points up to the reference (ref_params, 0), with params
    divided by ref_params and mAP by 100, so the value lies in [0, 1]: the integral over params of
    the best mAP reached at or below that many params."""
    pts = sorted((p / ref_params, m / 100) for p, m in points if p < ref_params and m > 0)
    area, best = 0.0, 0.0
    for k, (x, y) in enumerate(pts):
        best = max(best, y)
        area += ((pts[k + 1][0] if k + 1 < len(pts) else 1.0) - x) * best
    return area


def random_parent_search(step: Any, seed_rec: dict, data: Any, out: Path, candidates: int, device: str | None) -> list[dict]:
    """The serial search with parents drawn uniformly from every evaluated model instead of the
    Pareto front: same operators, bounds, dedup, inheritance and training as SpNasS."""
    import spnas.search.state as state_mod
    from spnas.orchestration import phases, rounds

    def all_ok(st: dict, settings: Any) -> list[dict]:
        return [r for r in st["records"] if r["status"] == "ok"]
    real = state_mod._front_records
    state_mod._front_records = all_ok  # parent choice only: proposals still go through propose()
    try:
        path = phases.search_init(dataclasses.replace(step, search={**step.search, "max_sample": candidates}),
                                  [{"desc": seed_rec["desc"], "metrics": seed_rec["metrics"],
                                    "weights": seed_rec["weights"], "lineage_iters": 0}], out, data=data, device=device)
        while True:
            cands = rounds.search_propose(path)
            if not cands:
                break
            results = [phases.train_candidate(c, step, data, out, device=device) for c in cands]
            if rounds.search_update(path, step.name, results)["done"]:
                break
    finally:
        state_mod._front_records = real
    return state_mod.records(json.loads(Path(path).read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hard", action="store_true", help="the hard scenes (spnas demo-data --hard)")
    ap.add_argument("--fine-tune-epochs", type=int, default=None, help="override fine_tune's epochs")
    ap.add_argument("--train", type=int, default=240)
    ap.add_argument("--val", type=int, default=60)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--long-factor", type=int, default=3, help="the long schedule, in short schedules (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep everything here (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="tiny and fast: checks that the script runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the run (repeatable), e.g. serial.search_algorithm.refresh_seeds=true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from spnas.config import load_config
    from spnas.orchestration import phases, steps
    from spnas.orchestration.local import run

    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="spnas-bench-"))
    data = tmp / ("hard" if args.hard else "demo")
    sizes = ["--train", "16", "--val", "8", "--size", "96"] if args.quick else ["--train", str(args.train), "--val",
                                                                                 str(args.val)]
    if not (data / "annotations" / "instances_val2017.json").is_file():
        subprocess.run([sys.executable, "-m", "spnas", "demo-data", str(data), *(["--hard"] if args.hard else []),
                        "--seed", str(args.seed), *sizes], check=True, capture_output=True)
    overrides = [f"fine_tune.dataset.common.data_root={data}", f"general.seed={args.seed}"]
    overrides += args.set
    if args.fine_tune_epochs is not None:
        overrides.append(f"fine_tune.trainer.epochs={args.fine_tune_epochs}")
    if args.quick:
        overrides += ["fine_tune.model.model_desc.min_size=96", "fine_tune.model.model_desc.max_size=96",
                      "fine_tune.trainer.epochs=1", "serial.search_algorithm.max_sample=2",
                      "parallel.search_algorithm.max_sample=2", "serial.search_algorithm.flops_size=96",
                      "parallel.search_algorithm.flops_size=96", "fully_train.trainer.epochs=1"]
    config = load_config(ROOT / "configs" / "demo.yml", workdir=tmp / "run", overrides=overrides)
    t0 = time.perf_counter()
    reports = run(config, workers=args.workers, progress=False)
    t_run = time.perf_counter() - t0
    ctrl = reports["control"]
    serial_step = config.step("serial")
    full_step = config.step("full_train")
    source = steps.data_source(config.step("fine_tune"))
    seed = reports["phases"]["fine_tune"]["records"][0]

    # 2. the seed trained with the whole search's compute (every iteration after fine_tune)
    total_iters = sum(r.get("iters") or 0 for name, ph in reports["phases"].items() if name != "fine_tune"
                      for r in ph["records"])
    t0 = time.perf_counter()
    whole = phases.control("whole", steps.seed_architecture(seed), seed["weights"],
                           [steps.final_control_trainer(full_step, total_iters)], source, tmp / "whole",
                           device=config.device)
    t_whole = time.perf_counter() - t0

    # 3. random parents, same budget and inheritance (serial phase)
    serial = reports["phases"]["serial"]["records"]
    n_serial = sum(1 for r in serial if r["round"] >= 0)
    t0 = time.perf_counter()
    rand = random_parent_search(serial_step, seed, source, tmp / "random", n_serial, config.device)
    t_rand = time.perf_counter() - t0

    # 4. ranking fidelity: each serial candidate again, from the same inherited weights, longer
    t0 = time.perf_counter()
    long_step = dataclasses.replace(serial_step, trainer=dataclasses.replace(
        serial_step.trainer, epochs=serial_step.trainer.epochs * args.long_factor))
    short, long_ = [], []
    for r in serial:
        if r["round"] < 0 or r["status"] != "ok":
            continue
        cand = {k: r[k] for k in ("id", "desc", "parent_desc", "parent_weights")}
        res = phases.train_candidate(cand, long_step, source, tmp / "long", device=config.device)
        if res["status"] == "ok":
            short.append(r["metrics"]["mAP"])
            long_.append(res["metrics"]["mAP"])
    t_long = time.perf_counter() - t0

    s, c = ctrl["searched"], ctrl["control"]
    ok_serial = [r for r in serial if r["status"] == "ok" and r["round"] >= 0]
    ok_rand = [r for r in rand if r["status"] == "ok" and r["round"] >= 0]
    ref = 1.1 * max(r["params"] for r in ok_serial + ok_rand + [seed])
    hv = {name: hypervolume([(r["params"], r["metrics"]["mAP"]) for r in recs], ref)
          for name, recs in (("sp-nas", ok_serial), ("random", ok_rand))}
    n_train, n_val = (16, 8) if args.quick else (args.train, args.val)
    print(f"\n{'hard ' if args.hard else ''}demo data: {n_train} train / {n_val} val "
          f"images, seed {args.seed}; spnas run {t_run:.0f} s, whole-compute seed {t_whole:.0f} s, random search "
          f"{t_rand:.0f} s, long schedules {t_long:.0f} s")
    print(f"fine-tuned seed      {seed['desc']['backbone']['code']}  mAP {seed['metrics']['mAP']:6.2f}  "
          f"params {seed['params']:,}")
    print(f"SP-NAS result        {s['desc']['backbone']['code']} {s['desc']['neck']['code']}  mAP {s['mAP']:6.2f}  "
          f"params {s['params']:,}  GFLOPs {s['gflops']:.3f}  {s['iterations']} iterations since fine_tune")
    print(f"equal-budget control {c['desc']['backbone']['code']}  mAP {c['mAP']:6.2f}  params {c['params']:,}  "
          f"GFLOPs {c['gflops']:.3f}  {c['iterations']} iterations")
    more = s["params"] > c["params"]
    print(f"  delta mAP {ctrl['delta_mAP']:+.2f} at {'more' if more else 'no more'} params "
          f"(goal: +2.00 or more at no more params: {'met' if ctrl['delta_mAP'] >= 2 and not more else 'missed'}); "
          f"winner {ctrl['winner']} ({ctrl['reason']})")
    for name, ph in ctrl["phases"].items():
        if "delta_mAP" in ph:
            print(f"  {name:<8} best candidate {ph['searched']['mAP']:6.2f} vs its control {ph['control']['mAP']:6.2f} "
                  f"({ph['delta_mAP']:+.2f}, {ph['control']['iterations']} iterations each)")
    print(f"seed with the whole search's compute: mAP {whole['metrics']['mAP']:6.2f} after {whole['iters']} iterations "
          f"(the search's result: {s['mAP']:.2f}, delta {s['mAP'] - whole['metrics']['mAP']:+.2f})")
    best = {name: max((r["metrics"]["mAP"] for r in recs), default=float('nan'))
            for name, recs in (("sp-nas", ok_serial), ("random", ok_rand))}
    print(f"serial phase, {n_serial} candidates each: best mAP SP-NAS {best['sp-nas']:.2f} vs random parents "
          f"{best['random']:.2f}; hypervolume {hv['sp-nas']:.4f} vs {hv['random']:.4f}")
    tau = kendall_tau(short, long_)
    print(f"ranking fidelity: Kendall tau {tau:.3f} over {len(short)} serial candidates, short vs "
          f"{args.long_factor}x schedule (goal >= 0.7: {'met' if tau >= 0.7 else 'missed'})")
    print("  short:", [round(x, 2) for x in short])
    print("  long: ", [round(x, 2) for x in long_])
    summary = {"searched": s, "control": c, "delta_mAP": ctrl["delta_mAP"], "whole_compute_seed": whole,
               "random": {"best_mAP": best["random"], "hypervolume": hv["random"]},
               "sp_nas_serial": {"best_mAP": best["sp-nas"], "hypervolume": hv["sp-nas"]},
               "kendall_tau": tau, "short": short, "long": long_,
               "seconds": {"run": t_run, "whole": t_whole, "random": t_rand, "long": t_long}}
    (tmp / "search_control.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"details: {tmp / 'search_control.json'}")


if __name__ == "__main__":
    main()
