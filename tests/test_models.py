"""The model layer against torchvision: naming, shapes, outputs, parameter and FLOP counts."""
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import fasterrcnn_resnet50_fpn

import spnas
from spnas import build_detector, convert_resnet, normalize_desc
from spnas.models.backbone import SerialBackbone
from spnas.models.cost import count_params
from spnas.models.detector import build_backbone, build_classifier
from spnas.utils.errors import DescError

R50 = "111-2111-211111-211"


def _torchvision_stages(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    outs = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        x = layer(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("builder, code, block", [
    (torchvision.models.resnet50, R50, "bottleneck"),
    (torchvision.models.resnet18, "11-21-21-21", "basic"),
    (torchvision.models.resnext50_32x4d, R50, "resnext"),
])
def test_torchvision_classification_weights_load_strictly(builder, code, block, rand_norms):
    torch.manual_seed(0)
    tv = rand_norms(builder()).eval()
    ours = SerialBackbone(code, block).eval()
    result = ours.load_state_dict(convert_resnet(tv.state_dict(), {"backbone": {"code": code, "block": block}}),
                                  strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref, got = _torchvision_stages(tv, x), ours(x)
    assert [t.shape for t in got] == [t.shape for t in ref]
    assert [tuple(t.shape) for t in got][0] == (2, 256 if block != "basic" else 64, 24, 32)
    for a, b in zip(got, ref, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    n_tv = sum(p.numel() for n, p in tv.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in ours.parameters()) == n_tv


def test_resnet50_backbone_exact_parameter_count():
    assert sum(p.numel() for p in SerialBackbone(R50).parameters()) == 23_508_032
    assert spnas.params({})["backbone"] == 23_508_032


def test_default_detector_matches_torchvision_layout():
    ours = build_detector({}).state_dict()
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    assert list(ours) == list(tv)
    assert all(ours[k].shape == tv[k].shape for k in ours)
    assert spnas.params({})["total"] == sum(v.numel() for k, v in tv.items()
                                             if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def test_gflops_equal_flop_counter_on_torchvision_backbone():
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tv(torch.randn(1, 3, 224, 224))
    assert spnas.gflops({}, size=224) == pytest.approx(counter.get_total_flops() / 1e9, rel=0, abs=1e-9)
    assert spnas.gflops({"neck": {"code": [1, 0, 0, 0]}}, size=224) > spnas.gflops({}, size=224)


@pytest.mark.parametrize("code, block, parallel, stage_ch, strides", [
    ("1-2-2-2", "basic", [0, 0, 0, 0], [16, 32, 64, 128], [4, 8, 16, 32]),
    ("12-1-21-2-1", "bottleneck", [1, 0, 2, 0, 1], [128, 128, 256, 512, 512], [4, 8, 16, 32, 64]),
    ("11-21-1", "resnext", [0, 3, 1], [64, 128, 128], [4, 8, 16]),
])
def test_stage_shapes_and_fpn_levels(code, block, parallel, stage_ch, strides):
    base = 16
    desc = {"backbone": {"code": code, "block": block, "base_channels": base}, "neck": {"code": parallel}}
    bb = build_backbone(desc).eval()
    assert bb.body.stage_channels == stage_ch
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        feats = bb.stage_features(x)
        fpn = bb(x)
    assert [tuple(f.shape) for f in feats.values()] == [(1, c, 256 // s, 256 // s) for c, s in zip(stage_ch, strides, strict=False)]
    assert list(fpn) == [str(i) for i in range(len(stage_ch))] + ["pool"]
    assert all(f.shape[1] == 256 for f in fpn.values())
    assert [len(c) for c in bb.connections] == parallel


def test_parallel_passes_share_stage_weights():
    plain = build_backbone({"backbone": {"code": "1-2-2-2", "base_channels": 8}})
    par = build_backbone({"backbone": {"code": "1-2-2-2", "base_channels": 8}, "neck": {"code": [2, 1, 0, 3]}})
    n_plain = sum(p.numel() for p in plain.parameters())
    n_conn = sum(p.numel() for p in par.connections.parameters())
    assert sum(p.numel() for p in par.parameters()) == n_plain + n_conn
    # 1x1 conv out->in + BN(in): stage 0: 32->8, stage 1: 64->32, stage 3: 256->128
    assert n_conn == 2 * (32 * 8 + 16) + (64 * 32 + 64) + 3 * (256 * 128 + 256)
    for conns in par.connections:
        for c in conns:
            assert torch.count_nonzero(c[1].weight) == 0 and torch.count_nonzero(c[1].bias) == 0


def test_detector_runs_train_and_eval_with_five_stages():
    model = build_detector({"num_classes": 4, "backbone": {"code": "1-2-2-2-2", "block": "basic",
                                                           "base_channels": 8},
                            "neck": {"code": [0, 1, 0, 0, 1]}, "min_size": 128, "max_size": 128})
    assert model.transform.min_size == (128,)
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,), (1024,))
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3", "4"]
    images = [torch.rand(3, 128, 128), torch.rand(3, 100, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 20.0, 50.0, 90.0], [60, 10, 110, 50.0]]), "labels": torch.tensor([2, 3])}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}


def test_classifier_wrapper():
    clf = build_classifier({"backbone": {"code": "11-21-21-21", "block": "basic", "base_channels": 8}}, 10)
    assert tuple(clf(torch.randn(3, 3, 64, 64)).shape) == (3, 10)
    assert clf.fc.in_features == 64
    assert all(k.startswith(("body.", "fc.")) for k in clf.state_dict())


def test_normalize_desc_defaults_and_spellings():
    d = normalize_desc({})
    assert d == {"type": "FasterRCNN", "num_classes": 91,
                 "backbone": {"type": "SerialBackbone", "code": R50, "block": "bottleneck",
                              "base_channels": 64, "norm": "bn"},
                 "neck": {"type": "ParallelFPN", "code": [0, 0, 0, 0], "out_channels": 256}}
    v = normalize_desc({"backbone": {"type": "SerialBackbone", "block": "BasicBlock", "code": "11-21-21-21"},
                        "neck": {"type": "ParallelFPN", "code": [0, 1, 0, 0]}, "convert_pretrained": True,
                        "num_classes": 3.0, "min_size": 320})
    assert v["backbone"]["block"] == "basic" and v["num_classes"] == 3 and v["min_size"] == 320
    assert v["convert_pretrained"] is True
    a = normalize_desc({"backbone": {"code": "x_11-21-21-21_0-1-0-2"}})
    assert (a["backbone"]["block"], a["backbone"]["code"], a["neck"]["code"]) == ("resnext", "11-21-21-21", [0, 1, 0, 2])
    assert spnas.arch_string(a) == "x_11-21-21-21_0-1-0-2"


@pytest.mark.parametrize("desc, message", [
    ({"type": "RetinaNet"}, "type 'RetinaNet' is not supported"),
    ({"backbone": {"type": "ResNet"}}, "backbone.type 'ResNet' is not supported"),
    ({"neck": {"type": "BiFPN"}}, "neck.type 'BiFPN' is not supported"),
    ({"backbone": {"depth": 50}}, "backbone has unknown key\\(s\\) \\['depth'\\]"),
    ({"neck": {"code": [0, 0, 0, 0], "levels": 5}}, "neck has unknown key\\(s\\) \\['levels'\\]"),
    ({"min_sise": 300}, "unknown key\\(s\\) \\['min_sise'\\]"),
    ({"num_classes": 1}, "model desc num_classes: must be an integer >= 2, got 1"),
    ({"backbone": {"base_channels": "64"}}, "model desc backbone.base_channels: must be an integer >= 1, got '64'"),
    ({"backbone": {"norm": "gn"}}, "backbone.norm: must be one of bn, frozen_bn, syncbn, got 'gn'"),
    ({"backbone": {"block": "resnext", "base_channels": 8}}, "multiple of 16 for resnext"),
    ({"rpn_head": None}, "'rpn_head' is derived from the architecture"),
    ({"backbone": {"code": "r_11-21_0-0", "block": "basic"}}, "contradicts the code"),
    ({"neck": {"code": [0, 0]}}, "has 2 entries but the serial code has 4 stages"),
])
def test_bad_descriptions_name_the_key(desc, message):
    with pytest.raises(ValueError, match=message):
        build_detector(desc)


def test_detector_keywords_are_torchvisions_own():
    """The torch-free description module lists FasterRCNN's keyword arguments by hand; they must
    stay exactly torchvision's (plus the transform's size_divisible/fixed_size)."""
    import inspect

    from torchvision.models.detection import FasterRCNN

    from spnas.models.desc import DETECTOR_KWARGS
    own = {p for p in inspect.signature(FasterRCNN.__init__).parameters if p not in {"self", "backbone", "num_classes",
                                                                                     "kwargs"}}
    assert own | {"size_divisible", "fixed_size"} == DETECTOR_KWARGS


@pytest.mark.parametrize("width", [256, 512])
def test_box_head_width_keeps_torchvisions_names(width):
    """``representation_size`` narrows fc6/fc7 and the predictor's input; every state-dict name
    stays torchvision's, and the parameter count drops by exactly the head's difference."""
    base = {"num_classes": 5, "backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8},
            "neck": {"out_channels": 32}}
    wide, narrow = build_detector(base), build_detector({**base, "representation_size": width})
    assert list(narrow.state_dict()) == list(wide.state_dict())
    sd = narrow.state_dict()
    assert sd["roi_heads.box_head.fc6.weight"].shape == (width, 32 * 7 * 7)
    assert sd["roi_heads.box_head.fc7.weight"].shape == (width, width)
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (5, width)
    assert sd["roi_heads.box_predictor.bbox_pred.weight"].shape == (20, width)

    def head(w):
        return (32 * 49 + 1) * w + (w + 1) * w + (w + 1) * 5 + (w + 1) * 20
    assert count_params(wide)["heads"] - count_params(narrow)["heads"] == head(1024) - head(width)
    explicit = build_detector({**base, "representation_size": 1024})
    assert [v.shape for v in explicit.state_dict().values()] == [v.shape for v in wide.state_dict().values()]
    narrow.eval()(torch.rand(1, 3, 64, 64))  # runs end to end


@pytest.mark.parametrize("value", [0, "512", 1.5, True])
def test_box_head_width_must_be_a_positive_integer(value):
    with pytest.raises(DescError, match="model desc representation_size: must be an integer >= 1"):
        normalize_desc({"representation_size": value})


def test_frozen_bn_option():
    from torchvision.ops.misc import FrozenBatchNorm2d
    bb = build_backbone({"backbone": {"code": "1-2-2-2", "base_channels": 8, "norm": "frozen_bn"}})
    assert isinstance(bb.body.bn1, FrozenBatchNorm2d)
    assert not any(k.endswith("num_batches_tracked") for k in bb.body.state_dict())


def _stage_calls(code, perturb_first_stage0_call):
    """Inputs and outputs of every call of stages 0 and 1 in one eval forward of a backbone with
    parallel code ``code``; optionally adds 1 to the output of stage 0's first call (its top column)."""
    torch.manual_seed(0)
    bb = build_backbone({"backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8},
                         "neck": {"code": code, "out_channels": 16}}).eval()
    calls = {0: [], 1: []}

    def hook(s):
        def record(module, args, out):
            if s == 0 and perturb_first_stage0_call and not calls[0]:
                out = out + 1.0
            calls[s].append((args[0].clone(), out.clone()))
            return out
        return record
    bb.body.layer1.register_forward_hook(hook(0))
    bb.body.layer2.register_forward_hook(hook(1))
    with torch.no_grad():
        bb.stage_features(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return calls


@pytest.mark.parametrize("code, stage1_changed", [
    ([1, 1, 0, 0], [True, False]),          # stage 1: column 1, main
    ([1, 2, 0, 0], [False, True, False]),   # stage 1: column 2 (no column 2 below), column 1, main
    ([1, 0, 0, 0], [False]),                # stage 1: main only
])
def test_columns_run_across_consecutive_stages(code, stage1_changed):
    ref, hit = _stage_calls(code, False), _stage_calls(code, True)
    assert len(hit[0]) == code[0] + 1 and len(hit[1]) == code[1] + 1
    # column 1 of stage 1 reads column 1's output of stage 0 as it is; the main path reads stage 0's main output
    if code[1] >= 1:
        assert torch.equal(hit[1][-2][0], hit[0][0][1])
        assert not torch.equal(hit[1][-2][0], hit[0][-1][1])
    assert torch.equal(hit[1][-1][0], hit[0][-1][1])
    assert [not torch.equal(a[1], b[1]) for a, b in zip(ref[1], hit[1], strict=True)] == stage1_changed
    # connections start at zero: the perturbed column changes no main path
    assert torch.equal(ref[0][-1][1], hit[0][-1][1])


def test_shared_stage_updates_bn_statistics_once_per_forward_from_the_main_path():
    torch.manual_seed(0)
    bb = build_backbone({"backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8},
                         "neck": {"code": [0, 2, 0, 0], "out_channels": 16}}).train()
    with torch.no_grad():  # trained-like connections: the three passes see different inputs
        for conn in bb.connections[1]:
            conn[1].weight.fill_(1.0)
    bn, conv = bb.body.layer2[0].bn1, bb.body.layer2[0].conv1
    seen = []
    conv.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    bb(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert len(seen) == 3  # column 2, column 1, main path
    main = seen[-1]
    assert all((s.mean((0, 2, 3)) - main.mean((0, 2, 3))).abs().max() > 1e-3 for s in seen[:2])
    assert int(bn.num_batches_tracked) == 1
    # one momentum-0.1 update from the initial (0, 1) with the main pass's batch statistics
    torch.testing.assert_close(bn.running_mean, 0.1 * main.mean((0, 2, 3)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * main.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-7)
    assert bn.track_running_stats and bn.training


def test_frozen_bn_checkpoint_loads_with_trainable_zero_init_norms():
    """Under frozen_bn the last BN of every residual branch (and every connection BN) has trainable
    weight and bias but frozen statistics; the rest is torchvision's FrozenBatchNorm2d. A
    FrozenBatchNorm2d state dict (no num_batches_tracked) and a BatchNorm2d one both load strictly."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from spnas.models.backbone import FrozenStatsBatchNorm2d
    desc = {"backbone": {"code": "11-2-2-2", "block": "basic", "base_channels": 8, "norm": "frozen_bn"},
            "neck": {"code": [0, 1, 0, 0]}}
    bb = build_backbone(desc)
    kinds = {n: type(m) for n, m in bb.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    stats = sorted(n for n, k in kinds.items() if k is FrozenStatsBatchNorm2d)
    assert stats == ["body.layer1.0.bn2", "body.layer1.1.bn2", "body.layer2.0.bn2", "body.layer3.0.bn2",
                     "body.layer4.0.bn2", "connections.1.0.1"]
    assert len(kinds) - len(stats) == 1 + 5 + 3  # stem, bn1 of 5 blocks, 3 stride-2 shortcuts
    assert sorted(n for n, _ in bb.named_parameters() if ".bn" in n or "connections" in n) == sorted(
        [f"{n}.{p}" for n in stats for p in ("weight", "bias")] + ["connections.1.0.0.weight"])
    assert not any(k.endswith("num_batches_tracked") for k in bb.state_dict())
    # state dicts of a BatchNorm2d model (with num_batches_tracked) load strictly and compute the same
    plain = build_backbone({**desc, "backbone": {**desc["backbone"], "norm": "bn"}})
    from helpers import randomize_norms
    randomize_norms(plain, 2)
    assert bb.load_state_dict(plain.state_dict(), strict=True) is not None
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref, got = plain.eval()(x), bb.train()(x)  # frozen statistics even in train mode
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
    bb.train()
    assert all(m.weight.requires_grad for m in bb.modules() if isinstance(m, FrozenStatsBatchNorm2d))
