"""Reignition that keeps the detector working: the classifier sees the detector's normalisation,
BN statistics are recalibrated on detection data (and nothing else changes), the better of
before/after is kept, and data set file prefixes are honoured (CPU)."""
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import demo, make_step

from spnas.data.classification import IMAGENET_MEAN, IMAGENET_STD, crops_from_detection, folder_dataset
from spnas.data.source import CocoSource
from spnas.models.checkpoint import load_checkpoint
from spnas.models.detector import build_detector
from spnas.orchestration import phases
from spnas.training.adapt import batch_norms, finetune_heads, recalibrate_bn
from spnas.training.schedule import ReignitionSettings
from spnas.utils.errors import DataError

#: The demo model at 96 px with 8 stem channels: trains in seconds on a CPU.
TINY = {"backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8}, "neck": {"out_channels": 32},
        "min_size": 96, "max_size": 96, "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150,
        "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64,
        "rpn_batch_size_per_image": 64, "num_classes": 4}
STATS = ("running_mean", "running_var", "num_batches_tracked")


def _is_bn_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in STATS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 training and 16 validation demo scenes of 96 px."""
    return demo(tmp_path_factory.mktemp("re-data"), train=64, val=16, size=96)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny demo model trained for 3 epochs (48 iterations): ``(record, mAP)``."""
    from spnas.training.architecture import train_architecture
    from spnas.training.schedule import TrainConfig
    out = tmp_path_factory.mktemp("re-model")
    perf = train_architecture(TINY, CocoSource(str(data)), out, TrainConfig(epochs=3, batch_size=4, lr=0.02,
                                                                            warmup_iters=10, eval_every=0))
    desc = json.loads((out / "desc_0.json").read_text())
    return {"id": 0, "desc": desc, "weights": str(out / "model_0.pth")}, perf["mAP"]


def _step(**settings):
    """The demo's reignition step (1 epoch, lr 0.01, detection batch 4), with ``settings`` replaced."""
    return dataclasses.replace(make_step("reignition", epochs=1, lr=0.01, batch_size=4), **settings)


@pytest.mark.slow
def test_reignition_with_recalibration_keeps_90_percent_of_the_map(trained, data, tmp_path, caplog):
    """The "after" mAP itself (not the kept one) is at least 90 % of before. Measured on this
    machine: 18.3 before, 18.4 after, and 0.98-1.01 x before over 8 seeds of the reignition; without
    the head fit and frozen BN statistics 0.72-0.96 x, without any of this change 0.1 x."""
    record, trained_map = trained
    assert trained_map > 5  # the model detects something: a ratio of two zeros would prove nothing
    with caplog.at_level(logging.INFO, logger="spnas.orchestration.phases"):
        [rec] = phases.reignition([record], _step(), tmp_path, detection=CocoSource(str(data)), seed=0)
    re_ = rec["reignition"]
    assert re_["before"]["mAP"] == trained_map  # before is measured as training measured it
    assert re_["after"]["mAP"] >= 0.9 * re_["before"]["mAP"], re_
    assert re_["recalibrated"] == 64 and re_["image_size"] == 64 and re_["top1_train"] > 80
    assert re_["kept"] == ("after" if re_["after"]["mAP"] >= re_["before"]["mAP"] else "before")
    assert rec["metrics"]["mAP"] == re_[re_["kept"]]["mAP"] and rec["weights"] == str(tmp_path / "model_0.pth")
    assert f"reignition of 0: kept the model {re_['kept']} reignition" in caplog.text


@pytest.mark.slow
def test_a_worse_after_keeps_before_with_its_weights_and_says_why(trained, data, tmp_path, caplog, monkeypatch):
    """Sabotage the reignition (its backbone zeroed after training): the record keeps "before",
    model_<id>.pth holds the input weights byte for byte, the re-trained ones are kept aside."""
    record, trained_map = trained
    real = phases.reignite

    def sabotaged(desc, weights, out, *args, **kw):
        perf = real(desc, weights, out, *args, **kw)
        path = Path(out) / f"model_{kw['arch_id']}.pth"
        state = load_checkpoint(path)
        torch.save({k: (v * 0 if k.startswith("backbone.body.") and v.is_floating_point() else v)
                    for k, v in state.items()}, path)
        return perf
    monkeypatch.setattr(phases, "reignite", sabotaged)
    with caplog.at_level(logging.INFO, logger="spnas.orchestration.phases"):
        [rec] = phases.reignition([record], _step(recalibrate_images=8), tmp_path, detection=CocoSource(str(data)),
                                  seed=0)
    re_ = rec["reignition"]
    assert re_["kept"] == "before" and re_["after"]["mAP"] < re_["before"]["mAP"] == trained_map
    assert rec["metrics"]["mAP"] == trained_map
    assert (tmp_path / "model_0.pth").read_bytes() == Path(record["weights"]).read_bytes()
    assert (tmp_path / "reignited_0.pth").is_file()
    why = f"mAP after reignition {re_['after']['mAP']:.2f} < {trained_map:.2f} before"
    assert f"reignition of 0: kept the model before reignition: {why}" in caplog.text
    assert re_["reason"].startswith(why)
    perf = json.loads((tmp_path / "performance_0.json").read_text())
    assert perf["kept"] == "before" and perf["mAP"] == trained_map


