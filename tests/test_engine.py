"""Training engine: schedule, resume, divergence, checkpoints; COCO evaluator against pycocotools."""
import contextlib
import io

import numpy as np
import pytest
import torch
from helpers import demo
from pycocotools.cocoeval import COCOeval

from spnas import build_detector, inherit_weights
from spnas.data.coco import CocoDetection, load_split
from spnas.models.checkpoint import load_checkpoint, load_weights
from spnas.training.engine import statistics_estimated, train
from spnas.training.evaluation import METRIC_NAMES, coco_metrics
from spnas.training.schedule import TrainConfig, lr_factor
from spnas.utils.errors import CheckpointError, ConfigError, NonFiniteLossError

TINY = {"backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8}, "neck": {"out_channels": 32},
        "min_size": 96, "max_size": 96, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 64,
        "rpn_batch_size_per_image": 64}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return demo(tmp_path_factory.mktemp("tiny"), train=16, val=4, size=96)


def _tiny_model(num_classes=4, seed=0, **desc):
    torch.manual_seed(seed)
    return build_detector({**TINY, "num_classes": num_classes, **desc})


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_lr_schedule():
    cfg = TrainConfig(iters=90, warmup_iters=10, warmup_factor=0.001, steps=(2 / 3, 8 / 9))
    assert lr_factor(0, 90, cfg) == pytest.approx(0.001)
    assert lr_factor(5, 90, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert [lr_factor(i, 90, cfg) for i in (10, 59, 60, 79, 80, 89)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cos = TrainConfig(iters=100, warmup_iters=0, schedule="cosine")
    assert lr_factor(0, 100, cos) == pytest.approx(1) and lr_factor(50, 100, cos) == pytest.approx(0.5)
    assert lr_factor(100, 100, cos) == pytest.approx(0, abs=1e-12)


def test_lr_schedule_by_epoch_and_vega_schedulers():
    """Vega's by_epoch: warm-up and milestones in epochs become iterations with the iterations
    per epoch; milestones in iterations stay; a milestone past the end is never reached."""
    by_epoch = TrainConfig(epochs=4, warmup_epochs=1, warmup_factor=0.1, milestones=(2, 3), decay_unit="epoch")
    assert [lr_factor(i, 40, by_epoch, per_epoch=10) for i in (0, 5, 10, 19, 20, 29, 30, 39)] == \
        pytest.approx([0.1, 0.55, 1, 1, 0.1, 0.1, 0.01, 0.01])
    by_iter = TrainConfig(iters=50, warmup_iters=0, milestones=(20, 60), decay_unit="iter", gamma=0.5)
    assert [lr_factor(i, 50, by_iter) for i in (0, 19, 20, 49)] == pytest.approx([1, 1, 0.5, 0.5])
    # CosineAnnealingLR(T_max=2 epochs, eta_min=0.002) at lr 0.02: periodic, as PyTorch's closed form
    cos = TrainConfig(iters=100, lr=0.02, warmup_iters=0, schedule="cosine", cosine_t_max=2, eta_min=0.002)
    assert [lr_factor(i, 100, cos, per_epoch=25) for i in (0, 25, 50, 75)] == pytest.approx([1, 0.55, 0.1, 0.55])
    constant = TrainConfig(iters=20, warmup_iters=10, warmup_type="constant", warmup_factor=0.25, steps=())
    assert [lr_factor(i, 20, constant) for i in (0, 9, 10)] == pytest.approx([0.25, 0.25, 1])
    exp = TrainConfig(iters=20, warmup_iters=10, warmup_type="exp", warmup_factor=0.01, steps=())
    assert [lr_factor(i, 20, exp) for i in (0, 5, 10)] == pytest.approx([0.01, 0.1, 1])
    with pytest.raises(ConfigError, match="training setting warmup_epochs counts epochs: the iterations per epoch are needed"):
        lr_factor(0, 10, TrainConfig(warmup_epochs=1))


def test_linear_lr_scaling():
    """lr is the rate for lr_reference_batch images (torchvision: 0.02 per 16); SGD runs at the
    effective lr."""
    assert TrainConfig(lr=0.02, batch_size=4).effective_lr == pytest.approx(0.005)
    assert TrainConfig(lr=0.02, batch_size=32).effective_lr == pytest.approx(0.04)
    assert TrainConfig(lr=0.02, batch_size=4, lr_reference_batch=4).effective_lr == pytest.approx(0.02)
    assert TrainConfig(lr=0.02, batch_size=4, lr_scaling="none").effective_lr == 0.02
    cfg = TrainConfig.from_dict(TrainConfig(milestones=(2, 3), lr_scaling="none").to_dict())
    assert cfg.milestones == (2, 3) and cfg.lr_scaling == "none"


def test_setup_runs_sgd_at_the_effective_lr_and_counts_epochs(tiny_data):
    """The optimizer starts from the effective lr; warm-up and milestones given in epochs fall at
    the training set's epochs (16 images at batch 4: 4 iterations each)."""
    from spnas.training.engine import setup
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.02, warmup_epochs=1, warmup_factor=0.5, milestones=(2,))
    st = setup(_tiny_model(), load_split(tiny_data, "train", train=True), cfg, torch.device("cpu"))
    assert (st.per_epoch, st.total) == (4, 12)
    base = st.optimizer.param_groups[0]["initial_lr"]
    assert base == pytest.approx(0.005)
    lrs = [base * st.scheduler.lr_lambdas[0](i) for i in range(12)]
    assert lrs == pytest.approx([0.0025, 0.003125, 0.00375, 0.004375] + [0.005] * 4 + [0.0005] * 4)


@pytest.mark.parametrize("kw, message", [
    ({"norm_eval": "yes"}, "training setting norm_eval: must be true, false or 'auto', got 'yes'"),
    ({"norm_eval": 1}, "training setting norm_eval: must be true, false or 'auto', got 1"),
    ({"batch_size": 0}, "training setting batch_size: must be an integer >= 1, got 0"),
    ({"lr_scaling": "sqrt"}, "training setting lr_scaling: must be one of 'linear', 'none', got 'sqrt'"),
    ({"lr_reference_batch": 0}, "training setting lr_reference_batch: must be an integer >= 1, got 0"),
    ({"warmup_type": "cosine"}, "training setting warmup_type: must be one of 'linear', 'constant', 'exp', got 'cosine'"),
    ({"decay_unit": "step"}, "training setting decay_unit: must be one of 'epoch', 'iter', got 'step'"),
    ({"milestones": (2, -1)}, r"training setting milestones: must be positive numbers, got \(2, -1\)"),
    ({"warmup_epochs": -1}, r"training setting warmup_epochs: must be a number in \[0, inf\], got -1"),
    ({"lr": -1.0}, r"training setting lr: must be a number in \(0, inf\], got -1.0"),
    ({"schedule": "poly"}, "training setting schedule: must be one of 'step', 'cosine', got 'poly'"),
    ({"epochs": -1}, "training setting epochs: must be an integer >= 0, got -1"),
    ({"steps": (0.5, 1.5)}, r"training setting steps: must be fractions in \(0, 1\], got \(0.5, 1.5\)"),
])
def test_bad_training_settings(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw)


class _Boom(RuntimeError):
    pass


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_weights(tiny_data, tmp_path, monkeypatch):
    cfg = TrainConfig(iters=12, batch_size=4, lr=0.01, warmup_iters=3, checkpoint_every=2, eval_every=1)
    tr, va = load_split(tiny_data, "train", train=True), load_split(tiny_data, "val", train=False)
    ref_model = _tiny_model()
    ref = train(ref_model, tr, va, cfg, tmp_path / "ref", resume=False)
    assert ref["iters"] == 12 and [h["iteration"] for h in ref["history"]] == [4, 8, 12]

    real_getitem, calls = CocoDetection.__getitem__, {"n": 0}

    def crashing(self, i):
        calls["n"] += 1
        if calls["n"] > 4 * 7 + 2:  # dies while loading the batch of iteration 8
            raise _Boom("simulated crash")
        return real_getitem(self, i)

    monkeypatch.setattr(CocoDetection, "__getitem__", crashing)
    with pytest.raises(_Boom):
        train(_tiny_model(), tr, va, cfg, tmp_path / "run", resume=False)
    monkeypatch.setattr(CocoDetection, "__getitem__", real_getitem)
    assert load_checkpoint(tmp_path / "run" / "last.pth")["iteration"] == 6
    resumed_model = _tiny_model(seed=123)  # different start: everything must come from the checkpoint
    res = train(resumed_model, tr, va, cfg, tmp_path / "run", resume=True)
    assert res["iters"] == 12 and res["history"] == ref["history"]
    a, b = ref_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_schedule(tiny_data, tmp_path):
    tr = load_split(tiny_data, "train", train=True)
    train(_tiny_model(), tr, None, TrainConfig(iters=2, warmup_iters=1), tmp_path, resume=False)
    with pytest.raises(CheckpointError, match="was made for 2 iterations, this training has 3"):
        train(_tiny_model(), tr, None, TrainConfig(iters=3, warmup_iters=1), tmp_path, resume=True)


class _NanModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, targets=None):
        return {"loss_classifier": self.w * float("nan"), "loss_box_reg": self.w * 0.5}


