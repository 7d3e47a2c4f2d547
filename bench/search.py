"""SP-NAS serial search (SpNasS with weight inheritance) versus random search of the same space.

The goal: with the same number of candidates and the same training budget per candidate,
SpNasS finds better architectures than random search -- a higher best mAP and a larger
hypervolume of the (mAP up, params down) front, ratios SP-NAS / random > 1.

Both searches start after the same fine-tuned seed (the demo config's ``fine_tune`` phase on
configs/demo-model.json, code 1-2-2-2) and train every candidate with the demo config's
``serial`` trainer (1 epoch, same TrainConfig and seed):

* SP-NAS: ``spnas.orchestration.phases.search_init`` / ``rounds.search_propose`` /
  ``phases.train_candidate`` / ``rounds.search_update`` with the demo config's serial step and
  SpNasS settings (``max_sample`` = ``--candidates``): children of Pareto-front parents, each
  starting from its parent's weights (SPEC 3), exactly as ``spnas run`` does with one worker.
* random: codes drawn uniformly at random from the same space -- a block count in
  [max(min_blocks, seed blocks), max_blocks]; the seed's blocks in order with the extra ``1``
  blocks inserted at random positions after the first block (every SpNasS child has this form:
  expand inserts ``1`` blocks, swap and add-stage keep the sequence); a stage count in
  [min_stages, max_stages] and uniformly drawn stage boundaries -- each within the same bounds
  and budgets, new to the search, and trained from scratch (random search has no parent to
  inherit from).

Hypervolume: the area dominated by a set of (params, mAP) points up to the reference point
(params = 1.1 x the largest parameter count seen in both searches and the seed, mAP = 0), with
params divided by the reference and mAP by 100, so a value lies in [0, 1]. It is computed over
each search's candidates (the shared seed left out) and, on a second line, with the seed added.

    python bench/search.py [--candidates 6] [--seed 0] [--data DIR] [--quick]

``--quick`` (a check that the script runs, not a measurement): 24 train + 8 val demo images, 1
fine-tune epoch, 2 candidates per search.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from spnas.config import StepConfig, load_config
from spnas.data.demo import write_demo_dataset
from spnas.data.source import CocoSource
from spnas.models.desc import normalize_desc
from spnas.models.encoding import Bounds, check_bounds, parse_serial
from spnas.orchestration import phases, rounds
from spnas.search import SearchSettings, measure, pareto_front, records
from spnas.training.architecture import train_architecture
from spnas.training.schedule import TrainConfig
from spnas.utils.errors import CodeError
from spnas.utils.fileio import read_json

ROOT = Path(__file__).resolve().parent.parent


def sample_code(seed_code: str, rng: random.Random, bounds: Bounds) -> str:
    """A random code of the SpNasS space around ``seed_code`` (see the module docstring)."""
    seed = parse_serial(seed_code)
    n = rng.randint(max(bounds.min_blocks, seed.num_blocks), bounds.max_blocks)
    blocks = list(seed.blocks)
    while len(blocks) < n:
        blocks.insert(rng.randint(1, len(blocks)), "1")
    stages = rng.randint(bounds.min_stages, min(bounds.max_stages, n))
    cuts = sorted(rng.sample(range(1, n), stages - 1))
    return "-".join("".join(blocks[a:b]) for a, b in zip([0, *cuts], [*cuts, n], strict=False))


def child_desc(seed_desc: Mapping[str, Any], code: str) -> dict[str, Any]:
    """The seed's description with another serial code and an all-zero parallel code."""
    d = copy.deepcopy(dict(seed_desc))
    d["backbone"]["code"] = code
    d["neck"]["code"] = [0] * parse_serial(code).num_stages
    return normalize_desc(d)


def hypervolume(points: Sequence[tuple[float, float]], ref_params: float) -> float:
    """Normalised area dominated by ``(params, mAP)`` points (params down, mAP up) up to the
    reference point ``(ref_params, 0)``."""
    pts = sorted((p / ref_params, m / 100.0) for p, m in points if p < ref_params and m > 0)
    area, height = 0.0, 0.0
    for i, (x, y) in enumerate(pts):
        height = max(height, y)
        right = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        area += (right - x) * height
    return area


