"""The Kubeflow pipeline of the segmentation examples (#16): the pipeline compiled from
configs/demo-instance.yml (Mask R-CNN, searches ranked by segm_mAP) and from
configs/demo-semantic.yml (SemanticFPN, ranked by mIoU), each shrunk as the tiny runs are, runs
end to end under kfp.local, and its records are those of ``spnas run`` of the same config."""
from __future__ import annotations

import builtins
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT, tiny_overrides

PHASES = ["fine_tune", "serial", "reignition", "parallel", "fully_train"]

#: Mask R-CNN on the tiny schedule: torchvision's mask head (four 256-channel 3x3 convs at 14x14,
#: whatever the backbone's width) runs on every detection at evaluation (up to 100 per image, the
#: default, from an untrained model) and on every positive RoI in training, and it dominated the
#: case: `spnas run` of the tiny instance config took 103 s with the defaults, 25 s with these two
#: (2-core CPU shared with another test run). The description's own keys, so fine_tune's model and
#: every model derived from it (the search's, the controls') carry them.
MASK_HEAD_LIGHT = ["fine_tune.model.model_desc.box_detections_per_img=10",
                   "fine_tune.model.model_desc.box_batch_size_per_image=16"]


@dataclass(frozen=True)
class Case:
    config: Path
    desc_type: str
    task: str          # export.json's task
    figures: tuple     # the metrics compared between the two runs (the first: the search's objective)
    quality: str       # control.json's "quality": the figure its deltas are of
    absent: tuple      # metric keys no record of the task may hold
    extra: tuple = ()  # overrides on top of helpers.tiny_overrides


CASES = {
    "instance": Case(ROOT / "configs" / "demo-instance.yml", "MaskRCNN", "instance_segmentation",
                     ("segm_mAP", "segm_AP50", "mAP", "AP50"), "segm_mAP", (), tuple(MASK_HEAD_LIGHT)),
    "semantic": Case(ROOT / "configs" / "demo-semantic.yml", "SemanticFPN", "semantic_segmentation",
                     ("mIoU", "pixel_acc"), "mIoU", ("mAP", "AP50", "segm_mAP"),
                     # the serial search retrains its seed first: the pipeline's rounds do it as spnas run does
                     ("serial.search_algorithm.refresh_seeds=true",)),
}


def _csv_records(path: Path) -> list[dict[str, Any]]:
    """The records of a phase's ``output.csv`` (id, metrics, desc)."""
    return [{"id": int(row["worker_id"]), "metrics": json.loads(row["performance"]), "desc": json.loads(row["desc"])}
            for row in csv.DictReader(path.open())]


