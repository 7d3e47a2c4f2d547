"""Weight inheritance (SPEC 3): function-preserving expand and parallel children, swap keeps
every main-branch tensor, add-stage adds fresh tensors only, exact reports."""
import re

import pytest
import torch
from helpers import randomize_norms

from spnas import InheritanceError, align_blocks, build_detector, inherit_weights


def _desc(code, parallel=None, block="bottleneck", base=8):
    d = {"num_classes": 5, "backbone": {"code": code, "block": block, "base_channels": base},
         "min_size": 160, "max_size": 160, "box_score_thresh": 0.0}
    if parallel is not None:
        d["neck"] = {"code": parallel}
    return d


def _trained_like_parent(desc, seed=0):
    torch.manual_seed(seed)
    model = randomize_norms(build_detector(desc), seed)
    return model.eval()


def _outputs(model, images):
    model.eval()
    with torch.no_grad():
        feats = model.backbone(torch.stack(images))
        dets = model(images)
    return feats, dets


IMAGES = [torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(7)),
          torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(8))]


def _assert_same_function(parent, child):
    pf, pd = _outputs(parent, IMAGES)
    cf, cd = _outputs(child, IMAGES)
    assert list(pf) == list(cf)
    for k in pf:
        assert torch.equal(pf[k], cf[k]), k
    for a, b in zip(pd, cd, strict=False):
        assert a["boxes"].shape[0] > 0
        for k in ("boxes", "labels", "scores"):
            assert torch.equal(a[k], b[k])


def _names(state, pattern):
    return sorted(k for k in state if re.match(pattern, k))


@pytest.mark.parametrize("block", ["bottleneck", "basic", "resnext"])
def test_expand_child_computes_what_the_parent_computed(block):
    base = 16 if block == "resnext" else 8
    pdesc, cdesc = _desc("11-21-21-21", block=block, base=base), _desc("111-21-211-21", block=block, base=base)
    parent = _trained_like_parent(pdesc)
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    _assert_same_function(parent, child)
    fresh = _names(state, r"backbone\.body\.layer1\.2\.|backbone\.body\.layer3\.2\.")
    assert sorted(report["fresh"]) == fresh and len(fresh) > 0
    assert sorted(report["inherited"]) == sorted(set(state) - set(fresh))
    assert report["dropped"] == []
    # the inherited tensors moved with their blocks: parent layer3.1 is child layer3.1
    assert torch.equal(state["backbone.body.layer3.1.conv1.weight"], parent.state_dict()["backbone.body.layer3.1.conv1.weight"])


def test_parallel_child_computes_what_the_parent_computed():
    pdesc, cdesc = _desc("11-21-21-21"), _desc("11-21-21-21", [0, 1, 0, 2])
    parent = _trained_like_parent(pdesc)
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    _assert_same_function(parent, child)
    assert sorted(report["fresh"]) == _names(state, r"backbone\.connections\.")
    assert len(report["fresh"]) == 3 * 6  # 3 modules x (conv weight + BN weight, bias, mean, var, count)
    assert sorted(report["inherited"]) == sorted(set(parent.state_dict()))
    # grandchild keeps the connections its parent had
    child_trained = randomize_norms(child, 3)
    gdesc = _desc("11-21-21-21", [1, 1, 0, 2])
    gstate, grep = inherit_weights(cdesc, child_trained.state_dict(), gdesc)
    assert sorted(grep["fresh"]) == _names(gstate, r"backbone\.connections\.0\.0\.")
    assert torch.equal(gstate["backbone.connections.3.1.1.weight"], child_trained.state_dict()["backbone.connections.3.1.1.weight"])


def test_swap_child_inherits_every_main_branch_tensor():
    pdesc = _desc("111-2111-211111-211", base=8)
    cdesc = _desc("1112-111-211111-211", base=8)   # block 3 ('2') moves into stage 0
    parent = _trained_like_parent(pdesc)
    pstate = parent.state_dict()
    state, report = inherit_weights(pdesc, pstate, cdesc)
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    main = _names(state, r"backbone\.body\.(conv1|bn1|layer\d+\.\d+\.(conv|bn)\d)")
    assert set(main) <= set(report["inherited"])
    # stage 1 now starts with a '1' block: its new stride-2 shortcut is fresh and passes input through
    ds = _names(state, r"backbone\.body\.layer2\.0\.downsample\.")
    # stage 0 now ends at 4*8*2=64 channels instead of 32: FPN lateral 0 is fresh, and zero
    lateral = ["backbone.fpn.inner_blocks.0.0.bias", "backbone.fpn.inner_blocks.0.0.weight"]
    assert sorted(report["fresh"]) == sorted(ds + lateral)
    assert tuple(state[lateral[1]].shape) == (256, 64, 1, 1) and tuple(state[lateral[0]].shape) == (256,)
    assert all(torch.count_nonzero(state[k]) == 0 for k in lateral)
    assert torch.equal(state["backbone.fpn.inner_blocks.1.0.weight"], pstate["backbone.fpn.inner_blocks.1.0.weight"])
    w = state["backbone.body.layer2.0.downsample.0.weight"]
    assert torch.equal(w[:, :, 0, 0], torch.eye(w.shape[0]))
    assert torch.equal(state["backbone.body.layer2.0.downsample.1.running_var"], torch.ones(w.shape[0]))
    # the moved '2' block keeps its projection shortcut (now stride 1)
    assert torch.equal(state["backbone.body.layer1.3.downsample.0.weight"], pstate["backbone.body.layer2.0.downsample.0.weight"])
    assert child.backbone.body.layer1[3].downsample[0].stride == (1, 1)
    assert sorted(report["dropped"]) == lateral


