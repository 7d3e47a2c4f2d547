"""The tiny SP-NAS config run through kfp.local (the compiled pipeline YAML, SubprocessRunner,
use_venv=False) versus ``spnas run`` of the same config, side by side in one process.

Prints both wall times, the ratio kfp.local / spnas run (goal <= 2.0) and the overhead per
pipeline task. Both sides train the same candidates on the same generated data.

    python bench/pipeline_overhead.py [--quick]

``--quick`` (a check that the script runs, not a measurement): 8 train + 4 val images and one
candidate per search.
"""
import argparse
import builtins
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and candidates: checks that the script runs")
    args = ap.parse_args()
    import kfp.local
    from helpers import demo, tiny_overrides
    from kfp.components import load_component_from_file

    from spnas.config import apply_overrides, load_config
    from spnas.orchestration.local import run

    sizes = {"train": 8, "val": 4} if args.quick else {"train": 16, "val": 6}
    quick = ["serial.search_algorithm.max_sample=1", "parallel.search_algorithm.max_sample=1"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = demo(tmp / "data", size=96, **sizes)
        raw = apply_overrides(yaml.safe_load((ROOT / "configs" / "demo.yml").read_text()), tiny_overrides(data) + quick)
        cfg_path = tmp / "tiny.yml"
        cfg_path.write_text(yaml.safe_dump(raw))
        package = tmp / "tiny.yaml"
        subprocess.run([sys.executable, "-m", "pipelines.spnas_pipeline", "--config", str(cfg_path), "--output",
                        str(package), "--parallelism", "2"], cwd=ROOT, check=True, capture_output=True)
        spec = next(yaml.safe_load_all(package.read_text()))
        n_tasks = len(spec["deploymentSpec"]["executors"])

        t = time.perf_counter()
        run(load_config(raw, workdir=tmp / "local"), workers=2, progress=False)
        t_run = time.perf_counter() - t

        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp / "root"))
        saved = builtins.print
        t = time.perf_counter()
        try:
            load_component_from_file(str(package))(data_uri=str(data), results_uri=str(tmp / "results"), seed=0)
        finally:
            builtins.print = saved
        t_kfp = time.perf_counter() - t
        runs = list((tmp / "results").iterdir())
        tasks = sum(1 for _ in (tmp / "root").rglob("executor_output.json")) or n_tasks
    n_serial, n_parallel = (raw[s]["search_algorithm"]["max_sample"] for s in ("serial", "parallel"))
    print(f"tiny config: {n_serial} serial + {n_parallel} parallel candidates, {len(runs)} run, "
          f"{tasks} pipeline tasks executed")
    print(f"spnas run (2 workers)            {t_run:8.1f} s")
    print(f"kfp.local, compiled pipeline     {t_kfp:8.1f} s")
    print(f"overhead per pipeline task       {(t_kfp - t_run) / max(tasks, 1):8.2f} s")
    print(f"ratio kfp.local / spnas run      {t_kfp / t_run:8.3f}  (goal <= 2.0)")


if __name__ == "__main__":
    main()