def _summary(recs: list[dict[str, Any]], figures: tuple, search: bool) -> list[tuple]:
    """What must agree between two runs of one config: ids, codes, the task's figures (and of a
    search's records their parents and status)."""
    return [(r["id"], r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"],
             *((r.get("parent"), r.get("status")) if search else ()),
             *((r.get("metrics") or {}).get(k) for k in figures)) for r in recs]


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(CASES))
def test_segmentation_example_compiles_runs_under_kfp_local_and_agrees_with_spnas_run(task, tiny_data, tmp_path):
    """The pipeline compiled from the segmentation example (tiny overrides) runs every phase and
    its tail under kfp.local: every record of every phase is a model of the task carrying the
    task's metric (a semantic one no box metric), the run's result and its control are models of
    the task, the result is exported behind the parity gate and not registered (no registry); and
    ``spnas run`` of the same config gives the same records, phase by phase, figure for figure,
    and the same equal-budget comparison."""
    import kfp.local
    from kfp.components import load_component_from_file

    from pipelines.spnas_pipeline import compile_pipeline
    from spnas.cli.main import main as cli
    from spnas.config import apply_overrides
    case = CASES[task]
    raw = apply_overrides(yaml.safe_load(case.config.read_text()), tiny_overrides(tiny_data) + list(case.extra))
    config = tmp_path / f"tiny-{task}.yml"
    config.write_text(yaml.safe_dump(raw))
    package = tmp_path / "pipeline.yaml"
    compile_pipeline(config, package, parallelism=2, retry_backoff=1)
    spec = yaml.safe_load_all(package.read_text())
    compiled_config = next(spec)["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert json.loads(compiled_config)["fine_tune"]["model"]["model_desc"]["type"] == case.desc_type

    root, results = tmp_path / "root", tmp_path / "results"
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    saved = builtins.print  # kfp.local patches print to indent; its concurrent loop tasks can leave it patched
    try:
        load_component_from_file(str(package))(data_uri=str(tiny_data), results_uri=str(results), seed=0)
    finally:
        builtins.print = saved
    (run,) = [p for p in results.iterdir() if p.is_dir()]

    # every phase ran, and the tail
    for f in ("fine_tune/desc_0.json", "serial/state.json", "serial/pareto.png", "reignition/output.csv",
              "parallel/state.json", "parallel/pareto.png", "fully_train/output.csv", "control.json", "model_final.pth",
              "export/export.json", "export/parity.json", "export/model.onnx", "export/model.torchscript.pt"):
        assert (run / f).is_file(), f
    serial, parallel = (json.loads((run / s / "state.json").read_text()) for s in ("serial", "parallel"))
    records = {"fine_tune": _csv_records(run / "fine_tune" / "output.csv"), "serial": serial["records"],
               "reignition": _csv_records(run / "reignition" / "output.csv"), "parallel": parallel["records"],
               "fully_train": _csv_records(run / "fully_train" / "output.csv")}
    for name in ("serial", "parallel"):
        cands = [r for r in records[name] if r["parent"] is not None]
        assert len(cands) == 2 and all(r["status"] == "ok" for r in cands), (name, cands)
    assert len(records["fine_tune"]) == len(records["reignition"]) == len(records["fully_train"]) == 1
    refreshes = [r for r in records["serial"] if r.get("ops") == ["refresh"]]
    if "serial.search_algorithm.refresh_seeds=true" in case.extra:  # the seed retrained first, in a pod
        assert [(r["round"], r["parent"], r["desc"]["backbone"]["code"]) for r in refreshes] == \
            [(0, 0, records["fine_tune"][0]["desc"]["backbone"]["code"])]
    else:
        assert refreshes == []

    # every record is a model of the task with the task's figures (a semantic one no box metric)
    for name, recs in records.items():
        for r in recs:
            assert r["desc"]["type"] == case.desc_type, (name, r["id"])
            m = r["metrics"]
            assert all(isinstance(m.get(k), (int, float)) for k in case.figures), (name, r["id"], m)
            assert not set(case.absent) & set(m), (name, r["id"], sorted(m))
    assert serial["settings"]["objective_keys"][0] == parallel["settings"]["objective_keys"][0] == case.figures[0]

    # the run's result and its equal-budget control: models of the task, compared by the task's quality
    ctrl = json.loads((run / "control.json").read_text())
    assert ctrl["quality"] == case.quality and f"delta_{case.quality}" in ctrl
    assert ctrl["searched"]["desc"]["type"] == ctrl["control"]["desc"]["type"] == case.desc_type
    assert set(ctrl["phases"]) == {"serial", "parallel"}
    assert all(f"delta_{case.quality}" in ctrl["phases"][name] for name in ("serial", "parallel")), ctrl["phases"]

    # the tail: the result exported behind the parity gate, then not registered (no registry here)
    exported = json.loads((run / "export" / "export.json").read_text())
    assert json.loads((run / "export" / "parity.json").read_text())["passed"] is True
    assert exported["weights"] == str(run / "model_final.pth") and exported["desc"]["type"] == case.desc_type
    assert exported["task"] == case.task
    assert exported["control"]["winner"] == ctrl["winner"] and case.figures[0] in exported["metrics"]
    (pipeline_run,) = root.iterdir()
    note = (pipeline_run / "register-model" / "note").read_text()
    assert note.startswith("# Not registered") and "no model registry configured" in note, note

    # spnas run of the same config: the same records, phase by phase, and the same comparison
    assert cli(["run", str(config), "--workdir", str(tmp_path / "local"), "--quiet"]) == 0
    local = json.loads((tmp_path / "local" / "output" / "reports.json").read_text())
    assert list(local["phases"]) == PHASES
    for name in PHASES:
        search = name in ("serial", "parallel")
        assert _summary(local["phases"][name]["records"], case.figures, search) == \
            _summary(records[name], case.figures, search), name
    local_ctrl = local["control"]
    for key in ("searched", "control"):
        assert (ctrl[key][case.quality], ctrl[key]["iterations"], ctrl[key]["params"], ctrl[key]["desc"]["type"]) == \
            (local_ctrl[key][case.quality], local_ctrl[key]["iterations"], local_ctrl[key]["params"],
             local_ctrl[key]["desc"]["type"]), key
    assert ctrl[f"delta_{case.quality}"] == local_ctrl[f"delta_{case.quality}"]
    assert ctrl["winner"] == local_ctrl["winner"] and ctrl["phases"].keys() == local_ctrl["phases"].keys()
    print(f"{task}: result {ctrl['winner']} {case.quality} {ctrl[ctrl['winner']][case.quality]} "
          f"(spnas run {local_ctrl[local_ctrl['winner']][case.quality]}), final {case.figures[0]} "
          f"{records['fully_train'][0]['metrics'][case.figures[0]]} "
          f"(spnas run {local['phases']['fully_train']['records'][0]['metrics'][case.figures[0]]})")
