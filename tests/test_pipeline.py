"""The Kubeflow pipeline: compiled file up to date, strict protobuf parse, DAG shape, a real
kfp.local run of the compiled YAML, and component bodies with real artifact objects."""
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import DEMO, ROOT, TINY_RUN, tiny_overrides

COMPILED = ROOT / "pipelines" / "spnas_pipeline.yaml"
IMAGE = "ghcr.io/spnas-kfp/spnas:0.1.0"


def _compile(config, output, image=IMAGE, parallelism=4, **options):
    """Compile in this process (the image is an argument of the component factory, not an
    environment variable read at import, so several compiles in one process each get theirs)."""
    from pipelines.spnas_pipeline import compile_pipeline
    compile_pipeline(config, output, image=image, parallelism=parallelism, **options)
    return list(yaml.safe_load_all(Path(output).read_text()))


def _golden(docs):
    """A compiled pipeline as kfp's own read/write tests compare it: parsed, with ``sdkVersion``
    and kfp version pins dropped (they change with the SDK, not with the pipeline)."""
    docs = json.loads(json.dumps(docs))
    docs[0].pop("sdkVersion", None)
    text = json.dumps(docs)
    assert "kfp==" not in text, "a component pins kfp (install_kfp_package must stay False)"
    return docs


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "spnas_pipeline.yaml"
    docs = _compile(DEMO, out)
    return out, docs


def test_checked_in_pipeline_is_up_to_date(compiled):
    _, docs = compiled
    checked_in = list(yaml.safe_load_all(COMPILED.read_text()))
    assert _golden(checked_in) == _golden(docs), "pipelines/spnas_pipeline.yaml is stale: run `make compile`"


def test_strict_protobuf_parse(compiled):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    _, docs = compiled
    assert len(docs) == 2
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # raises on any unknown field
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == "spnas"
    assert "kubernetes" in platform.platforms


def _dags(spec):
    """Every DAG of a compiled pipeline by component name (the root as ``root``)."""
    return {"root": spec["root"]["dag"]} | {n: c["dag"] for n, c in spec["components"].items() if "dag" in c}


