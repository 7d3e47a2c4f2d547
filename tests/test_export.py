"""spnas export: ONNX and TorchScript programs of the whole detector, the parity gate, labels,
the model card, and the refusal to publish an export that failed its gate."""
from __future__ import annotations

import json

import onnxruntime  # noqa: E402,F401  the export extra (`make install` installs it): missing, these tests fail, not skip
import pytest
import torch

from spnas.cli.main import main as cli
from spnas.data.source import CocoSource
from spnas.export import parity
from spnas.export.bundle import ExportRefused, check_publishable, export_model, lineage
from spnas.export.programs import eager_runner, onnx_runner, torchscript_runner
from spnas.models.cost import count_params
from spnas.models.desc import normalize_desc
from spnas.models.detector import build_detector

TINY = {"backbone": {"code": "1-1-2-1", "block": "basic", "base_channels": 8}, "neck": {"code": [0, 1, 0, 0]},
        "min_size": 96, "max_size": 96, "num_classes": 4}


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """A random-weight detector (with a parallel column, so the neck's connections are in the
    graph) exported against the tiny data set's 6 val images."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_detector(TINY)
    torch.save(model.state_dict(), tmp / "w.pth")
    info = export_model(TINY, tmp / "w.pth", CocoSource(str(tiny_data)), tmp / "out", name="tiny")
    return tmp / "out", info, model


def test_the_export_folder_holds_every_file_and_its_description(exported, tiny_data):
    out, info, model = exported
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "export.json", "labels.json", "model.onnx",
                                                     "model.torchscript.pt", "parity.json"]
    assert json.loads((out / "export.json").read_text()) == info
    assert (info["name"], info["format_version"], info["opset"], info["onnx"]) == ("tiny", 1, 17, "model.onnx")
    assert [o["name"] for o in info["outputs"]] == ["boxes", "labels", "scores"]
    assert info["desc"] == normalize_desc(TINY)
    assert info["costs"]["params"] == count_params(model)["total"]
    assert info["data"]["version"] == CocoSource(str(tiny_data)).manifest()["version"]
    assert info["data"]["val_images"] == 6 and info["parity"]["passed"] is True
    ann = json.loads((tiny_data / "annotations" / "instances_val2017.json").read_text())
    cats = sorted((c["id"], c["name"]) for c in ann["categories"])
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert [(e["category_id"], e["name"]) for e in labels] == cats and [e["label"] for e in labels] == [1, 2, 3]


def test_both_programs_compute_what_pytorch_computes_at_any_size(exported, tiny_data):
    out, _, model = exported
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    ref = eager_runner(model)
    runners = {"onnx": onnx_runner(out / "model.onnx"), "torchscript": torchscript_runner(out / "model.torchscript.pt")}
    torch.manual_seed(1)
    for image in (ds[0][0], ds[5][0], torch.rand(3, 96, 64)):
        want = ref(image)
        assert len(want["scores"]) > 0
        for name, run in runners.items():
            got = run(image)
            assert torch.equal(got["labels"], want["labels"]), name
            torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=0)
            torch.testing.assert_close(got["scores"], want["scores"], atol=1e-4, rtol=0)


def _sizes_torchvision_tracing_misses(min_size: int, max_size: int, count: int) -> list[tuple[int, int]]:
    """Image sizes that torchvision's own traced resize (its size computed in float32) makes a
    pixel smaller than eager PyTorch does (Python floats): what an export must not inherit."""
    from torchvision.models.detection.transform import _resize_image_and_masks

    class Resize(torch.nn.Module):
        def forward(self, x):
            return _resize_image_and_masks(x, min_size, max_size)[0]
    eager = Resize()
    traced = torch.jit.trace(eager, (torch.zeros(3, min_size, min_size),), check_trace=False)
    found = []
    for h in range(min_size // 2, 4 * min_size):
        for w in (h * 3 // 5, h * 5 // 3):
            x = torch.zeros(3, h, w)
            if traced(x).shape != eager(x).shape:
                found.append((h, w))
                if len(found) == count:
                    return found
    return found


def test_programs_resize_every_size_as_pytorch_does(exported, tiny_data):
    """The programs are traced on one 96 px image; on images whose resize torchvision's traced
    arithmetic gets a pixel wrong they still give PyTorch's detections exactly."""
    out, _, model = exported
    sizes = _sizes_torchvision_tracing_misses(96, 96, 3)
    assert len(sizes) == 3, sizes  # the hazard exists at these settings (else this test proves nothing)
    image = CocoSource(str(tiny_data)).load("val", train=False)[0][0]
    ref = eager_runner(model)
    runners = {"onnx": onnx_runner(out / "model.onnx"), "torchscript": torchscript_runner(out / "model.torchscript.pt")}
    for h, w in sizes:
        x = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        want = ref(x)
        assert len(want["scores"]) > 0
        for name, run in runners.items():
            got = run(x)
            assert torch.equal(got["labels"], want["labels"]), (name, h, w)
            torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-3, rtol=0)
            torch.testing.assert_close(got["scores"], want["scores"], atol=1e-4, rtol=0)