def test_non_finite_loss_names_step_and_terms(tiny_data, tmp_path):
    tr = load_split(tiny_data, "train", train=True)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 0: \{'loss_classifier': nan, 'loss_box_reg': 0.5\}"):
        train(_NanModel(), tr, None, TrainConfig(iters=3), tmp_path, resume=False)


def test_checkpoint_of_another_architecture_names_the_first_misfit(tmp_path):
    for code, message in (("1-2-2-21", "unexpected tensor 'backbone.body.layer4.1.conv1.weight'"),
                          ("1-2-2-1", "tensor 'backbone.body.layer4.0.conv1.weight' has shape \\(32, 32, 3, 3\\), "
                                      "the model expects \\(64, 32, 3, 3\\)")):
        other = build_detector({**TINY, "num_classes": 4, "backbone": {**TINY["backbone"], "code": code}})
        torch.save(other.state_dict(), tmp_path / "other.pth")
        with pytest.raises(CheckpointError, match="other.pth' belongs to another architecture: " + message):
            load_weights(_tiny_model(), {**TINY, "num_classes": 4}, tmp_path / "other.pth")
    fewer = {k: v for k, v in _tiny_model().state_dict().items() if "layer4" not in k}
    with pytest.raises(CheckpointError, match="tensor 'backbone.body.layer4.0.conv1.weight' is missing"):
        load_weights(_tiny_model(), {**TINY, "num_classes": 4}, fewer)


