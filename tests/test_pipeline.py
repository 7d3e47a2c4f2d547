"""The Kubeflow pipeline: compiled file up to date, strict protobuf parse, DAG shape, a real
kfp.local run of the compiled YAML, and component bodies with real artifact objects."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo.yml"
COMPILED = ROOT / "pipelines" / "spnas_pipeline.yaml"
IMAGE = "ghcr.io/spnas-kfp/spnas:0.1.0"


def _compile(config, output, image=IMAGE, parallelism=4):
    subprocess.run([sys.executable, "-m", "pipelines.spnas_pipeline", "--config", str(config), "--output", str(output),
                    "--image", image, "--parallelism", str(parallelism)], cwd=ROOT, check=True, capture_output=True)
    return list(yaml.safe_load_all(Path(output).read_text()))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "spnas_pipeline.yaml"
    docs = _compile(DEMO, out)
    return out, docs


def test_checked_in_pipeline_is_up_to_date(compiled):
    out, _ = compiled
    assert COMPILED.read_text() == out.read_text(), "pipelines/spnas_pipeline.yaml is stale: run `make compile`"


def test_strict_protobuf_parse(compiled):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    _, docs = compiled
    assert len(docs) == 2
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # raises on any unknown field
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == "spnas"
    assert "kubernetes" in platform.platforms


def test_dag_shape(compiled):
    _, docs = compiled
    spec = docs[0]
    tasks = spec["root"]["dag"]["tasks"]
    cfg = yaml.safe_load(DEMO.read_text())
    rounds = {s: math.ceil(cfg[s]["search_algorithm"]["max_sample"] / cfg[s]["search_algorithm"]["candidates_per_round"])
              for s in ("serial", "parallel")}
    loops = {name: t for name, t in tasks.items() if "iterator" in json.dumps(t.get("parameterIterator", {})) or
             name.startswith("for-loop")}
    assert len(loops) == sum(rounds.values()) == 4
    for t in loops.values():
        assert t["iteratorPolicy"]["parallelismLimit"] == 4
    names = {t["taskInfo"]["name"] for t in tasks.values()}
    for needed in ("fine_tune", "serial round 0: propose", "serial: Pareto front", "reignition",
                   "parallel round 1: update", "parallel: Pareto front", "full train", "publish report"):
        assert needed in names, needed

    def upstream(name):
        return set(tasks[name].get("dependentTasks", []))
    by_display = {t["taskInfo"]["name"]: k for k, t in tasks.items()}
    # phases in order: each consumes the previous one's output
    assert by_display["fine_tune"] in upstream(by_display["serial: start"])
    assert by_display["serial: Pareto front"] in upstream(by_display["reignition"])
    assert by_display["reignition"] in upstream(by_display["parallel: start"])
    assert by_display["parallel: Pareto front"] in upstream(by_display["full train"])
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    for e in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in json.dumps(e["container"]["command"])  # install_kfp_package=False
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = [v for k, v in k8s.items() if "train-candidate" in k]
    assert train and all(v["secretAsEnv"][0]["secretName"] == "spnas-s3" for v in train)
    assert all(v["emptyDirMounts"][0]["mountPath"] == "/dev/shm" for v in train)


def test_image_override(tmp_path):
    docs = _compile(DEMO, tmp_path / "p.yaml", image="registry.example.com/spnas:dev", parallelism=2)
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example.com/spnas:dev"}


# ----------------------------------------------------------------------------- kfp.local

def _tiny_config(tmp_path, data_root):
    from test_run import tiny_overrides
    from spnas.config import apply_overrides
    raw = apply_overrides(yaml.safe_load(DEMO.read_text()), tiny_overrides(data_root))
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import demo
    return demo(tmp_path_factory.mktemp("data"), train=16, val=6, size=96)


@pytest.mark.slow
def test_compiled_yaml_runs_under_kfp_local(tiny_data, tmp_path):
    import kfp.local
    from kfp.components import load_component_from_file
    package = tmp_path / "tiny_pipeline.yaml"
    _compile(_tiny_config(tmp_path, tiny_data), package, parallelism=2)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipeline = load_component_from_file(str(package))
    results = tmp_path / "results"
    import builtins
    saved = builtins.print  # kfp.local patches print to indent; its concurrent loop tasks can leave it patched
    try:
        pipeline(data_uri=str(tiny_data), results_uri=str(results), seed=0)
    finally:
        builtins.print = saved
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    for f in ("fine_tune/model_0.pth", "fine_tune/desc_0.json", "serial/state.json", "serial/output.csv",
              "serial/pareto.png", "reignition/output.csv", "parallel/state.json", "parallel/pareto.png",
              "fully_train/output.csv"):
        assert (run / f).is_file(), f
    serial = json.loads((run / "serial" / "state.json").read_text())
    cands = [r for r in serial["records"] if r["parent"] is not None]
    assert len(cands) == 2 and all(r["status"] == "ok" for r in cands)
    for r in cands:
        assert r["weights"] == str(run / "serial" / f"model_{r['id']}.pth") and Path(r["weights"]).is_file()
    parallel = json.loads((run / "parallel" / "state.json").read_text())
    assert sum(r["parent"] is not None for r in parallel["records"]) == 2
    assert len(list((run / "fully_train").glob("model_*.pth"))) == 1


def test_component_bodies_with_real_artifacts(tiny_data, tmp_path):
    from kfp.dsl import Markdown, Metrics, Model
    from components import spnas_components as c
    config = json.dumps(yaml.safe_load(_tiny_config(tmp_path, tiny_data).read_text()))
    overrides = json.loads(c.prepare.python_func(config=config, seed=3, candidate_epochs=1, full_epochs=2))
    run_uri = c.run_prefix.python_func(results_uri=str(tmp_path / "res") + "/", job_id="job-1")
    assert run_uri == str(tmp_path / "res" / "job-1")
    assert overrides == ["general.seed=3", "serial.trainer.epochs=1", "parallel.trainer.epochs=1",
                         "fully_train.trainer.epochs=2"]
    # a candidate whose parent weights do not exist fails as data, with a placeholder artifact
    model = Model(name="model", uri=str(tmp_path / "art" / "model"), metadata={})
    metrics = Metrics(name="metrics", uri=str(tmp_path / "art" / "metrics"), metadata={})
    cand = {"id": 5.0, "desc": {"backbone": {"code": "1-2-2-2"}}, "parent_desc": {}, "parent": 0.0,
            "parent_weights": str(tmp_path / "missing.pth"), "ops": ["expand"], "round": 0.0,
            "run_uri": run_uri, "overrides": "[]"}
    result = c.train_candidate.python_func(config=config, step="serial", candidate=cand, data_uri=str(tiny_data),
                                           accelerator_type="nvidia.com/gpu",
                                           gpus_per_task=1, cpu_per_task="4", memory_per_task="16G",
                                           model=model, metrics=metrics)
    assert result["status"] == "failed" and result["id"] == 5 and "missing.pth" in result["error"]
    assert model.metadata["status"] == "failed" and Path(model.path).read_text().startswith("candidate failed")
    assert model.metadata["resources"] == {"accelerator": "nvidia.com/gpu", "gpus": 1, "cpu": "4", "memory": "16G"}
    report = Markdown(name="report", uri=str(tmp_path / "art" / "report.md"), metadata={})
    best = {"id": 4, "desc": {"backbone": {"code": "1-2-2-2"}, "neck": {"code": [0, 1, 0, 0]}},
            "metrics": {"mAP": 61.5, "AP50": 95.0}, "params": 4_800_000, "gflops": 0.29, "weights": "s3://b/run/model_4.pth"}
    assert c.publish.python_func(serial_front=[{**best, "id": 0, "parent": None, "status": "ok"}],
                                 parallel_front=[{**best, "parent": 1, "status": "ok"}], best=best,
                                 report=report) == "s3://b/run/model_4.pth"
    text = Path(report.path).read_text()
    assert "**Best model**: `1-2-2-2` neck `[0, 1, 0, 0]`: mAP 61.50" in text and "| 4 | 1 | `1-2-2-2` |" in text
