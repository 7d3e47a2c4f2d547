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
import math

import torch
from torch import nn

from ..data.coco import CocoDetection, make_loader
from ..utils import checks
from ..utils.errors import NonFiniteLossError, SpnasError
from .device import device_of

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
                   batch_size: int = 4, device: str | torch.device | None = None) -> list[float]:
    """Train ``detector`` for ``iters`` iterations on ``dataset`` (a training split) with every
    parameter outside ``backbone.body`` trainable and the serial backbone frozen: its weights
    take no step and its BatchNorms stay in eval mode (their statistics do not move). SGD with
    momentum 0.9, weight decay 1e-4 and a cosine decay from ``lr``; data order and the heads'
    sampling depend only on ``seed``. Returns the loss of each iteration; the model is left in
    eval mode."""
    iters = checks.integer(iters, "head_iters", 0)
    lr = checks.number(lr, "head fine-tune lr", 0, open_lo=True)
    if iters == 0:
        return []
    dev = device_of(device)
    body = detector.backbone.body
    params = [p for n, p in detector.named_parameters() if not n.startswith(BODY_PREFIX) and p.requires_grad]
    if not params:
        raise SpnasError("head fine-tune: the detector has no trainable parameter outside backbone.body")
    frozen = [(p, p.requires_grad) for p in body.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    losses: list[float] = []
    detector.to(dev)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            epoch = 0
            while len(losses) < iters:
                detector.train()
                body.eval()
                for images, targets in make_loader(dataset, batch_size, shuffle=True, seed=seed, epoch=epoch):
                    loss_terms = detector([im.to(dev) for im in images],
                                          [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets])
                    loss = sum(loss_terms.values())
                    if not math.isfinite(loss.item()):
                        raise NonFiniteLossError(f"non-finite head fine-tune loss at step {len(losses)}: {loss.item()}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    if len(losses) == iters:
                        break
                epoch += 1
    finally:
        for p, requires in frozen:
            p.requires_grad_(requires)
        detector.eval()
    log.info("FPN and heads fine-tuned for %d iteration(s) with the backbone frozen: loss %.3f -> %.3f",
             iters, losses[0], losses[-1])
    return losses
