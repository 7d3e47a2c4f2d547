"""Semantic segmentation (#16): the ``SemanticFPN`` model on the searched backbone, label maps
(PNG or painted from instance masks) and their validation, mIoU metrics, training, the
morphisms' guarantees and ``spnas run`` of configs/demo-semantic.yml."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import demo, randomize_norms
from PIL import Image

from spnas import build_detector, inherit_weights, normalize_desc
from spnas.data.coco import load_split
from spnas.models.checkpoint import load_weights
from spnas.models.semantic import IGNORE_INDEX, SemanticFPN
from spnas.training.evaluation import confusion_matrix, evaluate, semantic_metrics
from spnas.utils.errors import ConfigError, DataError, DescError

SEMANTIC = Path(__file__).resolve().parent.parent / "configs" / "demo-semantic.yml"


def _desc(code="11-21-21-21", parallel=None, **kw):
    return {"type": "SemanticFPN", "num_classes": 4, "min_size": 96, "max_size": 96, "head_channels": 16,
            "backbone": {"code": code, "block": "basic", "base_channels": 8},
            "neck": {"code": parallel, "out_channels": 32}, **kw}


@pytest.fixture(scope="module")
def sem_data(tmp_path_factory):
    """24 train + 8 val demo scenes of 96 px, with label maps."""
    return demo(tmp_path_factory.mktemp("sem-data"), train=24, val=8, size=96)


def test_type_spellings_and_the_settings_that_apply():
    for spelling in ("SemanticFPN", "semanticfpn", "semantic_fpn"):
        assert normalize_desc({"type": spelling})["type"] == "SemanticFPN"
    d = normalize_desc(_desc())
    assert d["head_channels"] == 16 and d["min_size"] == 96 and "representation_size" not in d
    with pytest.raises(DescError, match=r"model desc key 'rpn_nms_thresh' is a detector setting; a SemanticFPN has "
                                        r"no RPN or RoI heads"):
        normalize_desc(_desc(rpn_nms_thresh=0.5))
    with pytest.raises(DescError, match=r"model desc key 'representation_size' does not apply to a SemanticFPN"):
        normalize_desc(_desc(representation_size=64))
    with pytest.raises(DescError, match=r"model desc key 'head_channels' does not apply to a FasterRCNN"):
        normalize_desc({"head_channels": 64})


def test_forward_contract_shapes_loss_and_ignore():
    torch.manual_seed(0)
    model = build_detector(_desc())
    assert isinstance(model, SemanticFPN)
    assert [len(b) for b in model.sem_head.branches] == [1, 1, 2, 3]  # level i: max(i, 1) conv blocks
    model.eval()
    with torch.no_grad():
        outs = model([torch.rand(3, 72, 120), torch.rand(3, 96, 96)])
    assert [tuple(o["sem_seg"].shape) for o in outs] == [(72, 120), (96, 96)]
    with torch.no_grad():
        logits, sizes = model.logits([torch.rand(3, 72, 120), torch.rand(3, 96, 96)])
    assert tuple(logits.shape) == (2, 4, 96, 96) and sizes == [(57, 96), (96, 96)]  # resized to fit 96, padded
    assert set(outs[0]) == {"sem_seg"} and all(o["sem_seg"].dtype == torch.int64 for o in outs)
    model.train()
    label = torch.randint(0, 4, (72, 120))
    loss = model([torch.rand(3, 72, 120)], [{"sem_seg": label}])
    assert set(loss) == {"loss_sem_seg"} and torch.isfinite(loss["loss_sem_seg"])
    assert abs(loss["loss_sem_seg"].item() - np.log(4)) < 0.5  # near-uniform class scores at the start
    blank = model([torch.rand(3, 72, 120)], [{"sem_seg": torch.full((72, 120), IGNORE_INDEX)}])["loss_sem_seg"]
    assert blank.item() == 0.0 and blank.requires_grad
    with pytest.raises(ValueError, match="needs targets"):
        model([torch.rand(3, 72, 120)])


@pytest.mark.parametrize("parent_code, child_code, child_parallel", [
    ("11-21-21-21", "111-21-211-21", None),      # expand: two identity blocks inserted
    ("11-21-21-21", "11-21-21-21", [0, 1, 0, 2]),  # parallel passes at zero
])
def test_expand_and_parallel_children_give_the_parents_label_maps(parent_code, child_code, child_parallel):
    pdesc, cdesc = _desc(parent_code), _desc(child_code, child_parallel)
    torch.manual_seed(0)
    parent = randomize_norms(build_detector(pdesc), 0).eval()
    with torch.no_grad():
        parent.sem_head.predictor.weight.normal_(0, 0.5)  # varied classes, so equal maps say something
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    assert not [k for k in report["fresh"] if k.startswith("sem_head.")]  # the head is inherited whole
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    child.eval()
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    with torch.no_grad():
        want, got = parent(images), child(images)
        assert torch.equal(parent.logits(images)[0], child.logits(images)[0])
    for a, b in zip(want, got, strict=True):
        assert len(a["sem_seg"].unique()) >= 3
        assert torch.equal(a["sem_seg"], b["sem_seg"])


def test_torchvision_resnet_weights_load_into_the_backbone(tmp_path):
    """A torchvision ResNet-50 classification checkpoint loads into the ResNet-50 code's
    SemanticFPN as into the detector: the backbone's stage outputs equal torchvision's."""
    torch.manual_seed(0)
    tv = randomize_norms(torchvision.models.resnet50(), 3).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(tv.state_dict(), path)
    desc = normalize_desc({"type": "SemanticFPN", "num_classes": 5})
    model = build_detector(desc).eval()
    got = load_weights(model, desc, path)
    assert got["loaded"] == len([k for k in tv.state_dict() if not k.startswith("fc.")])
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = model.backbone.body(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for layer, o in zip((tv.layer1, tv.layer2, tv.layer3, tv.layer4), ours, strict=True):
            y = layer(y)
            torch.testing.assert_close(o, y, atol=1e-5, rtol=0)


def test_label_maps_from_png_equal_maps_painted_from_the_instance_masks(sem_data, tmp_path):
    """The demo's PNG label maps hold each object's visible pixels: painting the annotations'
    masks gives the same labels, pixel for pixel, on every image; flips flip them too."""
    png = load_split(sem_data, "train", train=False, semantic=True)
    assert png.label_dir is not None
    nopng = tmp_path / "nopng"
    import shutil
    shutil.copytree(sem_data, nopng)
    shutil.rmtree(nopng / "annotations" / "semantic_train2017")
    painted = load_split(nopng, "train", train=False, semantic=True)
    assert painted.label_dir is None and len(painted) == len(png) == 24
    classes = set()
    for i in range(len(png)):
        a, b = png[i][1]["sem_seg"], painted[i][1]["sem_seg"]
        assert a.dtype == torch.int64 and a.shape == (96, 96) and torch.equal(a, b)
        classes |= set(a.unique().tolist())
    assert classes == {0, 1, 2, 3}
    flipping = load_split(sem_data, "train", train=True, semantic=True, seed=0)
    flips = 0
    for i in range(len(flipping)):
        img, t = flipping[i]
        plain_img, plain = png[i]
        if not torch.equal(img, plain_img):
            assert torch.equal(img, plain_img.flip(-1)) and torch.equal(t["sem_seg"], plain["sem_seg"].flip(-1))
            flips += 1
    assert 0 < flips < len(flipping)


def _write_png(path: Path, values: np.ndarray, mode: str | None = None) -> None:
    img = Image.fromarray(values) if mode is None else Image.fromarray(values).convert(mode)
    img.save(path)


def test_label_map_validation_names_the_file_and_value(sem_data, tmp_path):
    import shutil
    root = tmp_path / "bad"
    shutil.copytree(sem_data, root)
    folder = root / "annotations" / "semantic_val2017"
    first = sorted(folder.iterdir())[0]

    def first_map():
        ds = load_split(root, "val", train=False, semantic=True)
        return ds[0][1]["sem_seg"]

    good = np.asarray(Image.open(first))
    _write_png(first, np.where(good == 0, 7, good).astype(np.uint8))
    with pytest.raises(DataError, match=rf"label map '{first}' holds value\(s\) \[7\] that are neither 0 \(background\), "
                                        r"255 \(ignored\) nor a category id"):
        first_map()
    _write_png(first, good[:90])
    with pytest.raises(DataError, match=rf"label map '{first}' is 90 x 96 px, its image 96 x 96"):
        first_map()
    _write_png(first, np.stack([good] * 3, -1))
    with pytest.raises(DataError, match=rf"label map '{first}' has PNG mode 'RGB'"):
        first_map()
    _write_png(first, good.astype(np.uint16) * 2)  # 16-bit maps read too (ids doubled: 4 and 6 unknown)
    unknown = sorted({2 * int(v) for v in np.unique(good)} - {0, 1, 2, 3})
    assert Image.open(first).mode == "I;16" and unknown
    with pytest.raises(DataError, match=rf"value\(s\) {re.escape(str(unknown))} that"):
        first_map()
    ignored = good.copy()
    ignored[:10] = 255
    _write_png(first, ignored)
    assert (first_map()[:10] == IGNORE_INDEX).all()
    first.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"label map '{first}' cannot be decoded"):
        first_map()
    first.unlink()
    with pytest.raises(DataError, match=r"1 label map\(s\) of the images in .* are missing from .*semantic_val2017.*"
                                        + first.name):
        first_map()
    ann = root / "annotations" / "instances_val2017.json"
    raw = json.loads(ann.read_text())
    raw["categories"][0]["id"] = 255
    for a in raw["annotations"]:
        a["category_id"] = 255 if a["category_id"] == 1 else a["category_id"]
    ann.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"category id\(s\) \[255\] cannot be told apart in a semantic label map"):
        first_map()


def test_semantic_metrics_exact_values():
    conf = torch.tensor([[50, 10, 0], [5, 30, 0], [0, 0, 0]])  # class 2 absent everywhere
    m = semantic_metrics(conf, ["background", "a", "b"])
    assert m["IoU_per_class"] == {"background": 50 / 65 * 100, "a": 30 / 45 * 100, "b": None}
    assert m["mIoU"] == pytest.approx((50 / 65 + 30 / 45) / 2 * 100)
    assert m["pixel_acc"] == pytest.approx(80 / 95 * 100) and m["mAcc"] == pytest.approx((50 / 60 + 30 / 35) / 2 * 100)
    predicted_only = semantic_metrics(torch.tensor([[5, 5], [0, 0]]))  # class 1 predicted, never true: IoU 0 counts
    assert predicted_only["IoU_per_class"] == {"0": 50.0, "1": 0.0} and predicted_only["mIoU"] == 25.0
    assert semantic_metrics(torch.zeros(2, 2, dtype=torch.int64))["mIoU"] == 0.0


class _Constant(SemanticFPN):
    """Predicts background everywhere (the constant predictor the learned model must beat)."""

    def forward(self, images, targets=None):
        return [{"sem_seg": torch.zeros(im.shape[-2:], dtype=torch.int64)} for im in images]


def test_evaluation_of_a_perfect_and_a_constant_predictor(sem_data):
    ds = load_split(sem_data, "val", train=False, semantic=True)
    const = _Constant(build_detector(_desc()).backbone, 4)
    m = evaluate(const, ds, batch_size=3)
    truth = torch.cat([ds[i][1]["sem_seg"].reshape(-1) for i in range(len(ds))])
    background = (truth == 0).double().mean().item() * 100
    assert m["pixel_acc"] == pytest.approx(background) and m["IoU_per_class"]["background"] == pytest.approx(background)
    assert m["mIoU"] == pytest.approx(background / 4)  # 3 classes present in the truth, IoU 0 each

    class Perfect(SemanticFPN):
        def forward(self, images, targets=None):
            return [{"sem_seg": ds[i][1]["sem_seg"]} for i in self._next(len(images))]

        def _next(self, n):
            start = getattr(self, "_at", 0)
            self._at = start + n
            return range(start, start + n)
    perfect = Perfect(build_detector(_desc()).backbone, 4)
    conf = confusion_matrix(perfect, ds, batch_size=3)
    assert int(conf.sum()) == truth.numel() and int(conf.diag().sum()) == truth.numel()
    assert semantic_metrics(conf)["mIoU"] == 100.0


def test_spnas_train_task_semantic_segmentation_learns(tmp_path, capsys):
    """``spnas train --task semantic_segmentation`` on demo data (48 + 12 scenes of 128 px)
    writes performance_0.json with mIoU, clearly above the constant (all-background) predictor's
    (75.05 against 22 when measured on 2026-12-04)."""
    from spnas.cli.main import main as cli
    sem_data = demo(tmp_path / "data", train=48, val=12, size=128)
    out = tmp_path / "sem"
    args = ["train", "--data", str(sem_data), "--desc", str(Path(__file__).resolve().parent.parent / "configs" /
                                                             "demo-model.json"),
            "--task", "semantic_segmentation", "--out", str(out), "--epochs", "6", "--lr", "0.08",
            "--min-size", "128", "--max-size", "128"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert "detector setting(s) box_batch_size_per_image, representation_size, rpn_batch_size_per_image" in captured.err
    perf = json.loads((out / "performance_0.json").read_text())
    desc = json.loads((out / "desc_0.json").read_text())
    assert desc["type"] == "SemanticFPN" and desc["num_classes"] == 4
    ds = load_split(sem_data, "val", train=False, semantic=True)
    truth = torch.cat([ds[i][1]["sem_seg"].reshape(-1) for i in range(len(ds))])
    constant = (truth == 0).double().mean().item() * 100 / 4
    assert perf["mIoU"] > constant + 30, (perf["mIoU"], constant)
    assert set(perf["IoU_per_class"]) == {"background", "circle", "square", "triangle"}
    assert "mAP" not in perf and perf["iters"] == 72
    assert f"mIoU {perf['mIoU']:.2f}" in captured.out


def test_objectives_follow_the_model_type(tmp_path):
    from spnas.config.loader import load_config
    cfg = load_config(SEMANTIC)
    assert cfg.step("serial").search["objective_keys"] == ("mIoU", "params")
    assert cfg.step("parallel").search["objective_keys"] == ("mIoU", "gflops")
    with pytest.raises(ConfigError, match=r"serial.search_algorithm.objective_keys: 'mAP' is a detection metric; a "
                                          r"SemanticFPN is measured by 'mIoU'"):
        load_config(SEMANTIC, overrides=["serial.search_algorithm.objective_keys=[mAP,params]"])
    with pytest.raises(ConfigError, match=r"'mIoU' is a semantic-segmentation metric: it needs model_desc type "
                                          r"'SemanticFPN' \(this step's model is a FasterRCNN\)"):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yml",
                    overrides=["serial.search_algorithm.objective_keys=[mIoU,params]"])
    # no objective_keys on a semantic step: the algorithm's defaults with mIoU for mAP
    default = load_config(SEMANTIC, overrides=["parallel.search_algorithm.objective_keys=null"])
    assert default.step("parallel").search["objective_keys"] == ("mIoU", "gflops")


@pytest.mark.slow
def test_spnas_run_of_the_semantic_example_through_all_five_phases(tiny_data, tmp_path):
    """configs/demo-semantic.yml shrunk as the tiny runs are: every phase runs, every record
    holds mIoU (no box metrics), the controls and the report compare by mIoU."""
    from helpers import tiny_overrides

    from spnas.cli.main import main as cli
    argv = ["run", str(SEMANTIC), "--workdir", str(tmp_path / "w"), "--quiet"]
    for o in tiny_overrides(tiny_data):
        argv += ["--set", o]
    assert cli(argv) == 0
    out = tmp_path / "w" / "output"
    reports = json.loads((out / "reports.json").read_text())
    assert list(reports["phases"]) == ["fine_tune", "serial", "reignition", "parallel", "fully_train"]
    for name, phase in reports["phases"].items():
        for r in phase["records"]:
            if r.get("status", "ok") == "ok":
                assert r["desc"]["type"] == "SemanticFPN", (name, r.get("id"))
                assert r["metrics"]["mIoU"] is not None and "mAP" not in r["metrics"], (name, r.get("id"))
    serial = [r for r in reports["phases"]["serial"]["records"] if r.get("parent") is not None]
    assert len(serial) == 2 and all(r["status"] == "ok" for r in serial)
    control = json.loads((out / "control.json").read_text())
    assert control["quality"] == "mIoU" and "delta_mAP" not in control
    assert control["delta_mIoU"] == pytest.approx(control["searched"]["mIoU"] - control["control"]["mIoU"])
    assert set(control["searched"]) >= {"mIoU", "pixel_acc"} and "mAP" not in control["searched"]
    for name in ("serial", "parallel"):
        assert (out / name / "pareto.png").stat().st_size > 10_000
        assert "delta_mIoU" in control["phases"][name]
    state = json.loads((out / "serial" / "state.json").read_text())
    assert state["settings"]["objective_keys"] == ["mIoU", "params"]
    rec = reignited = reports["phases"]["reignition"]["records"][0]
    assert "mIoU" in reignited["reignition"]["reason"], rec