def test_add_stage_child_gets_fresh_stage_and_level():
    pdesc, cdesc = _desc("11-21-21-21"), _desc("11-21-21-21-2")
    parent = _trained_like_parent(pdesc)
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    build_detector(cdesc).load_state_dict(state, strict=True)
    fresh = _names(state, r"backbone\.body\.layer5\.|backbone\.fpn\.(inner|layer)_blocks\.4\.")
    assert sorted(report["fresh"]) == fresh
    assert sorted(report["inherited"]) == sorted(parent.state_dict())
    assert torch.count_nonzero(state["backbone.fpn.inner_blocks.4.0.weight"]) == 0
    assert torch.count_nonzero(state["backbone.fpn.inner_blocks.4.0.bias"]) == 0


def test_add_stage_keeps_every_old_fpn_level_bit_identical():
    pdesc, cdesc = _desc("11-21-21-21", block="basic"), _desc("11-21-21-21-2", block="basic")
    parent = _trained_like_parent(pdesc)
    with torch.no_grad():  # nonzero FPN biases (torchvision starts them at 0): a leaked lateral bias shows
        for conv in parent.backbone.fpn.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(conv.bias.numel()))
    state, _ = inherit_weights(pdesc, parent.state_dict(), cdesc)
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    x = torch.stack(IMAGES)
    with torch.no_grad():
        pf, cf = parent.eval().backbone(x), child.eval().backbone(x)
    assert list(cf) == ["0", "1", "2", "3", "4", "pool"]
    for k in ("0", "1", "2", "3"):
        assert torch.equal(pf[k], cf[k]), k
    # the check is sensitive: a random lateral for the new level moves every old level
    with torch.no_grad():
        child.backbone.fpn.inner_blocks[4][0].weight.normal_(0, 0.1)
        moved = child.backbone(x)
    assert all(not torch.equal(pf[k], moved[k]) for k in ("0", "1", "2", "3"))


def test_fresh_tensors_are_seeded():
    pdesc, cdesc = _desc("11-21-21-21"), _desc("111-21-21-21-2")
    pstate = _trained_like_parent(pdesc).state_dict()
    a, _ = inherit_weights(pdesc, pstate, cdesc, seed=5)
    b, _ = inherit_weights(pdesc, pstate, cdesc, seed=5)
    c, _ = inherit_weights(pdesc, pstate, cdesc, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.body.layer5.0.conv1.weight"], c["backbone.body.layer5.0.conv1.weight"])


@pytest.mark.parametrize("parent, child, expected", [
    ("11-21", "11-21", {0: 0, 1: 1, 2: 2, 3: 3}),
    ("11-21", "111-21", {0: 0, 1: 1, 3: 2, 4: 3}),
    ("11-11", "111-11", {0: 0, 1: 1, 3: 2, 4: 3}),      # keeps stage starts on stage starts
    ("111-2111", "1112-111", {i: i for i in range(7)}),
    ("11-21", "11-21-2", {0: 0, 1: 1, 2: 2, 3: 3}),
])
def test_block_alignment(parent, child, expected):
    assert align_blocks(parent, child) == expected


@pytest.mark.parametrize("parent, child, message", [
    ("11-21", "1-21", "not derivable"),
    ("11-21", "12-21", "not derivable"),
])
def test_underivable_children_are_rejected(parent, child, message):
    with pytest.raises(InheritanceError, match=message):
        align_blocks(parent, child)


def test_block_type_change_is_rejected():
    pdesc = _desc("11-21-21-21")
    with pytest.raises(InheritanceError, match="backbone.block differs"):
        inherit_weights(pdesc, build_detector(pdesc).state_dict(), _desc("11-21-21-21", block="basic"))


@pytest.mark.slow
def test_new_columns_keep_a_trained_parents_function():
    """Columns added where the next stage's column of that number reads the same value as before
    (a first column on stage 0; a top column on the last stage) leave even a parent with trained
    connections computing exactly what it computed."""
    small = {"rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}
    pdesc = {**_desc("11-21-21-21", block="basic"), **small, "neck": {"code": [0, 1, 0, 2], "out_channels": 32}}
    cdesc = {**pdesc, "neck": {"code": [1, 1, 0, 3], "out_channels": 32}}
    parent = _trained_like_parent(pdesc)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for conns in parent.backbone.connections:
            for conn in conns:
                conn[1].weight.copy_(torch.rand(conn[1].weight.shape, generator=g) * 0.5 + 0.5)
                conn[1].bias.copy_(torch.randn(conn[1].bias.shape, generator=g) * 0.1)
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    assert sorted(report["fresh"]) == _names(state, r"backbone\.connections\.(0\.0|3\.2)\.")
    child = build_detector(cdesc)
    child.load_state_dict(state, strict=True)
    _assert_same_function(parent, child)
