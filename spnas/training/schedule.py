"""Training settings and the learning-rate schedule. No torch: config parsing and the Kubeflow
components validate settings without importing the model stack."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..utils import checks


@dataclass
class TrainConfig:
    """A training schedule, validated on creation (an impossible value raises
    :class:`~spnas.utils.errors.ConfigError` naming the setting).

    ``iters`` (when set) overrides ``epochs``; ``steps`` are fractions of the total iterations
    where the learning rate is multiplied by ``gamma`` (step schedule); ``warmup_iters`` of linear
    warm-up from ``warmup_factor`` x lr. ``amp``/``channels_last`` apply on CUDA only."""

    epochs: int = 3
    iters: int | None = None
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "step"
    steps: tuple[float, ...] = (0.667, 0.889)
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    workers: int = 0
    eval_every: int = 1
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        def where(key: str) -> str:
            return f"training setting {key}"
        if self.iters is None:
            self.epochs = checks.integer(self.epochs, where("epochs"), 0)
        else:
            self.iters = checks.integer(self.iters, where("iters"), 0)
        self.batch_size = checks.integer(self.batch_size, where("batch_size"), 1)
        self.lr = checks.number(self.lr, where("lr"), 0, open_lo=True)
        self.schedule = checks.one_of(self.schedule, where("schedule"), ("step", "cosine"))
        steps = tuple(self.steps)
        if any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in steps):
            raise checks.fail(where("steps"), "fractions in (0, 1]", steps)
        self.steps = steps

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``steps`` as a list); ``TrainConfig.from_dict(d)`` restores it."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: TrainConfig | dict[str, Any]) -> TrainConfig:
        """A config from :meth:`to_dict`'s form (or the config itself)."""
        if isinstance(d, TrainConfig):
            return d
        d = dict(d)
        if "steps" in d:
            d["steps"] = tuple(d["steps"])
        return cls(**d)


def lr_factor(it: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at iteration ``it`` of ``total``."""
    warm = min(cfg.warmup_iters, max(total - 1, 0))
    f = 1.0
    if it < warm:
        a = it / warm
        f = cfg.warmup_factor * (1 - a) + a
    if cfg.schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
    else:
        f *= cfg.gamma ** sum(it >= int(s * total) for s in cfg.steps)
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
    detector's statistics (eval mode) while the classifier trains."""

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