def run_spnas(seed: Mapping[str, Any], step: StepConfig, data: CocoSource, out: Path) -> list[dict[str, Any]]:
    """SpNasS rounds of ``step`` (its search settings, trainer and ``freeze_swap_keys``) as ``spnas run``
    does them with one worker; returns the candidate records."""
    state_path = phases.search_init(step, [{"desc": seed["desc"], "metrics": seed["metrics"],
                                            "weights": seed["weights"]}], out)
    while True:
        candidates = rounds.search_propose(state_path)
        if not candidates:
            break
        results = [phases.train_candidate(c, step, data, out) for c in candidates]
        for c, r in zip(candidates, results, strict=False):
            if r["status"] == "ok":
                m = r["metrics"]
                print(f"SP-NAS  candidate {c['id']:2d} {c['desc']['backbone']['code']:<22s} mAP {m['mAP']:6.2f}  "
                      f"AP50 {m['AP50']:6.2f}  {c['params']:>9,} params  "
                      f"(from {c['parent']}, {'+'.join(c['ops'])}; {r['seconds']:.1f} s)")
            else:
                print(f"SP-NAS  candidate {c['id']:2d} {c['desc']['backbone']['code']:<22s} FAILED: {r['error']}")
        if rounds.search_update(state_path, step.name, results)["done"]:
            break
    return [r for r in records(read_json(state_path)) if r["round"] >= 0]


