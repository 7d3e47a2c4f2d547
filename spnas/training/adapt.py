"""Adapting a detector to a backbone that changed outside it (reignition puts back a backbone
re-trained as a classifier).

:func:`recalibrate_bn` re-estimates every BatchNorm's running statistics on detection images,
seen exactly as the detector sees them (its own transform: same normalisation, same resize);
nothing else changes. :func:`finetune_heads` trains everything but the serial backbone (FPN,
parallel connections, RPN and RoI heads) for a few iterations, the backbone frozen (its weights
and its BN statistics).
"""
from __future__ import annotations

import logging
import tempfile

import torch
from torch import nn

from ..data.coco import CocoDetection
from ..utils import checks
from .device import device_of
from .engine import train
from .schedule import TrainConfig

log = logging.getLogger(__name__)

#: Parameter names of the serial backbone inside a detector.
BODY_PREFIX = "backbone.body."


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that track running statistics (``FrozenBatchNorm2d`` is not one)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """``min(k, n)`` distinct indices of ``range(n)`` drawn with ``seed``, in increasing order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    return sorted(order.tolist())


@torch.no_grad()
def recalibrate_bn(detector: nn.Module, dataset: CocoDetection, images: int, *, seed: int = 0,
                   batch_size: int = 4, device: str | torch.device | None = None) -> int:
    """Re-estimate the running mean and variance of every BatchNorm of ``detector`` (a
    torchvision ``GeneralizedRCNN``) from ``images`` images of ``dataset`` (a seeded sample; all
    of them when it has fewer), in place. Each batch goes through ``detector.transform`` (the
    detector's normalisation and resize, as at evaluation) and ``detector.backbone`` with only
    the BatchNorms in train mode, momentum ``None`` (a cumulative average over the batches) and
    no gradient. Weights and every other buffer stay as they were; the model is left in eval
    mode. Returns the number of images used (0 when ``images`` is 0 or there is no BatchNorm)."""
    images = checks.integer(images, "recalibrate_images", 0)
    batch_size = checks.integer(batch_size, "recalibration batch_size", 1)
    norms = batch_norms(detector)
    if images == 0 or not norms:
        return 0
    dev = device_of(device)
    chosen = sample_indices(len(dataset), images, seed)
    momenta = [m.momentum for m in norms]
    detector.to(dev).eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for start in range(0, len(chosen), batch_size):
            batch = [dataset[i][0].to(dev) for i in chosen[start:start + batch_size]]
            image_list, _ = detector.transform(batch)
            detector.backbone(image_list.tensors)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        detector.eval()
    log.info("BatchNorm statistics of %d layer(s) recalibrated on %d detection image(s)", len(norms), len(chosen))
    return len(chosen)


def finetune_heads(detector: nn.Module, dataset: CocoDetection, iters: int, lr: float, *, seed: int = 0,
                   batch_size: int = 4, device: str | torch.device | None = None) -> int:
    """Train ``detector`` for ``iters`` iterations on ``dataset`` (a training split) with every
    parameter outside ``backbone.body`` trainable and the serial backbone frozen, through the
    training engine (:func:`~spnas.training.engine.train` with its ``trainable`` predicate):
    SGD with momentum 0.9, weight decay 1e-4, a cosine decay from ``lr`` (no warm-up, no lr
    scaling) and every BatchNorm's statistics frozen (``norm_eval``). Data order and the heads'
    sampling depend only on ``seed``. Returns the number of iterations trained; the model is left
    in eval mode."""
    iters = checks.integer(iters, "head_iters", 0)
    lr = checks.number(lr, "head fine-tune lr", 0, open_lo=True)
    if iters == 0:
        return 0
    cfg = TrainConfig(iters=iters, batch_size=batch_size, lr=lr, lr_scaling="none", warmup_iters=0,
                      schedule="cosine", seed=seed, norm_eval=True, eval_every=0)
    with tempfile.TemporaryDirectory(prefix="spnas-heads-") as tmp:
        result = train(detector, dataset, None, cfg, tmp, device=device, resume=False,
                       trainable=lambda name: not name.startswith(BODY_PREFIX))
    detector.eval()
    log.info("FPN and heads fine-tuned for %d iteration(s) with the backbone frozen", result["iters"])
    return int(result["iters"])