def test_classifier_inputs_have_the_detector_normalisation(data, tmp_path):
    """Crops and folder images equal the detector transform's own normalize() of the raw
    [0, 1] images, for a description with its own image_mean/image_std."""
    desc = {**TINY, "image_mean": [0.2, 0.4, 0.6], "image_std": [0.5, 0.25, 0.125]}
    det = build_detector(desc)
    mean, std = det.transform.image_mean, det.transform.image_std
    assert list(mean) == [0.2, 0.4, 0.6] and list(std) == [0.5, 0.25, 0.125]
    src = CocoSource(str(data))
    crops, _ = crops_from_detection(src, 32, mean=mean, std=std)
    raw, _ = crops_from_detection(src, 32, mean=(0, 0, 0), std=(1, 1, 1))
    assert raw.tensors[0].min() >= 0 and raw.tensors[0].max() <= 1 and len(crops) == len(raw) > 100
    for i in (0, len(raw) // 2, len(raw) - 1):
        assert torch.equal(crops[i][0], det.transform.normalize(raw[i][0]))
    from PIL import Image
    for c, colour in enumerate([(250, 10, 10), (10, 10, 250)]):
        (tmp_path / f"c{c}").mkdir()
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"c{c}" / "0.png")
    folder, classes = folder_dataset(tmp_path, 24, mean=mean, std=std)
    plain, _ = folder_dataset(tmp_path, 24, mean=(0, 0, 0), std=(1, 1, 1))
    assert classes == ["c0", "c1"] and folder[0][0].shape == (3, 24, 24)
    for i in range(2):
        assert torch.equal(folder[i][0], det.transform.normalize(plain[i][0]))
    # the default detector normalises with torchvision's ImageNet values, and so does the classifier
    assert tuple(build_detector(TINY).transform.image_mean) == IMAGENET_MEAN
    assert tuple(build_detector(TINY).transform.image_std) == IMAGENET_STD


def test_reignite_hands_the_detector_normalisation_and_the_default_sizes(data, tmp_path, monkeypatch):
    """reignite builds its data with the detector's mean/std, at 64 px for object crops and 224 px
    for a folder unless image_size is set."""
    import spnas.training.reignite as R
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kw):
        seen.append((args[1], tuple(kw["mean"]), tuple(kw["std"])))
        raise Stop
    monkeypatch.setattr(R, "crops_from_detection", spy)
    monkeypatch.setattr(R, "folder_dataset", spy)
    desc = {**TINY, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1]}
    torch.save(build_detector(desc).state_dict(), tmp_path / "w.pth")
    for kw, size in (({"detection": CocoSource(str(data))}, 64), ({"folder": tmp_path}, 224),
                     ({"folder": tmp_path, "settings": ReignitionSettings(image_size=96)}, 96)):
        settings = kw.pop("settings", ReignitionSettings())
        with pytest.raises(Stop):
            R.reignite(desc, tmp_path / "w.pth", tmp_path / "o", settings, **kw)
        assert seen.pop() == (size, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1))


def test_recalibration_changes_bn_statistics_and_nothing_else(data, rand_norms):
    """Running mean/var are re-estimated (a cumulative average over the batches of the
    detector's own transform); every weight and every other buffer is equal; eval mode and
    momentum come back; the same seed gives the same statistics."""
    torch.manual_seed(0)
    det = rand_norms(build_detector(TINY))
    before = {k: v.clone() for k, v in det.state_dict().items()}
    ds = CocoSource(str(data)).load("train", train=False)
    assert recalibrate_bn(det, ds, 8, seed=3, batch_size=4) == 8
    after = det.state_dict()
    norms = batch_norms(det)
    assert len(norms) == sum(k.endswith("running_mean") for k in after) > 10
    for k, v in after.items():
        if _is_bn_stat(k):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k
    assert all(int(m.num_batches_tracked) == 2 and m.momentum == 0.1 for m in norms)
    assert not det.training and not any(m.training for m in det.modules())
    # the stem BN's mean is the mean of conv1's output over the two batches of 4 (cumulative average)
    from spnas.training.adapt import sample_indices
    chosen = sample_indices(len(ds), 8, 3)
    with torch.no_grad():
        means = [det.backbone.body.conv1(det.transform([ds[i][0] for i in chosen[j:j + 4]])[0].tensors).mean((0, 2, 3))
                 for j in (0, 4)]
    assert torch.allclose(det.backbone.body.bn1.running_mean, (means[0] + means[1]) / 2, atol=1e-6)
    again = rand_norms(build_detector(TINY))
    again.load_state_dict(before)
    recalibrate_bn(again, ds, 8, seed=3, batch_size=4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())
    assert recalibrate_bn(again, ds, 0) == 0  # 0 images: off