class Payload:
    """Stands for an arbitrary pickled object: weights_only loading must refuse it."""


def test_unsafe_or_broken_checkpoints_are_refused(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="is not a safe PyTorch checkpoint"):
        load_checkpoint(tmp_path / "pickle.pth")
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="is not a safe PyTorch checkpoint"):
        load_checkpoint(tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_class_count_change_keeps_everything_but_the_predictor():
    src = _tiny_model(num_classes=91, seed=1)
    dst = _tiny_model(num_classes=4, seed=2)
    info = load_weights(dst, {**TINY, "num_classes": 4}, src.state_dict())
    assert info["fresh"] == 4
    assert torch.equal(dst.state_dict()["rpn.head.conv.0.0.weight"], src.state_dict()["rpn.head.conv.0.0.weight"])


def test_evaluator_matches_direct_pycocotools(tiny_data, capsys):
    ds = load_split(tiny_data, "val", train=False)
    rng = np.random.default_rng(0)
    results = []
    for ann in ds.coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        jit = rng.normal(0, 2, 4)
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + jit[0], y + jit[1], w + jit[2], h + jit[3]], "score": float(rng.uniform(0.3, 1))})
        results.append({"image_id": ann["image_id"], "category_id": 1 + (ann["category_id"] % 3),
                        "bbox": [float(v) for v in rng.uniform(0, 60, 4)], "score": float(rng.uniform(0, 0.5))})
    ours = coco_metrics(ds.coco, results)
    assert capsys.readouterr().out == ""  # pycocotools' prints stay out of our output
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ds.coco, ds.coco.loadRes(results), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    for i, name in enumerate(METRIC_NAMES):
        assert ours[name] == (ev.stats[i] * 100 if ev.stats[i] >= 0 else None)
    assert 20 < ours["AP50"] <= 100
    assert coco_metrics(ds.coco, []) == {n: 0.0 for n in METRIC_NAMES}


@pytest.mark.parametrize("norm_eval, batch_size, frozen", [
    ("auto", 4, True), ("auto", 15, True), ("auto", 16, False), (True, 32, True), (False, 2, False)])