def test_the_parity_report_has_the_measured_figures(exported):
    out, _, _ = exported
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["images"] == 6
    assert report["gate"] == {"iou": 0.99, "score": 1e-3, "map": 0.1, "mask_iou": 0.99, "pixels": 0.999}
    for name in ("onnx", "torchscript"):
        p = report["programs"][name]
        assert p["passed"] and p["val"]["unmatched"] == 0 and p["val"]["score_mismatch"] == 0
        assert p["val"]["matched"] == p["val"]["detections"] > 0 and p["val"]["min_iou"] >= 0.99
        assert p["mAP_diff"] <= 0.1 and p["probes"]["images"] == 12
        assert p["probes"]["unmatched"] == 0 and p["probes"]["score_mismatch"] == 0  # probes gate too
    assert check_publishable(out)["name"] == "tiny"


def test_the_model_card_states_architecture_cost_parity_and_limits(exported):
    out, info, _ = exported
    card = (out / "MODEL_CARD.md").read_text()
    for text in ("# Model card: tiny", "serial code `1-1-2-1`", "parallel code `[0, 1, 0, 0]`",
                 f"parameters: {info['costs']['params']:,}", "ONNX Runtime", "GPU: not measured",
                 f"version `{info['data']['version']}`", "Verdict: **passed**", "| onnx | passed | ",
                 "| torchscript | passed | ", "No equal-budget control was given", "## Intended use and limits"):
        assert text in card, text