def run_random(seed: Mapping[str, Any], settings: SearchSettings, count: int, cfg: TrainConfig, data: CocoSource,
               out: Path, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` random codes of the same space, each trained from scratch; returns records."""
    seen = {seed["desc"]["backbone"]["code"]}
    recs: list[dict[str, Any]] = []
    for cid in range(1, count + 1):
        for _ in range(settings.max_redraws):
            code = sample_code(seed["desc"]["backbone"]["code"], rng, settings.bounds)
            if code in seen:
                continue
            try:
                check_bounds(code, None, settings.bounds)
            except CodeError:
                continue
            desc = child_desc(seed["desc"], code)
            n_params, n_gflops = measure(desc, settings.flops_size)
            if settings.max_params is not None and n_params > settings.max_params:
                continue
            if settings.max_gflops is not None and n_gflops > settings.max_gflops:
                continue
            break
        else:
            raise RuntimeError(f"random search: no new valid code after {settings.max_redraws} draws")
        seen.add(code)
        t = time.perf_counter()
        perf = train_architecture(desc, data, out, cfg, arch_id=cid, init=None, progress=False)
        seconds = time.perf_counter() - t
        recs.append({"id": cid, "status": "ok", "desc": desc, "params": n_params, "gflops": n_gflops,
                     "metrics": {"mAP": perf["mAP"], "AP50": perf["AP50"]}})
        print(f"random  candidate {cid:2d} {code:<22s} mAP {perf['mAP']:6.2f}  AP50 {perf['AP50']:6.2f}  "
              f"{n_params:>9,} params  (scratch; {seconds:.1f} s)")
    return recs


def summary(name: str, recs: Sequence[Mapping[str, Any]], ref_params: float,
            seed: Mapping[str, Any]) -> dict[str, float]:
    """Print one search's best mAP, front and hypervolumes; return the numbers."""
    ok = [r for r in recs if r["status"] == "ok"]
    pts = [(float(r["params"]), float(r["metrics"]["mAP"])) for r in ok]
    front = [ok[i] for i in pareto_front([{"params": p, "mAP": m} for p, m in pts], ("mAP", "params"))]
    best = max(ok, key=lambda r: r["metrics"]["mAP"], default=None)
    hv = hypervolume(pts, ref_params)
    hv_seed = hypervolume(pts + [(float(seed["params"]), float(seed["metrics"]["mAP"]))], ref_params)
    best_map = float(best["metrics"]["mAP"]) if best else 0.0
    where = f"({best['desc']['backbone']['code']}, {best['params']:,} params)" if best else "(no candidate ok)"
    print(f"{name:28s} best mAP {best_map:6.2f} {where}; {len(ok)}/{len(recs)} ok")
    print(f"{'':28s} front: " + ", ".join(f"{r['desc']['backbone']['code']} ({r['metrics']['mAP']:.2f}, "
                                           f"{r['params']:,})" for r in sorted(front, key=lambda r: r["params"])))
    print(f"{'':28s} hypervolume {hv:.4f} (candidates), {hv_seed:.4f} (with the seed)")
    return {"best": best_map, "hv": hv, "hv_seed": hv_seed}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "inf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="COCO-layout data root (default: fresh demo data)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yml",
                    help="run config whose fine_tune and serial sections are used")
    ap.add_argument("--candidates", type=int, default=6, help="candidates per search (SpNasS max_sample)")
    ap.add_argument("--seed", type=int, default=None, help="search seed of both sides (default: the config's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per candidate (default: the serial trainer's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny demo set, 1 fine-tune epoch, 2 candidates per search: checks that the script runs")
    args = ap.parse_args()
    if args.quick:
        args.candidates = 2
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
        ft_step, serial = config.step("fine_tune"), config.step("serial")
        if args.quick:
            ft_step = dataclasses.replace(ft_step, trainer=dataclasses.replace(ft_step.trainer, epochs=1, iters=None))
        data = ft_step.dataset.source
        cfg = serial.trainer
        if args.epochs is not None:
            cfg = dataclasses.replace(cfg, epochs=args.epochs, iters=None)
        settings_dict = {**serial.search, "max_sample": args.candidates}
        if args.seed is not None:
            settings_dict["seed"] = args.seed
        settings = SearchSettings(**settings_dict)
        serial = dataclasses.replace(serial, trainer=cfg, search=settings_dict)

        # The shared seed: the fine_tune phase, as `spnas run` does it.
        t = time.perf_counter()
        ft = phases.fine_tune(ft_step, data, tmp_dir / "fine_tune")
        seed = {**ft["record"], "params": measure(ft["record"]["desc"], settings.flops_size)[0]}
        print(f"seed    {seed['desc']['backbone']['code']:<22s} mAP {seed['metrics']['mAP']:6.2f}  "
              f"AP50 {seed['metrics']['AP50']:6.2f}  {seed['params']:>9,} params  "
              f"({ft_step.trainer.epochs} epochs fine-tuned; {time.perf_counter() - t:.1f} s)")

        t = time.perf_counter()
        sp = run_spnas(seed, serial, data, tmp_dir / "serial")
        t_sp = time.perf_counter() - t
        t = time.perf_counter()
        rnd = run_random(seed, settings, args.candidates, cfg, data, tmp_dir / "random",
                         random.Random(settings.seed))
        t_rnd = time.perf_counter() - t

    b = settings.bounds
    ref_params = 1.1 * max([float(seed["params"])] + [float(r["params"]) for r in sp + rnd])
    print(f"threads {torch.get_num_threads()}, {args.candidates} candidates per search, {cfg.epochs} epoch(s) each "
          f"(batch {cfg.batch_size}, lr {cfg.lr}); space: blocks {b.min_blocks}-{b.max_blocks}, "
          f"stages {b.min_stages}-{b.max_stages}, seed {settings.seed}")
    print(f"hypervolume reference point: mAP 0, params {ref_params:,.0f} (1.1 x the largest seen); "
          f"params / reference x mAP / 100")
    s_sp = summary("SP-NAS (SpNasS, inherited)", sp, ref_params, seed)
    s_rnd = summary("random search (scratch)", rnd, ref_params, seed)
    print(f"search time: SP-NAS {t_sp:.1f} s, random {t_rnd:.1f} s")
    print(f"ratio SP-NAS / random  best mAP {ratio(s_sp['best'], s_rnd['best'])}, "
          f"hypervolume {ratio(s_sp['hv'], s_rnd['hv'])} (with the seed {ratio(s_sp['hv_seed'], s_rnd['hv_seed'])}; "
          f"goal > 1)")


if __name__ == "__main__":
    main()
