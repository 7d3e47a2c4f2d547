"""Mask R-CNN on the searched backbone (#16, the model layer): ``type: MaskRCNN`` builds
torchvision's MaskRCNN on the serial backbone and parallel neck, a torchvision
``maskrcnn_resnet50_fpn`` checkpoint converts by name and gives the same boxes and masks, and
expand / parallel children compute exactly what their parent computed, masks included."""
import numpy as np
import pytest
import torch
from helpers import randomize_norms
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

from spnas import ConversionError, build_detector, convert_torchvision, inherit_weights, normalize_desc
from spnas.utils.errors import DescError

SIZE = {"min_size": 320, "max_size": 320}


def test_type_spellings_and_the_built_model():
    for spelling in ("MaskRCNN", "maskrcnn", "mask_rcnn"):
        assert normalize_desc({"type": spelling})["type"] == "MaskRCNN"
    assert normalize_desc({"type": "faster_rcnn"})["type"] == "FasterRCNN"
    with pytest.raises(DescError, match=r"type 'RetinaNet' is not supported: expected one of \['FasterRCNN', 'MaskRCNN', "
                                        r"'SemanticFPN'\]"):
        normalize_desc({"type": "RetinaNet"})
    desc = {"type": "MaskRCNN", "num_classes": 4, "representation_size": 64, "min_size": 96, "max_size": 96,
            "backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8}, "neck": {"code": [0, 1, 0, 0]}}
    model = build_detector(desc)
    assert isinstance(model, MaskRCNN)
    assert model.roi_heads.mask_roi_pool.featmap_names == model.roi_heads.box_roi_pool.featmap_names == \
        ["0", "1", "2", "3"]
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4  # the custom box head's class count
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 80)])[0]
    n = out["boxes"].shape[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"} and out["masks"].shape == (n, 1, 96, 80)
    model.train()
    target = {"boxes": torch.tensor([[10.0, 10, 50, 40]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 96, 80, dtype=torch.uint8)}
    target["masks"][0, 10:40, 10:50] = 1
    losses = model([torch.rand(3, 96, 80)], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


@pytest.fixture(scope="module")
def tv_mask_checkpoint():
    """A randomly initialised torchvision Mask R-CNN (BN statistics randomised, class scores
    spread so that detections survive the score threshold)."""
    torch.manual_seed(0)
    tv = randomize_norms(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SIZE), seed=1).eval()
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
        tv.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.0)
        tv.roi_heads.mask_predictor.mask_fcn_logits.bias.normal_(0, 1.0)  # masks of varied extent
    return tv


@pytest.mark.slow
def test_converted_mask_rcnn_checkpoint_gives_identical_boxes_and_masks(tv_mask_checkpoint):
    tv = tv_mask_checkpoint
    converted = convert_torchvision(tv.state_dict())
    ours = build_detector({"type": "MaskRCNN", **SIZE})
    ours.load_state_dict(converted, strict=True)
    ours.eval()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 200, generator=g)]
    with torch.no_grad():
        ref, got = tv(images), ours(images)
    for r, o in zip(ref, got, strict=True):
        assert r["boxes"].shape[0] > 10, "test is vacuous: too few detections"
        assert torch.equal(r["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(o["scores"], r["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(o["masks"], r["masks"], atol=1e-5, rtol=0)
        assert (r["masks"] > 0.5).any()


def test_mask_checkpoint_kinds_and_misfits(tv_mask_checkpoint):
    tv = tv_mask_checkpoint
    frozen = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    converted = convert_torchvision({"model": frozen})  # a FrozenBatchNorm2d checkpoint
    assert len(converted) == len(tv.state_dict()) and all(torch.equal(converted[k], v) for k, v in frozen.items())
    # the type follows the checkpoint; a Faster R-CNN description refuses the mask tensors by name
    with pytest.raises(ConversionError, match=r"torchvision Faster R-CNN checkpoint does not fit: \d+ not in the "
                                              r"model: \[.*'roi_heads\.mask_predictor\.mask_fcn_logits\.weight'"):
        convert_torchvision(frozen, {"num_classes": 91})


def _desc(code, parallel=None):
    d = {"type": "MaskRCNN", "num_classes": 5, "min_size": 160, "max_size": 160, "box_score_thresh": 0.0,
         "representation_size": 128, "backbone": {"code": code, "block": "basic", "base_channels": 8}}
    if parallel is not None:
        d["neck"] = {"code": parallel}
    return d


@pytest.mark.parametrize("parent_code, child_code, child_parallel", [
    ("11-21-21-21", "111-21-211-21", None),      # expand: two identity blocks inserted
    ("11-21-21-21", "11-21-21-21", [0, 1, 0, 2]),  # parallel passes at zero
])
def test_expand_and_parallel_children_keep_boxes_and_masks(parent_code, child_code, child_parallel):
    pdesc, cdesc = _desc(parent_code), _desc(child_code, child_parallel)
    torch.manual_seed(0)
    parent = randomize_norms(build_detector(pdesc), 0).eval()
    with torch.no_grad():
        parent.roi_heads.mask_predictor.mask_fcn_logits.bias.normal_(0, 1.0)
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    assert not [k for k in report["fresh"] if k.startswith("roi_heads.mask")]  # the mask head is inherited whole
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    child.eval()
    images = [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    with torch.no_grad():
        want, got = parent(images), child(images)
    for a, b in zip(want, got, strict=True):
        assert a["boxes"].shape[0] > 0 and (a["masks"] > 0.5).any()
        for k in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(a[k], b[k]), k


def test_mask_metrics_score_perfect_and_shifted_masks(tiny_data):
    """segm metrics from COCOeval on the data set's own masks: the ground truth as detections
    scores 100, the same masks moved off their objects score far less; a set without masks is
    named, not crashed on."""
    import copy

    from pycocotools import mask as mask_utils

    from spnas.data.source import CocoSource
    from spnas.training.evaluation import coco_metrics
    from spnas.utils.errors import DataError
    ds = CocoSource(str(tiny_data)).load("val", train=False)
    anns = ds.coco.dataset["annotations"]
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 1.0} for a in anns]
    assert coco_metrics(ds.coco, perfect, "segm")["mAP"] == pytest.approx(100.0)
    shifted = []
    for r in perfect:
        m = mask_utils.decode(r["segmentation"])
        moved = np.asfortranarray(np.roll(m, (m.shape[0] // 3, m.shape[1] // 3), axis=(0, 1)))
        rle = mask_utils.encode(moved)
        shifted.append({**r, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    assert coco_metrics(ds.coco, shifted, "segm")["mAP"] < 20.0
    bare = copy.deepcopy(ds.coco)
    del bare.dataset["annotations"][0]["segmentation"]
    with pytest.raises(DataError, match="mask AP needs a segmentation on every annotation; 1 have none"):
        coco_metrics(bare, perfect, "segm")


def test_train_task_instance_segmentation_writes_mask_metrics(tiny_data, tmp_path, capsys):
    """spnas train --task instance_segmentation on demo data: a Mask R-CNN trained on the
    annotations' masks, performance_0.json with segm_mAP... beside the box metrics; a
    description of another type is refused."""
    import json

    from spnas.cli.main import main as cli
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({"backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8},
                                "neck": {"out_channels": 32}, "representation_size": 64, "min_size": 96,
                                "max_size": 96}))
    args = ["train", "--data", str(tiny_data), "--desc", str(desc), "--iters", "4", "--batch-size", "2",
            "--warmup-iters", "1", "--out", str(tmp_path / "out")]
    assert cli([*args, "--task", "instance_segmentation"]) == 0
    perf = json.loads((tmp_path / "out" / "performance_0.json").read_text())
    for key in ("mAP", "AP50", "segm_mAP", "segm_AP50", "segm_AP75", "segm_AP_small"):
        assert key in perf, key
    assert json.loads((tmp_path / "out" / "desc_0.json").read_text())["type"] == "MaskRCNN"
    assert "segm_mAP" in capsys.readouterr().out
    desc.write_text(json.dumps({"type": "FasterRCNN"}))
    assert cli([*args, "--task", "instance_segmentation"]) == 2
    assert ("spnas train: error: --task instance_segmentation needs model desc type 'MaskRCNN', but the description "
            "says 'FasterRCNN'") in capsys.readouterr().err


INSTANCE = __import__("pathlib").Path(__file__).resolve().parent.parent / "configs" / "demo-instance.yml"


@pytest.mark.slow
def test_spnas_run_of_the_instance_segmentation_example_through_all_five_phases(tiny_data, tmp_path):
    """configs/demo-instance.yml (a Mask R-CNN, searches ranked by segm_mAP), shrunk as the
    tiny runs are: every phase runs, every record holds mask metrics, the run's result and its
    control are Mask R-CNNs, and the run's quality is its first objective, segm_mAP: the control
    deltas, the phase controls and reignition's before/after choice are of mask AP."""
    import json

    from helpers import tiny_overrides

    from spnas.cli.main import main as cli
    argv = ["run", str(INSTANCE), "--workdir", str(tmp_path / "w"), "--quiet"]
    for o in tiny_overrides(tiny_data):
        argv += ["--set", o]
    assert cli(argv) == 0
    reports = json.loads((tmp_path / "w" / "output" / "reports.json").read_text())
    assert list(reports["phases"]) == ["fine_tune", "serial", "reignition", "parallel", "fully_train"]
    for name, phase in reports["phases"].items():
        for r in phase["records"]:
            if r.get("status", "ok") == "ok":
                assert "segm_mAP" in r["metrics"] and r["desc"]["type"] == "MaskRCNN", (name, r.get("id"))
    serial = [r for r in reports["phases"]["serial"]["records"] if r.get("parent") is not None]
    assert len(serial) == 2 and all(r["status"] == "ok" for r in serial)
    assert reports["best"]["desc"]["type"] == "MaskRCNN" and "segm_mAP" in reports["best"]["metrics"]
    ctrl = reports["control"]
    assert ctrl["quality"] == "segm_mAP" and "delta_mAP" not in ctrl
    assert ctrl["delta_segm_mAP"] == ctrl["searched"]["segm_mAP"] - ctrl["control"]["segm_mAP"]
    for entry in (ctrl["searched"], ctrl["control"]):  # box and mask figures, both
        assert all(isinstance(entry[k], float) for k in ("mAP", "AP50", "segm_mAP", "segm_AP50")), entry
    for name, ph in ctrl["phases"].items():
        assert ph["delta_segm_mAP"] == ph["searched"]["segm_mAP"] - ph["control"]["segm_mAP"], name
        assert set(ph["seed"]) == {"id", "segm_mAP"}, ph["seed"]
    (re_,) = reports["phases"]["reignition"]["records"]
    choice = re_["reignition"]
    assert choice["reason"].startswith("segm_mAP after reignition"), choice["reason"]
    kept = choice["after"] if choice["kept"] == "after" else choice["before"]
    assert re_["metrics"]["segm_mAP"] == kept["segm_mAP"]
    assert choice["kept"] == ("after" if choice["after"]["segm_mAP"] >= choice["before"]["segm_mAP"] else "before")


def test_a_mask_objective_needs_a_mask_rcnn(tmp_path):
    from spnas.config.loader import load_config
    from spnas.utils.errors import ConfigError
    with pytest.raises(ConfigError, match=r"serial.search_algorithm.objective_keys: 'segm_mAP' is a mask metric: it "
                                          r"needs model_desc type 'MaskRCNN' \(this step's model is a FasterRCNN"):
        load_config(INSTANCE, overrides=["fine_tune.model.model_desc.type=FasterRCNN",
                                         "serial.model.model_desc.type=FasterRCNN"])
    assert load_config(INSTANCE).step("serial").search["objective_keys"] == ("segm_mAP", "params")