def test_dag_shape(compiled):
    """The root DAG shows the card's phases as tasks named after them, in order (each consumes
    the previous one's output); each search is a nested pipeline holding its unrolled rounds."""
    _, docs = compiled
    spec = docs[0]
    tasks = spec["root"]["dag"]["tasks"]
    assert {k: t["taskInfo"]["name"] for k, t in tasks.items()} == {
        "prepare": "validate config", "run-prefix": "run prefix",
        "preflight": "preflight: image, config shape, data set, results prefix",
        "stage-data": "stage data set (once per run)", "fine-tune": "fine_tune", "serial-search": "serial search",
        "reignition": "reignition", "parallel-search": "parallel search", "full-train": "full train",
        "publish": "publish report", "export-model": "export + parity gate", "register-model": "register model"}
    order = ["stage-data", "fine-tune", "serial-search", "reignition", "parallel-search", "full-train", "publish",
             "export-model", "register-model"]
    for before, after in itertools.pairwise(order):
        assert before in tasks[after]["dependentTasks"], (before, after)
    assert "fine-tune" in tasks["full-train"]["dependentTasks"]  # the final control starts from its weights
    assert {"serial-search", "parallel-search"} <= set(tasks["publish"]["dependentTasks"])
    dags = _dags(spec)
    for phase in ("serial-search", "reignition", "parallel-search", "full-train"):
        assert "dag" in spec["components"][tasks[phase]["componentRef"]["name"]], phase  # a nested pipeline

    cfg = yaml.safe_load(DEMO.read_text())
    rounds = {s: math.ceil(cfg[s]["search_algorithm"]["max_sample"] / cfg[s]["search_algorithm"]["candidates_per_round"])
              for s in ("serial", "parallel")}
    for step in ("serial", "parallel"):
        inner = dags[tasks[f"{step}-search"]["componentRef"]["name"]]["tasks"]
        loops = sorted(t["taskInfo"]["name"] for t in inner.values() if "iteratorPolicy" in t)
        assert loops == [f"{step}-round-{r}" for r in range(rounds[step])] and len(loops) == 2
        assert all(t["iteratorPolicy"]["parallelismLimit"] == 4 for t in inner.values() if "iteratorPolicy" in t)
        by_display = {t["taskInfo"]["name"]: k for k, t in inner.items()}
        for needed in (f"{step}: start", f"{step} round 0: propose", f"{step} round 1: update", f"{step}: Pareto front",
                       f"{step}: equal-budget control"):
            assert needed in by_display, needed
        # the control after the search's last update; rounds one after another
        assert by_display[f"{step} round 1: update"] in inner[by_display[f"{step}: equal-budget control"]]["dependentTasks"]
        assert by_display[f"{step} round 0: update"] in inner[by_display[f"{step} round 1: propose"]]["dependentTasks"]
    re_tasks = {t["taskInfo"]["name"] for t in dags[tasks["reignition"]["componentRef"]["name"]]["tasks"].values()}
    assert re_tasks == {"reignition: choose models", "reignition", "reignition: collect"}
    full = dags[tasks["full-train"]["componentRef"]["name"]]["tasks"]
    by_display = {t["taskInfo"]["name"]: k for k, t in full.items()}
    assert set(by_display) == {"fully_train: choose models", "full-train", "full train: best model",
                               "full train: equal-budget control"}
    assert by_display["full train: best model"] in full[by_display["full train: equal-budget control"]]["dependentTasks"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {IMAGE}
    for e in spec["deploymentSpec"]["executors"].values():
        assert "pip install" not in json.dumps(e["container"]["command"])  # install_kfp_package=False
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    heavy = [v for k, v in k8s.items() if any(n in k for n in ("train-candidate", "full-train", "reignite", "fine-tune",
                                                                 "control"))]
    # one executor per round's candidates, plus reignite, full train, fine_tune and the three controls
    assert len(heavy) == 4 + 1 + 1 + 1 + 3
    assert all(v["secretAsEnv"][0]["secretName"] == "spnas-s3" for v in heavy)
    assert all(v["emptyDirMounts"][0]["mountPath"] == "/dev/shm" for v in heavy)


def _container_tasks(spec):
    """(dag name, task name, task) of every task that runs a container, in every DAG."""
    dags = _dags(spec)
    execs = {n: c.get("executorLabel") for n, c in spec["components"].items()}
    return [(d, n, t) for d, dag in dags.items() for n, t in dag["tasks"].items()
            if execs.get(t["componentRef"]["name"])]


HEAVY = ("fine-tune", "train-candidate", "reignite", "full-train", "control")
LONG = ("fine-tune", "full-train", "final-control")


def test_every_task_has_requests_limits_retries_and_a_time_limit(compiled):
    """What a shared cluster needs of every pod: requests and limits (an OOM stays in its pod),
    a retry policy (training: a window of at least 24 h), a time limit; training pods take the
    run's node selector and tolerations and a bounded /dev/shm; the long trainings take the full
    train's resources."""
    from pipelines.spnas_pipeline import HEAVY_RETRY_WINDOW, TIMEOUTS
    _, docs = compiled
    spec, k8s = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    execs = spec["deploymentSpec"]["executors"]
    assert len(execs) == 37
    for name, e in execs.items():
        res = e["container"]["resources"]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(res), name
        heavy = any(h in name for h in HEAVY)
        plat = k8s[name]
        assert int(plat["activeDeadlineSeconds"]) == TIMEOUTS["long" if any(h in name for h in LONG) else
                                                              "candidate" if heavy or "stage-data" in name or
                                                              "export-model" in name else "light"], name
        if "stage-data" in name:  # downloads the data set once: no GPU, more memory, a long time limit
            assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("2", "4Gi")
            assert "nodeSelector" not in plat and "emptyDirMounts" not in plat
        elif "export-model" in name:  # traces and gates on CPU: compiled requests = limits, no GPU
            assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("4", "4"), res
            assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == "16Gi"
            assert "accelerator" not in res and "nodeSelector" not in plat
            assert plat["emptyDirMounts"][0]["sizeLimit"] == "2Gi"
        elif heavy:
            params = "full_train" if any(h in name for h in LONG) else "per_task"
            want = "{{$.inputs.parameters['pipelinechannel--%s']}}"
            assert res["resourceMemoryLimit"] == res["resourceMemoryRequest"] == want % (
                "full_train_memory" if params == "full_train" else "memory_per_task"), name
            assert res["resourceCpuLimit"] == want % ("full_train_cpu" if params == "full_train" else "cpu_per_task")
            # the pipeline parameter itself at the root, its channel inside a ParallelFor
            assert plat["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"] in {
                "node_selector", "pipelinechannel--node_selector"}, name
            [tol] = plat["tolerations"]
            assert tol["tolerationJson"]["componentInputParameter"] in {"tolerations", "pipelinechannel--tolerations"}
            assert plat["emptyDirMounts"][0]["sizeLimit"] == "2Gi"
        else:
            assert (res["resourceCpuLimit"], res["resourceMemoryLimit"]) == ("1", "2Gi"), name
            assert "nodeSelector" not in plat and "emptyDirMounts" not in plat
    tasks = _container_tasks(spec)
    assert len(tasks) == 37
    for dag, name, t in tasks:
        policy = t.get("retryPolicy")
        assert policy and policy["maxRetryCount"] == (1 if name == "preflight" else 2), (dag, name)
        window = int(policy["backoffMaxDuration"].rstrip("s"))
        ex = spec["components"][t["componentRef"]["name"]]["executorLabel"]
        if any(h in ex for h in (*HEAVY, "stage-data", "export-model")):
            assert window == int(HEAVY_RETRY_WINDOW.rstrip("s")) >= 24 * 3600, (dag, name)
        else:
            assert window == 3600, (dag, name)


def test_preflight_runs_before_any_training_and_carries_the_compiled_contract(compiled):
    from spnas.orchestration.pods import compiled_contract
    _, docs = compiled
    tasks = docs[0]["root"]["dag"]["tasks"]
    assert tasks["fine-tune"]["dependentTasks"] == ["prepare", "run-prefix", "stage-data"]
    assert "preflight" in tasks["stage-data"]["dependentTasks"]
    assert set(tasks["preflight"]["dependentTasks"]) == {"prepare", "run-prefix"}
    expected = tasks["preflight"]["inputs"]["parameters"]["expected"]["runtimeValue"]["constant"]
    assert json.loads(expected) == json.loads(compiled_contract(DEMO.read_text()))
    assert json.loads(expected)["shape"]["serial.search_algorithm.max_sample"] == 4


def test_search_state_travels_by_reference_and_task_inputs_stay_small(tmp_path):
    """With a 400-candidate search state (hundreds of KiB, over the 128 KiB a cluster passes in
    one argv argument), every value one task hands to the next stays under 16 KiB: propose,
    update and search_init return the URI of a JSON file under ``<run>/<step>/search/``, the
    round's loop items carry only the round's candidates."""
    import copy

    from spnas.orchestration import pods
    from spnas.search.settings import SearchSettings
    from spnas.search.state import new_state
    desc = {"num_classes": 3, "backbone": {"code": "11-21-21-21", "block": "basic", "base_channels": 16},
            "neck": {"out_channels": 32}}
    st = new_state(SearchSettings("SpNasS", max_sample=404, min_blocks=4, max_blocks=16, max_stages=5, flops_size=128),
                   [{"desc": desc, "metrics": {"mAP": 35.0}, "weights": "s3://b/model_0.pth"}])
    seed = st["records"][0]
    for i in range(1, 401):  # 400 evaluated candidates, children of the seed
        st["records"].append({**copy.deepcopy(seed), "id": i, "round": (i - 1) // 4, "parent": 0,
                              "parent_desc": copy.deepcopy(seed["desc"]), "parent_weights": seed["weights"],
                              "ops": ["expand"], "metrics": {"mAP": 20.0 + (i % 13)}, "weights": f"s3://b/model_{i}.pth",
                              "iters": 60, "images": 240, "seconds": 30.0, "lineage_iters": 60})
    st.update(next_id=401, round=100, proposed=400)
    run = tmp_path / "run"
    ref = pods._put_state(st, str(run), "serial", "state-100")
    assert Path(ref).stat().st_size > 128 * 1024  # what would no longer fit in one argument
    proposal = pods.propose(ref, 4, str(run), "serial")
    items = pods.candidates(proposal, str(run), '["general.seed=0"]')
    assert len(items) == 4 and [i["id"] for i in items] == [401, 402, 403, 404]
    results = [{"id": i["id"], "status": "ok", "metrics": {"mAP": 40.0}, "weights": f"s3://b/model_{i['id']}.pth",
                "iters": 60, "images": 240, "seconds": 1.0, "lineage_iters": 120, "inherited": 1, "fresh": 0,
                "trainable": 10} for i in items]
    new = pods.update(proposal, results, "serial", str(run))
    assert new == str(run / "serial" / "search" / "state-101.json")
    assert proposal == str(run / "serial" / "search" / "proposal-100.json")
    handed_on = {"proposal": proposal, "state": new, "items": json.dumps(items), "results": json.dumps(results)}
    sizes = {k: len(v.encode()) for k, v in handed_on.items()}
    assert max(sizes.values()) < 16 * 1024, sizes
    assert len(pods._state(new)["records"]) == 405 and pods._state(new)["records"][-1]["status"] == "ok"


def test_a_pipeline_too_large_for_one_workflow_object_is_refused_at_compile_time(tmp_path):
    """Every round is unrolled into tasks; a compiled file over the limit (700 KiB by default:
    docs/kubeflow.md's table shows 128 candidates, 8 per round, over it) is refused, naming the
    rounds and the key to raise, and nothing is written. Shown on the demo config with a lower
    limit, so the test compiles one small pipeline."""
    from pipelines.spnas_pipeline import MAX_SPEC_BYTES
    out = tmp_path / "big.yaml"
    with pytest.raises(SystemExit, match=r"would be [\d,]+ bytes, over the safe 150,000 .*serial: max_sample 4 / "
                                         r"candidates_per_round 2 = 2 rounds; parallel: .*Raise candidates_per_round"):
        _compile(DEMO, out, max_spec_bytes=150_000)
    assert not out.exists() and MAX_SPEC_BYTES == 716_800


def _plateau_config(tmp_path):
    """The demo config with the plateau-triggered reignition on (reignition_patience 1)."""
    raw = yaml.safe_load(DEMO.read_text())
    raw["serial"]["search_algorithm"]["reignition_patience"] = 1
    path = tmp_path / "plateau.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_compile_options_image_digest_pull_secret_time_limits_shm_parallelism_pvc(compiled, tmp_path):
    """Every compile option lands in the compiled spec, per compile (the image is an argument of
    the component factory, not an environment variable read at import: this compile and the
    module's differ): a digest-pinned image, a pull secret, time limits, /dev/shm, parallelism
    and an existing claim instead of the workspace (with the plateau reignition, whose task
    outputs a Model)."""
    from pipelines.spnas_pipeline import check_image, data_volume_path
    with pytest.raises(SystemExit, match="not pinned by digest"):
        check_image("ghcr.io/spnas-kfp/spnas:0.1.0", require_digest=True)
    pinned = "ghcr.io/spnas-kfp/spnas@sha256:" + "0" * 64
    assert check_image(pinned, require_digest=True) == pinned
    docs = _compile(_plateau_config(tmp_path), tmp_path / "p.yaml", image=pinned, timeouts={"candidate": 7200},
                    shm_size="8Gi", image_pull_secret="regcred", require_digest=True, parallelism=3,
                    data_volume="pvc:coco-data")
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()} == {pinned}
    assert {e["container"]["image"] for e in compiled[1][0]["deploymentSpec"]["executors"].values()} == {IMAGE}
    assert {t["iteratorPolicy"]["parallelismLimit"] for dag in _dags(docs[0]).values() for t in dag["tasks"].values()
            if "iteratorPolicy" in t} == {3}
    assert all(v["imagePullSecret"] == [{"secretName": "regcred", "secretNameParameter":
                                         {"runtimeValue": {"constant": "regcred"}}}] for v in k8s.values())
    deadlines = [v["activeDeadlineSeconds"] for k, v in k8s.items() if "train-candidate" in k]
    assert deadlines == ["7200"] * 4  # one executor per round
    assert k8s["exec-fine-tune"]["activeDeadlineSeconds"] == str(7 * 24 * 3600)
    assert k8s["exec-full-train"]["emptyDirMounts"][0]["sizeLimit"] == "8Gi"
    # a candidate's training child stops 10 % (at most 10 min) before its pod would be killed
    limits = {t["inputs"]["parameters"]["time_limit"]["runtimeValue"]["constant"]
              for c in docs[0]["components"].values() if "dag" in c for t in c["dag"]["tasks"].values()
              if t["taskInfo"]["name"].endswith("train candidate")}
    assert limits == {6600}
    # an existing claim instead of the run workspace, mounted in every task that reads the data
    assert "pipelineConfig" not in docs[1]["platforms"]["kubernetes"]
    mounted = {k for k, v in k8s.items() if v.get("pvcMount")}
    assert mounted == {k for k in k8s if any(n in k for n in (*HEAVY, "stage-data", "search-init", "export-model"))}
    assert all(k8s[k]["pvcMount"] == [{"constant": "coco-data", "mountPath": "/spnas-data",
                                       "pvcNameParameter": {"runtimeValue": {"constant": "coco-data"}}}] for k in mounted)
    tasks = [t for _, _, t in _container_tasks(docs[0]) if "workspace" in t["inputs"].get("parameters", {})]
    assert len(tasks) == 15 and {t["inputs"]["parameters"]["workspace"]["runtimeValue"]["constant"] for t in tasks} == \
        {"/spnas-data"}
    plateau = docs[0]["components"]["comp-reignite-if-plateau"]
    assert plateau["outputDefinitions"]["artifacts"]["models"]["artifactType"]["schemaTitle"] == "system.Model"
    assert data_volume_path("none") == ""  # each pod caches its own copy
    with pytest.raises(SystemExit, match="--data-volume 'nfs': expected workspace, pvc:<claim name> or none"):
        data_volume_path("nfs")


