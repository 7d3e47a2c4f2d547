"""Shipping and retraining: the NAS pipeline's export + register tail, the retraining pipeline's
decision, and the compiled retraining pipeline run under kfp.local against a real MLflow server
(SQLite, artifacts in the embedded S3 store) on two data versions: once the challenger wins
(promoted: alias moved, manifest written) and once it loses (champion kept), both asserted from
the registry's state."""
import builtins
import json
import socket
from pathlib import Path

import pytest
import yaml
from helpers import DEMO, ROOT, demo, tiny_overrides
from mlflow_server import mlflow_server
from test_pipeline import _golden

from spnas.orchestration import ship
from spnas.utils.errors import RegistryError

NAME = "shapes"


def _config(tmp_path, data_root, extra=()):
    from spnas.config import apply_overrides
    raw = apply_overrides(yaml.safe_load(DEMO.read_text()), tiny_overrides(data_root) + list(extra))
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the compiled pipeline

COMPILED = ROOT / "pipelines" / "retrain_pipeline.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines.retrain_pipeline import compile_retrain_pipeline
    out = compile_retrain_pipeline(DEMO, tmp_path_factory.mktemp("compiled") / "retrain_pipeline.yaml")
    return list(yaml.safe_load_all(out.read_text()))


def test_checked_in_retrain_pipeline_is_up_to_date_and_parses_strictly(compiled):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2
    checked_in = list(yaml.safe_load_all(COMPILED.read_text()))
    assert _golden(checked_in) == _golden(compiled), "pipelines/retrain_pipeline.yaml is stale: run `make compile`"
    assert len(compiled) == 2
    spec = json_format.ParseDict(compiled[0], pipeline_spec_pb2.PipelineSpec())  # raises on any unknown field
    json_format.ParseDict(compiled[1], pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == "spnas-retrain"
    params = compiled[0]["root"]["inputDefinitions"]["parameters"]
    assert [k for k, v in params.items() if "defaultValue" not in v and not v.get("isOptional")] == ["data_uri"]
    assert {k: params[k]["defaultValue"] for k in ("model_name", "margin", "registry_uri", "epochs", "gate_images")} \
        == {"model_name": "spnas", "margin": 0.0, "registry_uri": "", "epochs": -1, "gate_images": 200}


def test_retrain_dag_shape(compiled):
    """preflight before anything; champion and challenger evaluated on the same staged data; the
    decision gates two branches: export -> promote when the challenger wins, keep otherwise."""
    spec = compiled[0]
    tasks = spec["root"]["dag"]["tasks"]
    names = {k: t["taskInfo"]["name"] for k, t in tasks.items()}
    assert names["retrain-preflight"].startswith("preflight") and names["full-train"].startswith("train the champion")
    assert {"retrain-preflight"} <= set(tasks["stage-data"]["dependentTasks"])
    assert {"retrain-preflight"} <= set(tasks["fetch-champion"]["dependentTasks"])
    evals = [k for k in tasks if k.startswith("evaluate-model")]
    assert len(evals) == 2
    for k in evals:
        ds = tasks[k]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
        assert ds == {"outputArtifactKey": "dataset", "producerTask": "stage-data"}
    roles = sorted(tasks[k]["inputs"]["parameters"]["role"]["runtimeValue"]["constant"] for k in evals)
    assert roles == ["challenger", "champion"]
    assert "decide" in tasks["condition-branches-1"]["dependentTasks"]
    branches = spec["components"][tasks["condition-branches-1"]["componentRef"]["name"]]["dag"]["tasks"]
    conditions = {k: t["triggerPolicy"]["condition"] for k, t in branches.items()}
    promote_if = "inputs.parameter_values['pipelinechannel--decide-Output'] == 'promote'"
    assert sorted(conditions.values()) == sorted([promote_if, f"!({promote_if})"])
    inner = {conditions[k]: spec["components"][t["componentRef"]["name"]]["dag"]["tasks"] for k, t in branches.items()}
    assert sorted(inner[promote_if]) == ["export-model", "promote"] and sorted(inner[f"!({promote_if})"]) == \
        ["keep-champion"]
    promote = inner[promote_if]["promote"]
    assert promote["dependentTasks"] == ["export-model"]
    assert promote["inputs"]["parameters"]["image"]["runtimeValue"]["constant"] == "ghcr.io/spnas-kfp/spnas:0.1.0"


# ----------------------------------------------------------------------------- the decision

@pytest.mark.parametrize("champion, challenger, margin, decision", [
    (50.0, 50.5, 0.5, "promote"),   # exactly the margin
    (50.0, 50.49, 0.5, "keep"),
    (50.0, 50.0, 0.0, "promote"),   # margin 0: a tie promotes (the newer data's model)
    (50.0, 49.9, 0.0, "keep"),
    (50.0, 48.0, -3.0, "promote"),  # a negative margin tolerates a small loss
])
def test_decide_promotes_only_by_the_margin(tmp_path, champion, challenger, margin, decision):
    run = tmp_path / "run"
    verdict = ship.decide({"metrics": {"mAP": champion}, "version": 3}, {"metrics": {"mAP": challenger}}, margin,
                          str(run), "abc123", champion_version=3)
    assert verdict["decision"] == decision
    assert verdict["delta"] == round(challenger - champion, 4) and verdict["margin"] == margin
    assert json.loads((run / ship.VERDICT_FILE).read_text()) == verdict
    text = ship.verdict_markdown(verdict, "x")
    assert f"| {champion:.2f} |" in text and f"| {challenger:.2f} |" in text and f"**{decision}**" in text
    assert "version 3" in text and "`abc123`" in text


def test_decide_compares_miou_for_a_semantic_model_and_refuses_mixed_tasks(tmp_path):
    """A semantic model's metrics have mIoU and no box mAP: the verdict compares mIoU (not two
    missing figures read as 0); a champion of another task than the challenger is refused."""
    from spnas.utils.errors import PhaseError
    champion = {"metrics": {"mIoU": 80.0, "pixel_acc": 96.0, "params": 1e6}}
    verdict = ship.decide(champion, {"metrics": {"mIoU": 80.4, "pixel_acc": 96.1}}, 0.5, str(tmp_path / "a"))
    assert (verdict["key"], verdict["decision"], verdict["delta"]) == ("mIoU", "keep", 0.4)
    verdict = ship.decide(champion, {"metrics": {"mIoU": 81.0}}, 0.5, str(tmp_path / "b"))
    assert (verdict["key"], verdict["decision"], verdict["champion"], verdict["challenger"]) == \
        ("mIoU", "promote", 80.0, 81.0)
    assert "| model | mIoU |" in ship.verdict_markdown(verdict, "x")
    with pytest.raises(PhaseError, match=r"the champion's metrics have no 'mIoU' \(got \['AP50', 'mAP'\]\); champion "
                                         r"and challenger must be the same task"):
        ship.decide({"metrics": {"mAP": 50.0, "AP50": 70.0}}, {"metrics": {"mIoU": 81.0}}, 0.5, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- registry and store

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow server (SQLite, artifacts proxied to the embedded S3 store) and that store,
    with a ``results`` bucket for the pipeline runs."""
    from spnas.storage import Store
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        with Store.from_env(server.s3_env) as st:
            st.make_bucket("results")
        yield server


@pytest.fixture(scope="module")
def champion_export(tiny_run, tiny_data, tmp_path_factory):
    """The first champion: the shared tiny run's fine-tuned seed (8 iterations of training, a
    weak detector), exported behind the gate."""
    from spnas.data.source import CocoSource
    from spnas.export.bundle import export_model
    seed = tiny_run[1]["phases"]["fine_tune"]["records"][0]
    d = tmp_path_factory.mktemp("champion")
    info = export_model(seed["desc"], seed["weights"], CocoSource(str(tiny_data)), d / "export", name=NAME)
    assert info["parity"]["passed"]
    return {"dir": d / "export", "weights": seed["weights"], "desc": seed["desc"], "info": info}


def test_a_registry_that_is_down_promotes_nothing(registry, champion_export, tmp_path):
    """promote_export against a registry that is down: a RegistryError naming its URI, raised
    before anything is written (no manifest in the export folder, no version anywhere)."""
    import shutil
    export = tmp_path / "export"
    shutil.copytree(champion_export["dir"], export)
    down = f"http://127.0.0.1:{_closed_port()}"
    verdict = {"decision": "promote", "delta": 1.0, "margin": 0.0, "champion": 1.0, "challenger": 2.0,
               "data_version": "v"}
    with pytest.raises(RegistryError, match=rf"{down}.*unreachable|unreachable.*{down}"):
        ship.promote_export(str(export), str(champion_export["weights"]), NAME, verdict, "img:1", down)
    assert not (export / "inferenceservice.yaml").exists()
    with pytest.raises(RegistryError, match=down):
        ship.register_export(str(export), str(champion_export["weights"]), NAME, down)
    # no registry at all: the NAS pipeline's register step records why and goes on
    out = ship.register_export(str(export), str(champion_export["weights"]), NAME, "")
    assert out == {"registered": False, "name": NAME,
                   "why": "no model registry configured (pipeline parameter registry_uri or MLFLOW_TRACKING_URI)"}


def test_the_search_pipelines_register_step_champion_first_then_challengers_and_retries_find_their_version(
        registry, champion_export, tmp_path):
    """The SP-NAS pipeline's register task (component body, real artifacts, a live registry): the
    model's first export becomes the champion, a later run's the challenger; a retried task (same
    export URI) finds the version its first attempt registered instead of adding one."""
    import shutil

    from kfp.dsl import Markdown

    from spnas.registry.client import Registry
    name = "search-tail"
    reg = Registry(registry.uri)
    runs = []
    for i in range(2):
        folder = tmp_path / f"run{i}" / "export"
        shutil.copytree(champion_export["dir"], folder)
        runs.append({"export_uri": str(folder), "weights": str(champion_export["weights"]), "mAP": 1.0})
    note = Markdown(name="note", uri=str(tmp_path / "note.md"), metadata={})
    first = ship.register_task(runs[0], name, registry.uri, note)
    assert (first["registered"], first["version"], first["alias"]) == (True, 1, "champion")
    assert "version **1**, alias **champion**" in Path(note.path).read_text()
    second = ship.register_task(runs[1], name, registry.uri, note)
    assert (second["version"], second["alias"]) == (2, "challenger")
    again = ship.register_task(runs[1], name, registry.uri, note)  # a retried task
    assert (again["version"], again["alias"]) == (2, "challenger")
    assert [v.version for v in reg.versions(name)] == [1, 2]
    assert reg.alias(name, "champion").version == 1 and reg.alias(name, "challenger").version == 2
    assert reg.get(name, "2").tags["export_uri"] == runs[1]["export_uri"]
    # the weights travel with the version: what retraining starts from
    got = reg.download(name, "champion", tmp_path / "dl")
    assert (got / "pytorch" / "model.pth").read_bytes() == Path(champion_export["weights"]).read_bytes()
    # without a registry the note says why nothing was registered
    out = ship.register_task(runs[0], name, "", note)
    assert out["registered"] is False and Path(note.path).read_text().startswith("# Not registered")


@pytest.mark.slow
def test_retraining_pipeline_under_kfp_local_promotes_a_better_model_and_keeps_the_champion_otherwise(
        registry, champion_export, tiny_data, tmp_path, monkeypatch):
    import kfp.local
    from kfp.components import load_component_from_file

    from pipelines.retrain_pipeline import compile_retrain_pipeline
    from spnas.registry.client import Registry
    reg = Registry(registry["uri"])
    info, alias = reg.register_candidate(champion_export["dir"], NAME, weights=champion_export["weights"])
    assert (info.version, alias) == (1, "champion")

    for k, v in registry["s3_env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the pipeline parameter names the registry
    # the tiny config's full train, with a warm-up short enough for a few iterations to learn
    config = _config(tmp_path, tiny_data, ["fully_train.trainer.lr_scheduler.params.warmup_iters=2",
                                           "fully_train.trainer.lr_scheduler.params.after_scheduler_config.params.milestones=[24]"])
    package = compile_retrain_pipeline(config, tmp_path / "retrain.yaml", retry_backoff=1)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipeline = load_component_from_file(str(package))
    saved = builtins.print  # kfp.local patches print to indent
    try:
        # data version 1: the weakly trained champion against itself trained 3 more epochs on it
        pipeline(data_uri=str(tiny_data), model_name=NAME, margin=0.0, registry_uri=registry["uri"],
                 results_uri="minio://results/retrain", epochs=30, gate_images=0)
        runs = _runs()
        assert len(runs) == 1
        first = _read(runs[0] + "verdict.json")
        assert first["decision"] == "promote" and first["challenger"] > first["champion"], first
        assert first["champion_version"] == 1
        champ = reg.alias(NAME, "champion")
        assert champ.version == 2 and reg.alias(NAME, "challenger") is None
        assert [v.version for v in reg.versions(NAME)] == [1, 2]
        assert champ.tags["previous_champion"] == "1" and champ.tags["retrained_from"] == "1"
        assert float(champ.tags["mAP"]) == pytest.approx(first["challenger"], abs=0.01)
        assert champ.tags["data_version"] == first["data_version"]
        manifest = yaml.safe_load(_read_text(runs[0] + "export/inferenceservice.yaml"))
        assert manifest["kind"] == "InferenceService"
        assert manifest["spec"]["predictor"]["containers"][0]["env"][0]["value"] == \
            "s3://results/" + runs[0].split("minio://results/", 1)[1] + "export/"
        assert champ.tags["storage_uri"] == runs[0] + "export"
        assert _read(runs[0] + "export/parity.json")["passed"] is True

        # data version 2 (other scenes), one more epoch must gain 1 mAP: it does not, the champion stays
        other = demo(tmp_path / "data-v2", train=16, val=6, size=96, seed=7)
        pipeline(data_uri=str(other), model_name=NAME, margin=1.0, registry_uri=registry["uri"],
                 results_uri="minio://results/retrain", epochs=1, gate_images=0)
    finally:
        builtins.print = saved
    runs2 = [r for r in _runs() if r not in runs]
    assert len(runs2) == 1
    second = _read(runs2[0] + "verdict.json")
    assert second["decision"] == "keep" and second["delta"] < second["margin"] == 1.0 and second["champion_version"] == 2
    assert second["data_version"] != first["data_version"]
    assert reg.alias(NAME, "champion").version == 2 and reg.alias(NAME, "challenger") is None
    assert [v.version for v in reg.versions(NAME)] == [1, 2]
    assert not _exists(runs2[0] + "export/")  # nothing exported, nothing registered


def _runs() -> list[str]:
    """The retraining runs under minio://results/retrain/ that wrote a verdict (the store's
    credentials are in the environment)."""
    from spnas.storage import list_objects
    return sorted(k.rsplit("verdict.json", 1)[0] for k in list_objects("minio://results/retrain/")
                  if k.endswith("/verdict.json"))


def _read_text(uri: str) -> str:
    from spnas.storage import local_path
    return Path(local_path(uri)).read_text()


def _read(uri: str) -> dict:
    return json.loads(_read_text(uri))


def _exists(uri: str) -> bool:
    from spnas.storage import exists
    return exists(uri)
