"""Training settings and the learning-rate schedule. No torch: config parsing and the Kubeflow
components validate settings without importing the model stack."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..utils import checks
from ..utils.errors import ConfigError

#: Warm-up curves (Vega's WarmupScheduler ``warmup_type``) and lr scaling rules.
WARMUP_TYPES = ("linear", "constant", "exp")
LR_SCALINGS = ("linear", "none")

#: ``norm_eval: auto`` freezes BatchNorm statistics below this per-process batch size.
NORM_EVAL_BATCH = 16


@dataclass
class TrainConfig:
    """A training schedule, validated on creation (an impossible value raises
    :class:`~spnas.utils.errors.ConfigError` naming the setting).

    ``iters`` (when set) overrides ``epochs``. The learning rate:

    * ``lr`` is the rate for ``lr_reference_batch`` images when ``lr_scaling`` is ``linear``
      (the default, torchvision's recipe: 0.02 per 16 images); SGD runs at
      :attr:`effective_lr` = ``lr * batch_size / lr_reference_batch``. ``none`` uses ``lr`` as it is.
    * warm-up from ``warmup_factor`` x lr over ``warmup_iters`` iterations, or ``warmup_epochs``
      epochs when set (Vega's ``by_epoch: true``); ``warmup_type`` linear, constant or exp.
    * then the decay: ``schedule`` ``step`` multiplies by ``gamma`` at each of ``milestones``
      (absolute, counted in ``decay_unit``: epochs or iterations) or, without milestones, at the
      fractions ``steps`` of the total; ``cosine`` anneals to ``eta_min`` (an lr at the
      configured scale, scaled like ``lr``) with period ``cosine_t_max`` (in ``decay_unit``;
      default the whole training). A milestone at or past the end is never reached.

    Epoch counts become iterations with the iterations per epoch of the training data, at train
    time (:func:`lr_factor`). On CUDA only, each on by default and each can be turned off:
    ``amp`` (bf16 where supported, else fp16 with a grad scaler), ``channels_last``,
    ``cudnn_benchmark`` and ``pin_memory``; ``workers`` None picks the data-loader processes (0 on
    CPU, up to 4 per process on CUDA).

    Data-parallel training (:mod:`spnas.training.distributed`): ``batch_size`` is per process
    (torchvision's convention) and :attr:`global_batch` = ``batch_size * world_size``; the linear
    lr rule scales with the global batch. ``world_size`` is set by the engine from the launch,
    not by a config.
    ``norm_eval`` (True, False or ``"auto"``: on when ``batch_size`` is below
    :data:`NORM_EVAL_BATCH` and the model's statistics are already estimated, see
    :func:`spnas.training.engine.statistics_estimated`) keeps every BatchNorm in eval mode during
    training (running statistics frozen, affine weight and bias trained), as torchvision's COCO
    recipe does at small batch; :attr:`freeze_norm_stats` is the batch-size part of the rule."""

    epochs: int = 3
    iters: int | None = None
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_epochs: float | None = None
    warmup_factor: float = 0.001
    warmup_type: str = "linear"
    schedule: str = "step"
    steps: tuple[float, ...] = (0.667, 0.889)
    milestones: tuple[float, ...] | None = None
    decay_unit: str = "epoch"
    gamma: float = 0.1
    cosine_t_max: float | None = None
    eta_min: float = 0.0
    lr_scaling: str = "linear"
    lr_reference_batch: int = 16
    clip_grad_norm: float | None = None
    amp: bool = True
    channels_last: bool = True
    cudnn_benchmark: bool = True
    pin_memory: bool = True
    seed: int = 0
    workers: int | None = None
    eval_every: int = 1
    checkpoint_every: int = 0
    norm_eval: bool | str = "auto"
    world_size: int = 1

    def __post_init__(self) -> None:
        def where(key: str) -> str:
            return f"training setting {key}"
        if self.iters is None:
            self.epochs = checks.integer(self.epochs, where("epochs"), 0)
        else:
            self.iters = checks.integer(self.iters, where("iters"), 0)
        self.batch_size = checks.integer(self.batch_size, where("batch_size"), 1)
        self.world_size = checks.integer(self.world_size, where("world_size"), 1)
        if self.workers is not None:
            self.workers = checks.integer(self.workers, where("workers"), 0)
        for key in ("amp", "channels_last", "cudnn_benchmark", "pin_memory"):
            checks.boolean(getattr(self, key), where(key))
        self.lr = checks.number(self.lr, where("lr"), 0, open_lo=True)
        self.warmup_iters = checks.integer(self.warmup_iters, where("warmup_iters"), 0)
        if self.warmup_epochs is not None:
            self.warmup_epochs = checks.number(self.warmup_epochs, where("warmup_epochs"), 0)
        self.warmup_factor = checks.number(self.warmup_factor, where("warmup_factor"), 0, 1)
        self.warmup_type = checks.one_of(self.warmup_type, where("warmup_type"), WARMUP_TYPES)
        self.schedule = checks.one_of(self.schedule, where("schedule"), ("step", "cosine"))
        steps = tuple(self.steps)
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in steps):
            raise checks.fail(where("steps"), "fractions in (0, 1]", steps)
        self.steps = steps
        if self.milestones is not None:
            ms = tuple(self.milestones)
            if any(isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < math.inf for m in ms):
                raise checks.fail(where("milestones"), "positive numbers", ms)
            self.milestones = ms
        self.decay_unit = checks.one_of(self.decay_unit, where("decay_unit"), ("epoch", "iter"))
        if self.cosine_t_max is not None:
            self.cosine_t_max = checks.number(self.cosine_t_max, where("cosine_t_max"), 0, open_lo=True)
        self.eta_min = checks.number(self.eta_min, where("eta_min"), 0)
        self.lr_scaling = checks.one_of(self.lr_scaling, where("lr_scaling"), LR_SCALINGS)
        self.lr_reference_batch = checks.integer(self.lr_reference_batch, where("lr_reference_batch"), 1)
        if not isinstance(self.norm_eval, bool) and self.norm_eval != "auto":
            raise checks.fail(where("norm_eval"), "true, false or 'auto'", self.norm_eval)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over every process: ``batch_size * world_size``."""
        return self.batch_size * self.world_size

    @property
    def effective_lr(self) -> float:
        """The rate SGD runs at: ``lr * global_batch / lr_reference_batch`` with linear
        scaling, else ``lr``."""
        if self.lr_scaling == "linear":
            return self.lr * self.global_batch / self.lr_reference_batch
        return self.lr

    @property
    def freeze_norm_stats(self) -> bool:
        """Whether BatchNorm statistics stay frozen in training when the model's statistics are
        estimated (``norm_eval`` resolved by the per-process batch size; a fresh model's are never
        frozen by auto)."""
        return self.freeze_norm_stats_at(self.batch_size)

    def freeze_norm_stats_at(self, norm_batch: int) -> bool:
        """:attr:`freeze_norm_stats` when BatchNorm sees ``norm_batch`` images per step (the
        global batch under ``SyncBatchNorm``)."""
        return norm_batch < NORM_EVAL_BATCH if self.norm_eval == "auto" else bool(self.norm_eval)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tuples as lists); ``TrainConfig.from_dict(d)`` restores it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: TrainConfig | dict[str, Any]) -> TrainConfig:
        """A config from :meth:`to_dict`'s form (or the config itself)."""
        if isinstance(d, TrainConfig):
            return d
        d = dict(d)
        for key in ("steps", "milestones"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class IterationPlan:
    """A schedule's positions in iterations: ``warmup`` iterations of warm-up, the step
    decay's ``boundaries`` (iteration indices from which one more ``gamma`` applies) and the
    cosine period ``t_max``."""

    warmup: int
    boundaries: tuple[int, ...]
    t_max: float


def iteration_plan(cfg: TrainConfig, total: int, per_epoch: int | None = None) -> IterationPlan:
    """Where ``cfg``'s warm-up and decay fall in a training of ``total`` iterations with
    ``per_epoch`` iterations per epoch (needed when a length is given in epochs)."""
    def iters_of(epochs: float, what: str) -> int:
        if per_epoch is None:
            raise ConfigError(f"training setting {what} counts epochs: the iterations per epoch are needed")
        return round(epochs * per_epoch)

    warm = cfg.warmup_iters if cfg.warmup_epochs is None else iters_of(cfg.warmup_epochs, "warmup_epochs")
    warm = min(warm, max(total - 1, 0))
    if cfg.milestones is None:
        bounds = tuple(int(s * total) for s in cfg.steps)
    elif cfg.decay_unit == "epoch":
        bounds = tuple(iters_of(m, "milestones") for m in cfg.milestones)
    else:
        bounds = tuple(round(m) for m in cfg.milestones)
    if cfg.cosine_t_max is None:
        t_max = float(max(total, 1))
    else:
        t_max = float(iters_of(cfg.cosine_t_max, "cosine_t_max")) if cfg.decay_unit == "epoch" else cfg.cosine_t_max
    return IterationPlan(warm, bounds, max(t_max, 1.0))


def lr_factor(it: int, total: int, cfg: TrainConfig, per_epoch: int | None = None) -> float:
    """Learning-rate multiplier (of :attr:`TrainConfig.effective_lr`) at iteration ``it`` of
    ``total``; ``per_epoch`` (iterations per epoch) converts lengths given in epochs."""
    plan = iteration_plan(cfg, total, per_epoch)
    f = 1.0
    if it < plan.warmup:
        a = it / plan.warmup
        if cfg.warmup_type == "linear":
            f = cfg.warmup_factor * (1 - a) + a
        elif cfg.warmup_type == "constant":
            f = cfg.warmup_factor
        else:  # exp, as Vega's WarmupScheduler: ratio ** (1 - it / warmup)
            f = cfg.warmup_factor ** (1 - a)
    if cfg.schedule == "cosine":
        floor = min(cfg.eta_min / cfg.lr, 1.0)
        f *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(it, total) / plan.t_max))
    else:
        f *= cfg.gamma ** sum(it >= b for b in plan.boundaries)
    return f


