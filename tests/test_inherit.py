"""Weight inheritance (SPEC 3): function-preserving expand and parallel children, swap keeps
every main-branch tensor, add-stage adds fresh tensors only, exact reports."""
import re

import pytest
import torch
from helpers import randomize_norms

from spnas import InheritanceError, align_blocks, build_detector, inherit_weights
from spnas.models import inherit as inherit_mod
from spnas.models.inherit import swap_trainable
from spnas.training.engine import setup
from spnas.training.schedule import TrainConfig


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
    ("11-21", "12-11", {0: 0, 1: 1, 2: 2, 3: 3}),                # width: the '2' one block earlier
    ("111-2111", "112-1111", {i: i for i in range(7)}),          # ... across a stage boundary
    ("11-21", "112-11", {0: 0, 1: 1, 2: 2, 4: 3}),              # expand + width: exact pairs preferred
    ("11-21", "1112-11", {0: 0, 1: 1, 3: 2, 5: 3}),             # ... and stage starts kept
    ("11-21-21-21", "11-21-21-11-2", {i: i for i in range(8)}),  # add-stage + width twice: the '2' ends in the new stage
])
def test_block_alignment(parent, child, expected):
    assert align_blocks(parent, child) == expected


@pytest.mark.parametrize("parent, child, message", [
    ("11-21", "1-21", "not derivable"),
    ("11-21", "12-21", "not derivable"),          # a doubling no operator adds
    ("11-21", "121-21", "not derivable"),         # an inserted '2'
    ("11-21", "11-11", "not derivable"),          # a doubling lost
    ("11-21", "1-2", "not derivable.*3 blocks|not derivable.*fewer"),
])
def test_underivable_children_are_rejected(parent, child, message):
    with pytest.raises(InheritanceError, match=message):
        align_blocks(parent, child)


def test_block_type_change_is_rejected():
    pdesc = _desc("11-21-21-21")
    with pytest.raises(InheritanceError, match="backbone.block differs"):
        inherit_weights(pdesc, build_detector(pdesc).state_dict(), _desc("11-21-21-21", block="basic"))


def test_width_child_inherits_what_still_fits():
    pdesc = _desc("11-21-21-21")
    cdesc = _desc("11-12-21-21")        # the '2' of block 2 (layer2.0) moves to block 3 (layer2.1)
    assert align_blocks("11-21-21-21", "11-12-21-21") == {i: i for i in range(8)}
    parent = _trained_like_parent(pdesc)
    pstate = parent.state_dict()
    state, report = inherit_weights(pdesc, pstate, cdesc)
    build_detector(cdesc).load_state_dict(state, strict=True)
    # block 2 is the only block whose width changed: all of it is fresh; block 3 keeps its width
    # but now takes the narrower input: its first conv and its new projection shortcut are fresh
    changed = _names(state, r"backbone\.body\.layer2\.0\.")
    fresh = changed + ["backbone.body.layer2.1.conv1.weight"] + _names(state, r"backbone\.body\.layer2\.1\.downsample\.")
    assert sorted(report["fresh"]) == sorted(fresh) and len(changed) == 4 * (1 + 5)   # 3 convs + the shortcut's, each with its BN (5 tensors)
    assert sorted(report["inherited"]) == sorted(set(state) - set(fresh))
    for k in report["inherited"]:                                 # same names: the blocks did not move
        assert torch.equal(state[k], pstate[k]), k
    assert sorted(report["dropped"]) == sorted(
        _names(pstate, r"backbone\.body\.layer2\.0\.") + ["backbone.body.layer2.1.conv1.weight"])
    # block 2 still starts stage 1 (stride 2) and now keeps its width: its shortcut passes its input through
    w = state["backbone.body.layer2.0.downsample.0.weight"]
    assert w.shape[0] == w.shape[1] and torch.equal(w[:, :, 0, 0], torch.eye(w.shape[0]))


def test_several_ops_with_a_width_move_align_and_inherit():
    # width (block 2 -> 1), swap (boundary 0 one block right), expand (a '1' inside stage 2)
    pdesc, cdesc = _desc("11-21-21-21", block="basic"), _desc("121-1-211-21", block="basic")
    mapping = align_blocks("11-21-21-21", "121-1-211-21")
    assert mapping == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 7: 6, 8: 7}   # "211": the later '1' counts as inserted
    parent = _trained_like_parent(pdesc)
    pstate = parent.state_dict()
    state, report = inherit_weights(pdesc, pstate, cdesc)
    build_detector(cdesc).load_state_dict(state, strict=True)
    # blocks 3.. keep their width and input: inherited bit for bit from their matched parent block
    pairs = {"layer2.0": "layer2.1", "layer3.0": "layer3.0", "layer3.1": "layer3.1", "layer4.0": "layer4.0",
             "layer4.1": "layer4.1"}
    for c, p in pairs.items():
        for k in _names(state, rf"backbone\.body\.{c}\.(conv|bn)"):
            assert k in report["inherited"] and torch.equal(state[k], pstate[k.replace(c, p)]), k
    assert _names(state, r"backbone\.body\.layer3\.2\.") and \
        set(_names(state, r"backbone\.body\.layer3\.2\.")) <= set(report["fresh"])   # the expanded block
    assert set(_names(state, r"backbone\.body\.layer1\.1\.")) <= set(report["fresh"])  # doubled: every tensor fresh
    assert sorted(report["inherited"] + report["fresh"]) == sorted(state)