def test_norm_eval_resolves_auto_by_batch_size(norm_eval, batch_size, frozen):
    cfg = TrainConfig(norm_eval=norm_eval, batch_size=batch_size)
    assert cfg.freeze_norm_stats is frozen
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_norm_eval_auto_freezes_only_estimated_statistics(tiny_data, tmp_path):
    """auto at batch 4: a model fresh from its builder keeps updating its statistics (freezing
    them would pin every BN to the identity); the same model once trained has estimated
    statistics and freezes them; a resumed training keeps the decision made at its start."""
    ds = load_split(tiny_data, "train", train=True)
    model = _tiny_model()
    assert not statistics_estimated(model)
    cfg = TrainConfig(iters=2, batch_size=4, warmup_iters=0)
    assert cfg.freeze_norm_stats  # the batch-size part of the rule
    first = train(model, ds, None, cfg, tmp_path / "a", resume=False)
    assert first["norm_eval"] is False and statistics_estimated(model)
    assert load_checkpoint(tmp_path / "a" / "last.pth")["norm_eval"] is False
    before = _bn_state(model)
    second = train(model, ds, None, cfg, tmp_path / "b", resume=False)
    assert second["norm_eval"] is True
    assert all(torch.equal(before[k], v) for k, v in _bn_state(model).items())
    # resuming the first training (now with estimated statistics) keeps "updated"
    more = TrainConfig(iters=2, batch_size=4, warmup_iters=0)
    assert train(model, ds, None, more, tmp_path / "a", resume=True)["norm_eval"] is False


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["bn", "frozen_bn"])
def test_zero_initialised_bn_weights_learn(tiny_data, tmp_path, norm):
    """An expand block's last BN and the connection BNs start at zero; one training step gives
    them non-zero gradients and weights, under norm_eval (bn, batch 4) and under frozen_bn."""
    backbone = {**TINY["backbone"], "norm": norm}
    parent = {**TINY, "num_classes": 4, "backbone": backbone}
    child = {**parent, "backbone": {**backbone, "code": "11-2-2-2"}, "neck": {**TINY["neck"], "code": [1, 0, 0, 1]}}
    state, report = inherit_weights(parent, _tiny_model(backbone=backbone).state_dict(), child)
    model = build_detector(child)
    model.load_state_dict(state, strict=True)
    zero = ["backbone.body.layer1.1.bn2", "backbone.connections.0.0.1", "backbone.connections.3.0.1"]
    assert all(f"{n}.weight" in report["fresh"] for n in zero)
    assert all(torch.count_nonzero(model.get_submodule(n).weight) == 0 for n in zero)
    cfg = TrainConfig(iters=1, batch_size=4, warmup_iters=0, lr=0.01, norm_eval=True)
    train(model, load_split(tiny_data, "train", train=True), None, cfg, tmp_path, resume=False)
    for n in zero:
        bn = model.get_submodule(n)
        assert isinstance(bn.weight, torch.nn.Parameter), n
        assert torch.count_nonzero(bn.weight.grad) > 0, n
        assert torch.count_nonzero(bn.weight) > 0, n
    assert load_checkpoint(tmp_path / "last.pth")["norm_eval"] is True


@pytest.mark.slow
def test_norm_eval_freezes_statistics_and_trains_affine_parameters(tiny_data, tmp_path):
    model = _tiny_model(neck={**TINY["neck"], "code": [0, 2, 0, 0]})
    before = _bn_state(model)
    affine = {n: (m.weight.detach().clone(), m.bias.detach().clone())
              for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(before) == 3 * len(affine) and len(affine) == 1 + 2 * 4 + 3 + 2  # stem, blocks, shortcuts, connections
    train(model, load_split(tiny_data, "train", train=True), None,
          TrainConfig(iters=2, batch_size=4, warmup_iters=0, norm_eval=True), tmp_path, resume=False)
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            w, b = affine[n]
            assert not torch.equal(w, m.weight) and not torch.equal(b, m.bias), n


@pytest.mark.slow
def test_shared_stage_bn_counts_one_update_per_step(tiny_data, tmp_path):
    """Stage 1 runs 3 times per forward (2 columns + main path); with norm_eval off every BN,
    stage 1's included, counts exactly one update per training step."""
    model = _tiny_model(neck={**TINY["neck"], "code": [0, 2, 0, 0]})
    before = _bn_state(model)
    train(model, load_split(tiny_data, "train", train=True), None,
          TrainConfig(iters=2, batch_size=4, warmup_iters=0, norm_eval=False), tmp_path, resume=False)
    after = _bn_state(model)
    counts = {k: int(v) for k, v in after.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {2}
    assert "backbone.body.layer2.0.bn1.num_batches_tracked" in counts
    assert not torch.equal(before["backbone.body.layer2.0.bn1.running_mean"],
                           after["backbone.body.layer2.0.bn1.running_mean"])
    assert load_checkpoint(tmp_path / "last.pth")["norm_eval"] is False