@dataclass(frozen=True)
class ReignitionSettings:
    """How a backbone is re-trained as a classifier and put back into its detector.

    Classification: ``epochs`` (0 = put the backbone back unchanged), ``batch_size``, SGD ``lr``
    (cosine decay), square input ``image_size`` (None = the source's default: 224 for a
    classification folder, 64 for object crops of a detection set) and ``seed`` (split, order,
    flips, samples). Back in the detector: BatchNorm statistics recalibrated on
    ``recalibrate_images`` detection training images (0 = off) in batches of
    ``detection_batch_size``, then ``head_iters`` iterations of FPN + heads fine-tuned with the
    backbone frozen (0 = off), at ``lr``.

    Two choices that keep the detector's features (measured on the demo; not config keys):
    the linear head is first fitted alone on the backbone's features for ``probe_iters`` L-BFGS
    iterations (0 = off), and with ``freeze_bn_stats`` the backbone's BatchNorms keep the
    detector's statistics (eval mode) while the classifier trains. ``clip_grad_norm`` caps the
    classifier's gradient norm (None = off): the fitted head is sharp (weight norm about 30 on
    the hard demo scenes), so unclipped gradients reach the frozen-statistics backbone 30x
    amplified, and on the hard scenes the loss went 64 -> 909 -> NaN within 12 steps; at 2.0 a
    serial candidate kept 99.3 % of its mAP (19.02 of 19.15) where the unclipped run kept 1 %
    (a 10-iteration warm-up instead kept 46 %)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    image_size: int | None = None
    seed: int = 0
    recalibrate_images: int = 64
    head_iters: int = 0
    detection_batch_size: int = 4
    probe_iters: int = 100
    freeze_bn_stats: bool = True
    clip_grad_norm: float | None = 2.0

    def __post_init__(self) -> None:
        checks.integer(self.epochs, "reignition epochs", 0)
        checks.integer(self.batch_size, "reignition batch_size", 1)
        checks.number(self.lr, "reignition lr", 0, open_lo=True)
        if self.image_size is not None:
            checks.integer(self.image_size, "reignition image_size", 16)
        checks.integer(self.recalibrate_images, "reignition recalibrate_images", 0)
        checks.integer(self.head_iters, "reignition head_iters", 0)
        checks.integer(self.detection_batch_size, "reignition detection_batch_size", 1)
        checks.integer(self.probe_iters, "reignition probe_iters", 0)
        checks.boolean(self.freeze_bn_stats, "reignition freeze_bn_stats")
        if self.clip_grad_norm is not None:
            checks.number(self.clip_grad_norm, "reignition clip_grad_norm", 0, open_lo=True)
