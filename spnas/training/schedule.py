"""Training settings and the learning-rate schedule. No torch: config parsing and the Kubeflow
components validate settings without importing the model stack."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..utils import checks

#: ``norm_eval: auto`` freezes BatchNorm statistics below this per-process batch size.
NORM_EVAL_BATCH = 16


@dataclass
class TrainConfig:
    """A training schedule, validated on creation (an impossible value raises
    :class:`~spnas.utils.errors.ConfigError` naming the setting).

    ``iters`` (when set) overrides ``epochs``; ``steps`` are fractions of the total iterations
    where the learning rate is multiplied by ``gamma`` (step schedule); ``warmup_iters`` of linear
    warm-up from ``warmup_factor`` x lr. ``amp``/``channels_last`` apply on CUDA only.
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
    norm_eval: bool | str = "auto"

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
        if not isinstance(self.norm_eval, bool) and self.norm_eval != "auto":
            raise checks.fail(where("norm_eval"), "true, false or 'auto'", self.norm_eval)

    @property
    def freeze_norm_stats(self) -> bool:
        """Whether BatchNorm statistics stay frozen in training when the model's statistics are
        estimated (``norm_eval`` resolved by batch size; a fresh model's are never frozen by auto)."""
        return self.batch_size < NORM_EVAL_BATCH if self.norm_eval == "auto" else bool(self.norm_eval)

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
    """How a backbone is re-trained as a classifier: ``epochs`` (0 = put the backbone back
    unchanged), ``batch_size``, SGD ``lr`` (cosine decay), square crop ``image_size`` and
    ``seed`` (split, order and flips)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    image_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        checks.integer(self.epochs, "reignition epochs", 0)
        checks.integer(self.batch_size, "reignition batch_size", 1)
        checks.number(self.lr, "reignition lr", 0, open_lo=True)
        checks.integer(self.image_size, "reignition image_size", 16)