def test_match_counts_unmatched_boxes_labels_and_score_differences():
    gate = parity.Gate()
    ref = {"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]),
           "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.9, 0.8, 0.7])}
    same = parity.match(ref, ref, gate)
    assert (same["matched"], same["unmatched"], same["score_mismatch"], same["min_iou"], same["max_box_diff"]) == \
        (3, 0, 0, 1.0, 0.0)
    got = {"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 40, 41], [50, 50, 60, 60], [70, 70, 80, 80]]),
           "labels": torch.tensor([1, 2, 3, 1]), "scores": torch.tensor([0.9005, 0.8, 0.7, 0.5])}
    m = parity.match(ref, got, gate)  # box 2 moved (IoU 0.952), box 3 relabelled, one extra detection
    assert (m["reference"], m["program"], m["matched"], m["unmatched"], m["score_mismatch"]) == (3, 4, 1, 5, 0)
    assert m["max_box_diff"] == 0.0  # the one matched pair is box 1, unmoved
    got["boxes"][0, 2] = 10.0625  # IoU 0.994: still matched
    assert parity.match(ref, got, gate)["max_box_diff"] == 0.0625
    got["scores"] = torch.tensor([0.902, 0.8, 0.7, 0.5])
    assert parity.match(ref, got, gate)["score_mismatch"] == 1
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    assert parity.match(ref, empty, gate)["unmatched"] == 3 and parity.match(empty, empty, gate)["unmatched"] == 0


def test_a_program_that_drifts_fails_the_gate_and_is_refused(exported, tiny_data, tmp_path):
    out, _, model = exported
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    onnx = onnx_runner(out / "model.onnx")

    def drifting(image):
        res = onnx(image)
        return {**res, "scores": res["scores"] - 0.01}
    report = parity.check(eager_runner(model), {"onnx": onnx, "drifting": drifting}, ds, probes=False)
    assert report["programs"]["onnx"]["passed"] and not report["programs"]["drifting"]["passed"]
    assert report["passed"] is False and report["programs"]["drifting"]["val"]["score_mismatch"] > 0
    folder = tmp_path / "failed"
    folder.mkdir()
    (folder / "parity.json").write_text(json.dumps(report))
    with pytest.raises(ExportRefused, match=r"drifting: 0 unmatched detection\(s\), \d+ score mismatch\(es\).*"
                                            r"refused for publishing"):
        check_publishable(folder)
    with pytest.raises(ExportRefused, match="parity.json does not exist"):
        check_publishable(tmp_path)


def test_an_export_with_one_tensor_changed_fails_the_gate_and_is_refused(exported, tiny_data, tmp_path):
    """model.onnx with one weight tensor (the RoI classifier's) scaled by 1.5: the gate finds the
    moved scores, says passed: false, and the folder is refused for publishing."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper
    out, _, model = exported
    bad = tmp_path / "corrupted"
    shutil.copytree(out, bad)
    proto = onnx.load(str(bad / "model.onnx"))
    [init] = [i for i in proto.graph.initializer if i.name == "roi_heads.box_predictor.cls_score.weight"]
    init.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(init) * np.float32(1.5)).astype(np.float32), init.name))
    onnx.save(proto, str(bad / "model.onnx"))
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    report = parity.check(eager_runner(model), {"onnx": onnx_runner(bad / "model.onnx")}, ds)
    onnx_report = report["programs"]["onnx"]
    assert report["passed"] is False and onnx_report["passed"] is False
    assert onnx_report["val"]["unmatched"] + onnx_report["val"]["score_mismatch"] > 0
    (bad / "parity.json").write_text(json.dumps(report))
    with pytest.raises(ExportRefused, match=r"onnx: \d+ unmatched detection\(s\), \d+ score mismatch\(es\)"):
        check_publishable(bad)


def test_cli_export_exits_3_when_the_gate_fails(tiny_data, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save(build_detector(TINY).state_dict(), tmp_path / "w.pth")
    (tmp_path / "d.json").write_text(json.dumps(TINY))
    args = ["export", "--desc", str(tmp_path / "d.json"), "--weights", str(tmp_path / "w.pth"), "--data",
            str(tiny_data), "--max-images", "2"]
    monkeypatch.setattr(parity.Gate, "__init__", lambda self, iou=1.01, score=1e-3, map=0.1:  # noqa: ARG005
                        object.__setattr__(self, "iou", iou) or object.__setattr__(self, "score", score)
                        or object.__setattr__(self, "map", map))
    assert cli([*args, "--out", str(tmp_path / "x")]) == 3  # IoU >= 1.01 cannot be met
    assert "parity gate FAILED" in capsys.readouterr().err
    assert json.loads((tmp_path / "x" / "parity.json").read_text())["passed"] is False


def test_lineage_follows_parents_back_through_the_phases():
    """Records as ``spnas run`` writes them: candidates name a parent in their phase, search
    seeds (round -1) start from an earlier record's weights, reignition and full-train records
    name the previous phase's id; the result record (reports' ``best``) carries no phase."""
    def rec(i, parent, code, weights, rnd=None, **extra):
        r = {"id": i, "parent": parent, "desc": {"backbone": {"code": code}}, "metrics": {"mAP": float(i)},
             "iters": 10, "weights": weights, **extra}
        return r if rnd is None else {**r, "round": rnd}
    reports = {"phases": {
        "fine_tune": {"role": "fine_tune", "records": [rec(0, None, "1-2-2-2", "ft/0", phase="fine_tune")]},
        "serial": {"role": "serial", "records": [rec(0, None, "1-2-2-2", "ft/0", -1), rec(1, 0, "11-2-2-2", "s/1", 0),
                                                  rec(3, 1, "11-2-2-12", "s/3", 1), rec(4, 0, "1-2-12-2", "s/4", 1)]},
        "reignition": {"role": "reignition", "records": [rec(3, 3, "11-2-2-12", "r/3", phase="reignition"),
                                                          rec(4, 4, "1-2-12-2", "r/4", phase="reignition")]},
        "parallel": {"role": "parallel", "records": [rec(0, None, "11-2-2-12", "r/3", -1),
                                                      rec(1, None, "1-2-12-2", "r/4", -1),
                                                      rec(2, 0, "11-2-2-12", "p/2", 0), rec(3, 1, "1-2-12-2", "p/3", 0)]},
        "fully_train": {"role": "full_train", "records": [rec(2, 2, "11-2-2-12", "f/2")]}}}
    best = dict(reports["phases"]["fully_train"]["records"][0])
    chain = lineage(reports, best)
    assert [(e["phase"], e["id"]) for e in chain] == [
        ("fully_train", 2), ("parallel", 2), ("parallel", 0), ("reignition", 3), ("serial", 3), ("serial", 1),
        ("serial", 0), ("fine_tune", 0)]
    chain = lineage(reports, reports["phases"]["parallel"]["records"][3])
    assert [(e["phase"], e["id"], e["serial"]) for e in chain] == [
        ("parallel", 3, "1-2-12-2"), ("parallel", 1, "1-2-12-2"), ("reignition", 4, "1-2-12-2"),
        ("serial", 4, "1-2-12-2"), ("serial", 0, "1-2-2-2"), ("fine_tune", 0, "1-2-2-2")]
    assert all("segm_mAP" not in e for e in chain)  # a detector's lineage has no mask AP


def test_lineage_and_card_of_a_mask_rcnn_searched_by_mask_ap():
    """A Mask R-CNN run compared by mask AP (control quality segm_mAP): the lineage records each
    model's mask AP and the card's lineage table shows it; without that control, box mAP."""
    from spnas.export.card import _lineage_rows
    desc = {"type": "MaskRCNN", "backbone": {"code": "1-2-2-2"}}
    reports = {"phases": {
        "fine_tune": {"role": "fine_tune", "records": [
            {"id": 0, "parent": None, "desc": desc, "metrics": {"mAP": 40.0, "segm_mAP": 35.5}, "iters": 10,
             "weights": "ft/0", "phase": "fine_tune"}]},
        "fully_train": {"role": "full_train", "records": [
            {"id": 0, "parent": 0, "desc": desc, "metrics": {"mAP": 44.0, "segm_mAP": 38.25}, "iters": 20,
             "weights": "f/0"}]}}}
    chain = lineage(reports, reports["phases"]["fully_train"]["records"][0])
    assert [(e["phase"], e["mAP"], e["segm_mAP"]) for e in chain] == [("fully_train", 44.0, 38.25),
                                                                       ("fine_tune", 40.0, 35.5)]
    info = {"task": "instance_segmentation", "lineage": chain, "control": {"quality": "segm_mAP"}}
    assert _lineage_rows(info)[:3] == ["| phase | id | serial | parallel | segm_mAP | iterations |",
                                       "|---|---|---|---|---|---|", "| fully_train | 0 | 1-2-2-2 | [0, 0, 0, 0] | 38.25 | 20 |"]
    assert "| fully_train | 0 | 1-2-2-2 | [0, 0, 0, 0] | 44.00 | 20 |" in _lineage_rows({**info, "control": None})


@pytest.mark.slow
def test_cli_export_of_a_run_carries_its_control_and_lineage(tiny_run, tiny_data, tmp_path, capsys):
    workdir, reports = tiny_run
    assert cli(["export", "--run", str(workdir / "output"), "--data", str(tiny_data), "--out", str(tmp_path / "e")]) == 0
    assert "parity gate passed" in capsys.readouterr().out
    info = json.loads((tmp_path / "e" / "export.json").read_text())
    assert info["control"] == reports["control"] and info["lineage"][0]["id"] == reports["best"]["id"]
    assert info["lineage"][0]["phase"] == "fully_train" and info["lineage"][-1]["phase"] == "fine_tune"
    card = (tmp_path / "e" / "MODEL_CARD.md").read_text()
    assert "equal-budget control (in the run)" in card and "| phase | id | serial |" in card
