"""torchvision fasterrcnn_resnet50_fpn checkpoints convert by name and give the same detections."""
import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn

from spnas import ConversionError, build_detector, convert_torchvision

#: Both detectors resize their inputs to this (torchvision's default 800 px costs 6x the time, proves nothing more).
SIZE = {"min_size": 320, "max_size": 320}


@pytest.fixture(scope="module")
def tv_checkpoint(tmp_path_factory):
    """A randomly initialised torchvision detector (BN statistics randomised too, class scores
    spread so that detections survive the score threshold), saved to disk as a user would."""
    from helpers import randomize_norms
    torch.manual_seed(0)
    tv = randomize_norms(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SIZE), seed=1).eval()
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
        tv.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.0)
        for conv in tv.backbone.fpn.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.bias.normal_(0, 0.1)  # nonzero FPN biases: a dropped bias would show
    path = tmp_path_factory.mktemp("ckpt") / "fasterrcnn_resnet50_fpn_random.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


@pytest.mark.slow
def test_converted_checkpoint_gives_identical_detections(tv_checkpoint):
    tv, path = tv_checkpoint
    state = torch.load(path, map_location="cpu", weights_only=True)
    ours = build_detector(SIZE)
    ours.load_state_dict(convert_torchvision(state), strict=True)
    ours.eval()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 300, 200, generator=g)]
    with torch.no_grad():
        ref, got = tv(images), ours(images)
    for r, o in zip(ref, got, strict=False):
        assert r["boxes"].shape[0] > 10, "test is vacuous: too few detections"
        assert torch.equal(r["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], r["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(o["scores"], r["scores"], atol=1e-5, rtol=0)


def test_frozen_bn_checkpoint_without_num_batches_tracked(tv_checkpoint):
    tv, _ = tv_checkpoint
    state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    converted = convert_torchvision({"model": state})
    assert len(converted) == len(tv.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in state.items())


@pytest.mark.slow
def test_frozen_bn_model_loads_both_checkpoint_kinds_strictly(tv_checkpoint):
    """Under norm frozen_bn the last BN of each residual branch has trainable weights but the same
    tensor names: a FrozenBatchNorm2d checkpoint (no num_batches_tracked) converts and loads
    strictly, a BatchNorm2d one loads through load_weights, and the features are torchvision's."""
    from spnas.models.backbone import FrozenStatsBatchNorm2d
    from spnas.models.checkpoint import load_weights
    tv, _ = tv_checkpoint
    desc = {**SIZE, "backbone": {"norm": "frozen_bn"}}
    frozen_state = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = build_detector(desc)
    assert sum(isinstance(m, FrozenStatsBatchNorm2d) for m in ours.modules()) == 16  # bn3 of 3+4+6+3 blocks
    ours.load_state_dict(convert_torchvision(frozen_state, desc), strict=True)
    x = torch.rand(1, 3, 128, 160, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got = tv.backbone(x), ours.eval().backbone(x)
    for k in ref:
        # FrozenBatchNorm2d's arithmetic (x * scale + shift) rounds differently from BatchNorm2d's
        torch.testing.assert_close(got[k], ref[k], atol=1e-3, rtol=1e-3)
    again = build_detector(desc)
    assert load_weights(again, desc, tv.state_dict()) == {"loaded": len(again.state_dict()), "fresh": 0}
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in again.state_dict().items())


def test_class_count_follows_the_checkpoint(tv_checkpoint):
    tv, _ = tv_checkpoint
    state = dict(tv.state_dict())
    for k in ("cls_score", "bbox_pred"):
        w, b = state[f"roi_heads.box_predictor.{k}.weight"], state[f"roi_heads.box_predictor.{k}.bias"]
        n = 4 if k == "cls_score" else 16
        state[f"roi_heads.box_predictor.{k}.weight"], state[f"roi_heads.box_predictor.{k}.bias"] = w[:n], b[:n]
    model = build_detector({"num_classes": 4})
    model.load_state_dict(convert_torchvision(state), strict=True)


def test_misfits_are_listed(tv_checkpoint):
    tv, _ = tv_checkpoint
    state = dict(tv.state_dict())
    del state["backbone.fpn.inner_blocks.2.0.bias"]
    state["backbone.fpn.extra.weight"] = torch.zeros(1)
    state["rpn.head.cls_logits.weight"] = torch.zeros(5, 256, 1, 1)
    with pytest.raises(ConversionError) as info:
        convert_torchvision(state)
    msg = str(info.value)
    assert "1 missing from the checkpoint: ['backbone.fpn.inner_blocks.2.0.bias']" in msg
    assert "1 not in the model: ['backbone.fpn.extra.weight']" in msg
    assert "rpn.head.cls_logits.weight: checkpoint (5, 256, 1, 1) vs model (3, 256, 1, 1)" in msg


def test_not_a_detector_checkpoint():
    with pytest.raises(ConversionError, match="not a torchvision Faster R-CNN"):
        convert_torchvision({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ConversionError, match="not a state dict"):
        convert_torchvision([1, 2])
    with pytest.raises(ConversionError, match="not tensors"):
        convert_torchvision({"a": 1})