# ----------------------------------------------------------------------------- freeze_swap_keys

def _params(desc):
    with torch.device("meta"):
        return [n for n, _ in build_detector(desc).named_parameters()]


def _expected_trainable(desc, pattern):
    """Every parameter outside the serial backbone, and the backbone's that match ``pattern``."""
    return {n for n in _params(desc) if not n.startswith("backbone.body.") or (pattern and re.match(pattern, n))}


@pytest.mark.parametrize("parent, child, pattern", [
    # swap: block 3 moved into stage 0 (stage changed), layer2.0 (was layer2.1) now has stride 2
    ("111-2111-211111-211", "1112-111-211111-211", r"backbone\.body\.(layer1\.3|layer2\.0)\."),
    # expand: the inserted blocks only (fresh); no block changed stage
    ("11-21-21-21", "111-21-211-21", r"backbone\.body\.(layer1\.2|layer3\.2)\."),
    # add-stage: the new stage only
    ("11-21-21-21", "11-21-21-21-1", r"backbone\.body\.layer5\."),
    # swap by two blocks: both moved blocks, and the block that lost its stride
    ("111-2111-21-21", "1-112111-21-21", r"backbone\.body\.(layer2\.[012])\."),
])
def test_freeze_swap_keys_trains_what_the_mutation_touched(parent, child, pattern):
    pdesc, cdesc = _desc(parent), _desc(child)
    state, report = inherit_weights(pdesc, _trained_like_parent(pdesc).state_dict(), cdesc)
    keep = swap_trainable(pdesc, cdesc, report)
    expected = _expected_trainable(cdesc, pattern)
    assert keep == expected
    assert {n for n in report["fresh"] if n in state and n in expected | set(_params(cdesc))} <= keep
    assert "backbone.body.conv1.weight" not in keep and "backbone.body.bn1.weight" not in keep   # the stem


@pytest.mark.slow
def test_freeze_swap_keys_pure_swap_trains_moved_blocks_fpn_and_heads():
    """A swap that keeps every stage width inherits everything: before, nothing was fresh, so
    nothing trained ("no trainable parameters"). Now its moved blocks, the FPN and the heads
    train, and one optimizer step leaves every frozen tensor as it was."""
    pdesc, cdesc = _desc("111-12111-21-21"), _desc("1111-2111-21-21")
    parent = _trained_like_parent(pdesc)
    state, report = inherit_weights(pdesc, parent.state_dict(), cdesc)
    assert report["fresh"] == []
    keep = swap_trainable(pdesc, cdesc, report)
    assert keep == _expected_trainable(cdesc, r"backbone\.body\.(layer1\.3|layer2\.0)\.")
    torch.manual_seed(0)
    model = build_detector(cdesc)
    model.load_state_dict(state, strict=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = setup(model, [0, 1], TrainConfig(iters=1, batch_size=2, warmup_iters=0), torch.device("cpu"), keep.__contains__)
    assert sum(p.numel() for p in st.params) == sum(p.numel() for n, p in model.named_parameters() if n in keep)
    model.train()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 150.0, 100.0]]), "labels": torch.tensor([2])}]
    st.optimizer.zero_grad()
    sum(model(IMAGES, targets).values()).backward()
    st.optimizer.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= keep
    assert {n for n in keep if re.match(r"backbone\.body\.(layer1\.3|layer2\.0)\.conv", n)} <= changed
    assert "backbone.fpn.inner_blocks.0.0.weight" in changed and "roi_heads.box_head.fc6.weight" in changed


def test_freeze_swap_keys_never_leaves_nothing_to_train(monkeypatch, caplog):
    desc = _desc("11-21-21-21")
    _, report = inherit_weights(desc, _trained_like_parent(desc).state_dict(), desc)
    assert report["fresh"] == []
    assert swap_trainable(desc, desc, report) == _expected_trainable(desc, None)   # the FPN and heads only
    monkeypatch.setattr(inherit_mod, "_FROZEN_PREFIX", "")                          # freeze everything untouched
    with caplog.at_level("WARNING", logger="spnas.models.inherit"):
        keep = swap_trainable(desc, desc, report)
    assert keep == set(_params(desc)) and "every parameter trains" in caplog.text


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