def test_head_fine_tune_trains_only_outside_the_backbone_body(data, rand_norms):
    """head_iters through the training engine: exactly that many iterations; the serial
    backbone's weights and every BatchNorm statistic stay equal; FPN and heads change; the model
    ends in eval mode; 0 iterations is off."""
    torch.manual_seed(0)
    det = rand_norms(build_detector(TINY))
    before = {k: v.clone() for k, v in det.state_dict().items()}
    ds = CocoSource(str(data)).load("train", train=True, seed=0)
    assert finetune_heads(det, ds, 3, 0.01, seed=0, batch_size=4) == 3
    after = det.state_dict()
    for k, v in after.items():
        if k.startswith("backbone.body.") or _is_bn_stat(k):
            assert torch.equal(v, before[k]), k
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert any(k.startswith("backbone.fpn.") for k in changed) and any(k.startswith("roi_heads.") for k in changed)
    assert any(k.startswith("rpn.") for k in changed)
    assert not det.training
    assert finetune_heads(det, ds, 0, 0.01) == 0


def test_reignition_honours_the_data_set_file_prefixes(data, tmp_path):
    """A data set named objs_<split>xyz.json / <split>xyz/: crops, recalibration and both
    evaluations read it through the CocoSource's prefixes."""
    root = tmp_path / "prefixed"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(data / f"{split}2017", root / f"{split}xyz")
        ann = json.loads((data / "annotations" / f"instances_{split}2017.json").read_text())
        ann["images"] = ann["images"][:8]
        keep = {im["id"] for im in ann["images"]}
        ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] in keep]
        (root / "annotations" / f"objs_{split}xyz.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match="train2017' does not exist"):  # the default prefixes find nothing
        CocoSource(str(root)).load("train", train=False)
    n_boxes = len(json.loads((root / "annotations" / "objs_trainxyz.json").read_text())["annotations"])
    torch.manual_seed(0)
    torch.save(build_detector(TINY).state_dict(), tmp_path / "w.pth")
    record = {"id": 5, "desc": TINY, "weights": str(tmp_path / "w.pth")}
    [rec] = phases.reignition([record], _step(recalibrate_images=6), tmp_path / "out",
                              detection=CocoSource(str(root), "xyz", "objs"), seed=0)
    re_ = rec["reignition"]
    assert re_["images"] == n_boxes and re_["recalibrated"] == 6 and re_["source"] == f"object crops of {root}"
    assert re_["before"]["mAP"] is not None and re_["after"]["mAP"] is not None


def test_the_classifier_gradient_is_clipped_by_default_so_a_sharp_head_does_not_diverge(trained, data, tmp_path):
    """The fitted head is sharp, so the classifier's gradients reach the backbone amplified: at
    lr 2.0 the unclipped run's loss is NaN within a few steps (the hard demo scenes diverged so at
    the demo's lr 0.01), the default clip (2.0) trains to a finite loss."""
    from spnas.training.reignite import reignite
    from spnas.utils.errors import NonFiniteLossError
    record, _ = trained
    assert ReignitionSettings().clip_grad_norm == 2.0
    settings = ReignitionSettings(epochs=1, batch_size=32, lr=2.0, recalibrate_images=0)
    with pytest.raises(NonFiniteLossError, match="non-finite reignition loss at step"):
        reignite(record["desc"], record["weights"], tmp_path / "free", dataclasses.replace(settings, clip_grad_norm=None),
                 detection=CocoSource(str(data)))
    perf = reignite(record["desc"], record["weights"], tmp_path / "clipped", settings, detection=CocoSource(str(data)))
    assert perf["top1_train"] > 1 / 3 * 100 and (tmp_path / "clipped" / "model_0.pth").is_file()


def test_a_diverged_reignition_keeps_the_model_as_it_came_and_says_why(trained, data, tmp_path, caplog, monkeypatch):
    """A reignition whose classifier diverges does not end the run: the record keeps "before"
    (weights byte for byte, mAP as measured), says why, and the lineage is unchanged."""
    from spnas.utils.errors import NonFiniteLossError
    record, trained_map = trained

    def diverges(*args, **kw):
        raise NonFiniteLossError("non-finite reignition loss at step 12: nan")
    monkeypatch.setattr(phases, "reignite", diverges)
    with caplog.at_level(logging.WARNING, logger="spnas.orchestration.phases"):
        [rec] = phases.reignition([{**record, "lineage_iters": 120}], _step(), tmp_path, detection=CocoSource(str(data)),
                                  seed=0)
    re_ = rec["reignition"]
    assert re_["kept"] == "before" and re_["after"] is None and re_["before"]["mAP"] == trained_map
    assert re_["reason"] == ("reignition diverged (non-finite reignition loss at step 12: nan); the model is kept as "
                             "it was")
    assert rec["status"] == "ok" and rec["metrics"]["mAP"] == trained_map and rec["lineage_iters"] == 120
    assert (tmp_path / "model_0.pth").read_bytes() == Path(record["weights"]).read_bytes()
    perf = json.loads((tmp_path / "performance_0.json").read_text())
    assert perf["kept"] == "before" and perf["mAP"] == trained_map and perf["error"].startswith("non-finite")
    assert "reignition of 0 diverged (non-finite reignition loss at step 12: nan)" in caplog.text