def _artifact_source(task):
    """Where a task's ``dataset`` input comes from: the producing task at the root, the loop's
    channel inside a ParallelFor."""
    art = task["inputs"]["artifacts"]["dataset"]
    return art.get("taskOutputArtifact", {}).get("producerTask") or art.get("componentInputArtifact")


def test_data_set_is_staged_once_and_enters_every_training_as_a_dataset_artifact(compiled):
    """The run's workspace is configured (ReadWriteMany, so candidate pods on several nodes read
    one copy); one stage-data task makes the Dataset artifact; every task that reads the data
    takes it and the workspace's path (``pvc:NAME``: see the compile-options test)."""
    _, docs = compiled
    spec = docs[0]
    assert docs[1]["platforms"]["kubernetes"]["pipelineConfig"]["workspace"] == {
        "size": "100Gi", "kubernetes": {"pvcSpecPatch": {"accessModes": ["ReadWriteMany"]}}}
    stage = spec["components"]["comp-stage-data"]
    assert stage["outputDefinitions"]["artifacts"]["dataset"]["artifactType"]["schemaTitle"] == "system.Dataset"
    readers = [(dag, name, t) for dag, name, t in _container_tasks(spec)
               if "dataset" in spec["components"][t["componentRef"]["name"]].get("inputDefinitions", {}).get("artifacts", {})]
    kinds = {re.sub(r"(-\d+)+$", "", t["componentRef"]["name"]) for _, _, t in readers}
    assert kinds == {"comp-fine-tune", "comp-search-init", "comp-train-candidate", "comp-reignite", "comp-full-train",
                     "comp-phase-control", "comp-final-control", "comp-export-model"}
    assert len(readers) == 1 + 2 + 4 + 1 + 1 + 2 + 1 + 1
    for dag, name, t in readers:
        # at the root from stage-data; inside a phase from the phase's own Dataset input
        assert _artifact_source(t) in ({"stage-data"} if dag == "root" else {"dataset", "pipelinechannel--dataset"}), \
            (dag, name)
        assert t["inputs"]["parameters"]["workspace"]["runtimeValue"]["constant"] == "{{$.workspace_path}}"
        assert "data_uri" not in t["inputs"].get("parameters", {}), (dag, name)  # the artifact, not a string
    root = spec["root"]["dag"]["tasks"]
    assert root["stage-data"]["inputs"]["parameters"]["data_uri"] == {"componentInputParameter": "data_uri"}
    for phase in ("serial-search", "reignition", "parallel-search", "full-train"):
        assert _artifact_source(root[phase]) == "stage-data", phase



def test_light_components_import_no_torch():
    """``import spnas`` and the components module load without torch; so do the light pod
    functions a light task runs (a new process, as a KFP task is)."""
    code = ("import sys, spnas, components.spnas_components as c\n"
            "from spnas.orchestration import pods\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
            "c.build_components('x')\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ----------------------------------------------------------------------------- kfp.local

def _tiny_config(tmp_path, data_root, extra=()):
    from spnas.config import apply_overrides
    raw = apply_overrides(yaml.safe_load(DEMO.read_text()), tiny_overrides(data_root) + list(extra))
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _summary(recs):
    """What must agree between two runs of one config: ids, parents, codes, status, metrics."""
    return [(r["id"], r.get("parent"), r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"], r.get("status"),
             (r.get("metrics") or {}).get("mAP"), (r.get("metrics") or {}).get("AP50")) for r in recs]


def winner_of(run):
    return json.loads((run / "control.json").read_text())["winner"]


def _csv_records(path):
    import csv
    return [{"id": int(row["worker_id"]), "metrics": json.loads(row["performance"]), "desc": json.loads(row["desc"])}
            for row in csv.DictReader(path.open())]


@pytest.mark.slow
def test_compiled_yaml_runs_under_kfp_local_and_agrees_with_spnas_run(tiny_data, tiny_run, tmp_path, monkeypatch, capfd):
    """The compiled YAML of the shared tiny config runs end to end under kfp.local (top-2 full
    train fanned out), and its records are exactly those of ``spnas run`` of the same config
    (the session's tiny run): one step-to-phase mapping. On the way, the fine_tune task is
    SIGKILLed at its 6th of 8 iterations (a lost pod); kfp.local retries it (the compiled retry
    policy, 1 s backoff here), the retry restores the checkpoint the killed attempt copied under
    the run's prefix and resumes, and the records still equal the uninterrupted run's."""
    import kfp.local
    from kfp.components import load_component_from_file
    config = _tiny_config(tmp_path, tiny_data, TINY_RUN)
    package = tmp_path / "tiny_pipeline.yaml"
    _compile(config, package, parallelism=2, retry_backoff=1)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipeline = load_component_from_file(str(package))
    results = tmp_path / "results"
    once = tmp_path / "killed-once"
    monkeypatch.setenv("SPNAS_FAILPOINT", "train_iter:6")  # the first training process to reach it: fine_tune
    monkeypatch.setenv("SPNAS_FAILPOINT_ONCE", str(once))
    import builtins
    saved = builtins.print  # kfp.local patches print to indent; its concurrent loop tasks can leave it patched
    try:
        pipeline(data_uri=str(tiny_data), results_uri=str(results), seed=0)
    finally:
        builtins.print = saved
    assert once.is_file()
    logs = capfd.readouterr()
    killed = re.findall(r"SPNAS_FAILPOINT: killing pid \d+ at train_iter #6 \(iteration (\d+)/(\d+)\)", logs.out + logs.err)
    assert killed == [("6", "8")], killed
    assert "restored the checkpoints of an earlier attempt" in logs.out + logs.err
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    run = runs[0]
    for f in ("fine_tune/desc_0.json", "serial/state.json", "serial/output.csv", "serial/pareto.png",
              "reignition/output.csv", "parallel/state.json", "parallel/pareto.png", "fully_train/output.csv",
              "data/manifest.json", "control.json", "model_final.pth", "export/model.onnx",
              "export/model.torchscript.pt", "export/labels.json", "export/export.json", "export/MODEL_CARD.md"):
        assert (run / f).is_file(), f
    # the tail: the run's result exported behind the gate (registered only with a registry: none here)
    assert json.loads((run / "export" / "parity.json").read_text())["passed"] is True
    exported = json.loads((run / "export" / "export.json").read_text())
    assert exported["weights"] == str(run / "model_final.pth") and exported["control"]["winner"] == winner_of(run)
    assert "Not registered" in logs.out + logs.err or "not registering" in logs.out + logs.err
    # the model card's lineage, read back from what the run published: full train back to fine_tune
    chain = [e["phase"] for e in exported["lineage"]]
    assert chain[0] == "fully_train" and chain[-1] == "fine_tune" and {"serial", "parallel"} <= set(chain), chain
    assert "| fine_tune | 0 |" in (run / "export" / "MODEL_CARD.md").read_text()
    # weights are stored once: each in its task's Model artifact (the KFP store); the run's prefix
    # keeps records, plots, the report's files and the final model only
    assert [p.relative_to(run).as_posix() for p in run.rglob("*.pth")] == ["model_final.pth"]
    serial = json.loads((run / "serial" / "state.json").read_text())
    cands = [r for r in serial["records"] if r["parent"] is not None]
    assert len(cands) == 2 and all(r["status"] == "ok" for r in cands)
    pipeline_root = tmp_path / "root"
    for r in cands:
        assert Path(r["weights"]).is_relative_to(pipeline_root) and Path(r["weights"]).is_file()
    assert Path(serial["records"][0]["weights"]).name == "model"  # the seed: fine_tune's Model artifact
    parallel = json.loads((run / "parallel" / "state.json").read_text())
    assert sum(r["parent"] is not None for r in parallel["records"]) == 2
    from spnas.search import front
    full = _csv_records(run / "fully_train" / "output.csv")
    assert len(full) == min(2, len(front(parallel)))
    winner = json.loads((run / "control.json").read_text())["winner"]
    kept = [r.parent.name for r in pipeline_root.rglob("model")
            if r.is_file() and r.read_bytes() == (run / "model_final.pth").read_bytes()]
    # (in the tiny run the searched model is the seed itself: it and its control train identically)
    assert ("final-control" if winner == "control" else "full-train") in kept, (winner, kept)

    # the same config through spnas run: the same records, phase by phase
    local = tiny_run[1]
    assert _summary(local["phases"]["serial"]["records"]) == _summary(serial["records"])
    assert _summary(local["phases"]["parallel"]["records"]) == _summary(parallel["records"])
    ctrl, local_ctrl = json.loads((run / "control.json").read_text()), local["control"]
    for key in ("searched", "control"):
        assert (ctrl[key]["mAP"], ctrl[key]["iterations"], ctrl[key]["params"]) == \
            (local_ctrl[key]["mAP"], local_ctrl[key]["iterations"], local_ctrl[key]["params"])
    assert ctrl["winner"] == local_ctrl["winner"] and ctrl["phases"].keys() == local_ctrl["phases"].keys()
    for step, recs in (("reignition", _csv_records(run / "reignition" / "output.csv")), ("fully_train", full)):
        got = [(r["id"], r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"], r["metrics"]["mAP"]) for r in recs]
        want = [(r["id"], r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"], r["metrics"]["mAP"])
                for r in local["phases"][step]["records"]]
        assert got == want, step


def test_preflight_refuses_under_kfp_local_in_seconds_before_any_training(tiny_data, tmp_path, capfd):
    """The compiled pipeline under kfp.local: a missing data set, and a config parameter whose
    max_sample differs from the compiled one, each stop the run at preflight (the fourth task)
    within seconds; no training task starts."""
    import builtins
    import time

    import kfp.local
    from kfp.components import load_component_from_file
    package = tmp_path / "tiny_pipeline.yaml"
    config = _tiny_config(tmp_path, tiny_data)
    _compile(config, package, parallelism=2)
    pipeline = load_component_from_file(str(package))
    bigger = json.dumps(yaml.safe_load(_tiny_config(tmp_path, tiny_data, ["serial.search_algorithm.max_sample=4"])
                                       .read_text()))
    cases = {"missing": ({"data_uri": str(tmp_path / "no-such-data")}, "image folder .*no-such-data/train2017/ is missing"),
             "shape": ({"data_uri": str(tiny_data), "config": bigger},
                       "config key serial.search_algorithm.max_sample is 4 at run time but the pipeline was compiled "
                       "for 2")}
    for case, (args, message) in cases.items():
        root = tmp_path / f"root-{case}"
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
        saved, t0 = builtins.print, time.monotonic()
        try:
            with pytest.raises(RuntimeError, match="preflight"):
                pipeline(results_uri=str(tmp_path / f"results-{case}"), seed=0, **args)
        finally:
            builtins.print = saved
        elapsed = time.monotonic() - t0
        out = capfd.readouterr()
        assert re.search(message, out.out + out.err), case
        started = {p.name for p in next(root.iterdir()).iterdir()}  # the tasks that wrote outputs
        assert started <= {"preflight", "prepare", "run-prefix"}, (case, started)
        assert not (tmp_path / f"results-{case}").exists() or not any((tmp_path / f"results-{case}").rglob("*.pth"))
        assert elapsed < 30, (case, elapsed)  # 3 light tasks, the refusal tried twice


def test_component_bodies_with_real_artifacts(tiny_data, tmp_path):
    from kfp.dsl import Dataset, Markdown, Metrics, Model

    from components.spnas_components import build_components
    c = build_components()
    config = json.dumps(yaml.safe_load(_tiny_config(tmp_path, tiny_data).read_text()))
    overrides = json.loads(c.prepare.python_func(config=config, seed=3, candidate_epochs=1, full_epochs=2))
    run_uri = c.run_prefix.python_func(results_uri=str(tmp_path / "res") + "/", job_id="job-1")
    assert run_uri == str(tmp_path / "res" / "job-1")
    assert overrides == ["general.seed=3", "serial.trainer.epochs=1", "parallel.trainer.epochs=1",
                         "fully_train.trainer.epochs=2"]
    # the data set enters as a Dataset artifact: its root and version (a local folder is read in place)
    dataset = Dataset(name="dataset", uri=str(tmp_path / "art" / "dataset"), metadata={})
    c.stage_data.python_func(config=config, overrides="[]", data_uri=str(tiny_data), workspace="", run_uri=run_uri,
                             dataset=dataset)
    manifest = json.loads((Path(run_uri) / "data" / "manifest.json").read_text())
    assert manifest["objects"] == 2 + 2 * (16 + 6) == len(manifest["files"])  # 2 annotation files, 22 images + label maps
    assert dataset.metadata["root"] == str(tiny_data) and dataset.metadata["staged"] == ""
    assert dataset.metadata["version"] == manifest["version"] and len(manifest["version"]) == 16
    assert json.loads(Path(dataset.path).read_text()) == dataset.metadata
    # a candidate whose parent weights do not exist fails as data: marked in the metadata, an empty artifact
    model = Model(name="model", uri=str(tmp_path / "art" / "model"), metadata={})
    metrics = Metrics(name="metrics", uri=str(tmp_path / "art" / "metrics"), metadata={})
    cand = {"id": 5.0, "desc": {"backbone": {"code": "1-2-2-2"}}, "parent_desc": {}, "parent": 0.0,
            "parent_weights": str(tmp_path / "missing.pth"), "ops": ["expand"], "round": 0.0,
            "run_uri": run_uri, "overrides": "[]"}
    result = c.train_candidate.python_func(config=config, step="serial", candidate=cand, dataset=dataset, workspace="",
                                           time_limit=0, accelerator_type="nvidia.com/gpu",
                                           gpus_per_task=1, cpu_per_task="4", memory_per_task="16G",
                                           model=model, metrics=metrics)
    assert result["status"] == "failed" and result["id"] == 5 and "missing.pth" in result["error"]
    assert model.metadata["status"] == "failed" and Path(model.path).is_dir() and not any(Path(model.path).iterdir())
    assert model.metadata["resources"] == {"accelerator": "nvidia.com/gpu", "gpus": 1, "cpu": "4", "memory": "16G"}
    assert model.metadata["data_version"] == manifest["version"]
    report = Markdown(name="report", uri=str(tmp_path / "art" / "report.md"), metadata={})
    best = {"id": 4, "desc": {"backbone": {"code": "1-2-2-2"}, "neck": {"code": [0, 1, 0, 0]}},
            "metrics": {"mAP": 61.5, "AP50": 95.0}, "params": 4_800_000, "gflops": 0.29, "weights": str(tmp_path / "w4.pth")}
    Path(best["weights"]).write_bytes(b"searched")
    assert c.publish.python_func(config=config, serial_front=[{**best, "id": 0, "parent": None, "status": "ok"}],
                                 parallel_front=[{**best, "parent": 1, "status": "ok"}], best=best, controls={},
                                 serial_control={}, parallel_control={}, run_uri=run_uri, overrides="[]",
                                 report=report) == f"{run_uri}/model_final.pth"
    assert Path(run_uri, "model_final.pth").read_bytes() == b"searched"  # the result, copied under the run
    text = Path(report.path).read_text()
    assert "**Result**: `1-2-2-2` neck `[0, 1, 0, 0]`: mAP 61.50" in text and "| 4 | 1 | `1-2-2-2` |" in text
    assert "equal-budget control" not in text  # no controls given, none reported

    # with controls: control.json under the run prefix, the control's weights when it wins
    control = {"id": "control", "desc": {"backbone": {"code": "1-2-2-2"}, "neck": {"code": [0, 0, 0, 0]}},
               "metrics": {"mAP": 62.0, "AP50": 95.5}, "params": 4_700_000, "gflops": 0.25, "latency": 9.0,
               "memory": 60.0, "iters": 360, "lineage_iters": 360, "weights": str(tmp_path / "wc.pth")}
    Path(control["weights"]).write_bytes(b"control")
    searched = {**best, "latency": 11.0, "memory": 70.0, "lineage_iters": 360}
    report2 = Markdown(name="report", uri=str(tmp_path / "art" / "report2.md"), metadata={})
    weights = c.publish.python_func(config=config, serial_front=[], parallel_front=[], best=best,
                                    controls={"searched": searched, "control": control}, serial_control={},
                                    parallel_control={}, run_uri=run_uri, overrides="[]", report=report2)
    summary = json.loads((Path(run_uri) / "control.json").read_text())
    assert weights == f"{run_uri}/model_final.pth" and summary["winner"] == "control"
    assert Path(weights).read_bytes() == b"control"  # the control won: its weights are the run's result
    assert summary["delta_mAP"] == 61.5 - 62.0 and summary["searched"]["iterations"] == summary["control"]["iterations"] == 360
    text = Path(report2.path).read_text()
    assert "**Result**: `1-2-2-2` neck `[0, 0, 0, 0]`: mAP 62.00" in text and "delta mAP -0.50" in text


def test_a_crashed_killed_or_overlong_candidate_training_is_a_failed_record(tiny_data, tmp_path, monkeypatch):
    """A candidate trains in a child process of its pod: the child SIGKILLed (the OOM killer's
    signal, injected by the ``candidate_child`` fail point for one candidate only), a child over
    its time limit, and a child that exits non-zero each end as a failed record naming the
    cause; the pod's own process never fails."""
    from spnas.orchestration import pods
    from spnas.orchestration.child import ChildFailed, run_isolated
    config = json.dumps(yaml.safe_load(_tiny_config(tmp_path, tiny_data).read_text()))
    run_uri = str(tmp_path / "run")

    def cand(cid):
        return {"id": cid, "desc": {"backbone": {"code": "1-2-2-2"}}, "parent_desc": {}, "parent": 0, "ops": ["expand"],
                "parent_weights": str(tmp_path / "missing.pth"), "round": 0, "run_uri": run_uri, "overrides": "[]"}

    monkeypatch.setenv("SPNAS_FAILPOINT", "candidate_child:1:serial/5")
    killed = pods.train_candidate(config, "serial", cand(5), str(tiny_data), str(tmp_path / "m5"))
    assert killed == {"id": 5, "status": "failed", "error": "ChildFailed: candidate 5: the training process was killed "
                      "by SIGKILL (most often the out-of-memory killer at the pod's memory limit; a node failure or "
                      "`kill -9` look the same)"}
    other = pods.train_candidate(config, "serial", cand(6), str(tiny_data), str(tmp_path / "m6"))
    assert other["status"] == "failed" and "missing.pth" in other["error"]  # only candidate 5 is targeted
    monkeypatch.delenv("SPNAS_FAILPOINT")
    slow = pods.train_candidate(config, "serial", cand(7), str(tiny_data), str(tmp_path / "m7"), time_limit=0.2)
    assert slow == {"id": 7, "status": "failed",
                    "error": "ChildFailed: candidate 7: the training ran over its time limit of 0.2 s and was stopped"}
    with pytest.raises(ChildFailed, match=r"^broken: the training process exited with status 1 without a result"):
        run_isolated("train_candidate_here", {"no_such_argument": 1}, what="broken")
    with pytest.raises(ValueError, match="cannot run in a child process"):
        run_isolated("fine_tune", {}, what="x")


@pytest.mark.slow
def test_kfp_local_stages_the_data_once_and_survives_a_killed_candidate(tiny_data, tmp_path, monkeypatch):
    """The compiled pipeline under kfp.local with its data set in a real object store (weed
    mini) and a run workspace: the stage task downloads each object once and no other task of
    the run downloads any (counted across every task process by ``SPNAS_FETCH_LOG``); a serial
    candidate whose training child is SIGKILLed (fail point) is a failed record naming the
    signal, and the run completes."""
    import builtins

    import kfp.local
    from kfp.components import load_component_from_file

    from spnas import storage
    from spnas.devtools import objectstore
    store_dir = tmp_path / "store"
    for attempt in range(3):  # another process may take a port between the check and the start
        try:
            objectstore.start(store_dir, port=objectstore.free_port_block(), buckets=["spnas"], ready_timeout=30)
            break
        except storage.StorageError:
            objectstore.stop(store_dir, grace=2)
            for f in (objectstore.STATE_FILE, objectstore.PID_FILE):
                (store_dir / f).unlink(missing_ok=True)
            if attempt == 2:
                raise
    try:
        for k, v in objectstore.env(store_dir).items():
            monkeypatch.setenv(k, v)
        data_uri = "minio://spnas/datasets/tiny"
        objects = len(storage.upload(tiny_data, data_uri))
        fetch_log, pod_cache = tmp_path / "fetch.log", tmp_path / "pod-cache"
        monkeypatch.setenv(storage.ENV_FETCH_LOG, str(fetch_log))
        monkeypatch.setenv(storage.ENV_CACHE, str(pod_cache))  # where a pod would cache without the workspace
        monkeypatch.setenv("SPNAS_FAILPOINT", "candidate_child:1:serial/1")
        package = tmp_path / "tiny_pipeline.yaml"
        _compile(_tiny_config(tmp_path, data_uri, ["general.control=false"]), package, parallelism=2)
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                       workspace_root=str(tmp_path / "workspace"))
        saved = builtins.print
        try:
            load_component_from_file(str(package))(data_uri=data_uri, results_uri=str(tmp_path / "results"), seed=0)
        finally:
            builtins.print = saved
    finally:
        objectstore.stop(store_dir, grace=5)
    (run,) = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    serial = json.loads((run / "serial" / "state.json").read_text())
    cands = {r["id"]: r for r in serial["records"] if r["parent"] is not None}
    assert sorted(cands) == [1, 2] and cands[2]["status"] == "ok"
    assert cands[1]["status"] == "failed" and "killed by SIGKILL" in cands[1]["error"]
    (pipeline_run,) = (tmp_path / "root").iterdir()
    assert (run / "fully_train" / "output.csv").is_file() and (pipeline_run / "publish" / "report").is_file()  # done
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["objects"] == objects == 2 + 2 * (16 + 6)  # annotation files, images, label maps
    fetches = [json.loads(line) for line in fetch_log.read_text().splitlines()]
    data = [f for f in fetches if f["uri"].rstrip("/") == data_uri]
    # stage, fine_tune, the surviving serial child, reignition, 2 parallel children, the full train,
    # the export (its parity gate runs on the val split)
    assert len({f["pid"] for f in data}) == 8
    assert sum(f["downloaded"] for f in data) == objects  # one download per object for the whole run
    assert not pod_cache.exists() or not any(p.is_file() for p in pod_cache.rglob("*.jpg"))


def test_plateau_reignition_task_outputs_its_models_as_a_model_artifact(tiny_data, tmp_path, monkeypatch):
    """The serial search's plateau reignition (a pipeline task) hands its reignited weights on
    as a Model artifact (a folder: the weights and ``reignited.json``; metadata ``reignited``
    with ids and URIs, the data version); when the front still improves the folder lists
    nothing and the metadata says ``skipped``, and the state passes on unchanged."""
    from kfp.dsl import Dataset, Model

    from spnas.orchestration import phases, pods
    from spnas.search.settings import SearchSettings
    from spnas.search.state import new_state
    config = json.dumps(yaml.safe_load(_tiny_config(tmp_path, tiny_data).read_text()))
    run_uri = str(tmp_path / "run")
    desc = {"num_classes": 4, "backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8}, "neck": {}}
    st = new_state(SearchSettings("SpNasS", max_sample=8, reignition_patience=1, flops_size=96),
                   [{"desc": desc, "metrics": {"mAP": 30.0}, "weights": str(tmp_path / "seed.pth")}])
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"), metadata={"root": str(tiny_data), "version": "v" * 16})

    calls = []

    def fake_reignition(models, step, out, **kwargs):
        calls.append((step.name, [m["id"] for m in models], kwargs["detection"].root))
        Path(out, "model_0.pth").write_bytes(b"reignited weights")
        return [{**models[0], "metrics": {"mAP": 33.0}, "weights": str(Path(out) / "model_0.pth")}]
    monkeypatch.setattr(phases, "reignition", fake_reignition)

    still = pods._put_state(st, run_uri, "serial", "state-1")
    models = Model(name="models", uri=str(tmp_path / "art" / "quiet"), metadata={})
    assert pods.reignite_if_plateau_task(config, "serial", still, dataset, "", run_uri, "[]", models) == still
    assert calls == [] and json.loads((Path(models.path) / "reignited.json").read_text()) == []
    assert models.metadata == {"reignited": [], "status": "skipped", "data_version": "v" * 16}

    st["plateau"].update(stale_rounds=1)  # the front has not improved for reignition_patience rounds
    stale = pods._put_state(st, run_uri, "serial", "state-2")
    models = Model(name="models", uri=str(tmp_path / "art" / "fired"), metadata={})
    out = pods.reignite_if_plateau_task(config, "serial", stale, dataset, "", run_uri, "[]", models)
    assert calls == [("reignition", [0], str(tiny_data))]
    uri = f"{models.uri}/model_0.pth"  # stored once: in the artifact (records and results under the run)
    assert models.metadata == {"reignited": [{"id": 0, "uri": uri}], "status": "ok", "data_version": "v" * 16}
    assert Path(uri).read_bytes() == b"reignited weights" and not list(Path(run_uri).rglob("*.pth"))
    new = pods._state(out)["records"]
    assert [r["ops"] for r in new if r["parent"] is not None] == [["reignite"]] and new[-1]["weights"] == uri


def test_cluster_defaults_data_uri_required_results_under_the_namespace_private_prefix(compiled, tmp_path):
    """The compiled pipeline has no default data set (a path on the compiling machine means
    nothing in a pod) and, without a results_uri, publishes under the multi-user prefix its
    profile may write: ``mlpipeline/private/<namespace>/spnas/<run id>``."""
    from spnas.orchestration.pods import run_prefix
    from spnas.utils.errors import ConfigError
    _, docs = compiled
    params = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert params["data_uri"] == {"parameterType": "STRING"}  # required
    assert params["results_uri"]["defaultValue"] == ""
    ns = tmp_path / "namespace"
    ns.write_text("team-a\n")
    assert run_prefix("", "run-1", ns) == "minio://mlpipeline/private/team-a/spnas/run-1"
    assert run_prefix("s3://b/spnas/", "run-1", ns) == "s3://b/spnas/run-1"
    with pytest.raises(ConfigError, match=r"results_uri: not set, and this task runs in no Kubernetes namespace .*"
                                          r"minio://mlpipeline/private/<namespace>/spnas"):
        run_prefix("", "run-1", tmp_path / "missing")
