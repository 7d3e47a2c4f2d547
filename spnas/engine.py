"""Training and evaluation loops for detectors (torchvision ``references/detection`` style).

``train(model, train_set, val_set, cfg, ckpt_dir)``: SGD with momentum and weight decay, linear
warm-up, step or cosine decay per iteration, optional gradient clipping, mixed precision and
``channels_last`` on CUDA, a data order fixed by ``(seed, epoch)``, a tqdm bar, ``last.pth``
(everything needed to resume: weights, optimizer, scheduler, RNG, history) and ``best.pth``
(weights with the best mAP), and resume from ``last.pth``. Resuming gives the same final
weights as an uninterrupted run on CPU.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .coco_eval import coco_metrics, to_coco_results
from .data import CocoDetection, make_loader
from .errors import ConfigError, SpnasError
from .faults import failpoint
from .io import CheckpointError, atomic_torch_save, load_checkpoint

log = logging.getLogger(__name__)


class NonFiniteLossError(SpnasError, FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Training schedule. ``iters`` (when set) overrides ``epochs``; ``steps`` are fractions of
    the total iterations where the learning rate is multiplied by ``gamma`` (step schedule)."""

    epochs: int = 3
    iters: Optional[int] = None
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "step"
    steps: tuple[float, ...] = (0.667, 0.889)
    gamma: float = 0.1
    clip_grad_norm: Optional[float] = None
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    workers: int = 0
    eval_every: int = 1
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, want: str) -> ConfigError:
            return ConfigError(f"training setting {key}={value!r} is invalid: {want}")
        if self.iters is None and (not isinstance(self.epochs, int) or self.epochs < 0):
            raise bad("epochs", self.epochs, "an integer >= 0")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 0):
            raise bad("iters", self.iters, "an integer >= 0")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "an integer >= 1")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", self.lr, "a positive number")
        if self.schedule not in ("step", "cosine"):
            raise bad("schedule", self.schedule, "'step' or 'cosine'")
        if any(not 0 < s <= 1 for s in self.steps):
            raise bad("steps", self.steps, "fractions in (0, 1]")
        self.steps = tuple(self.steps)


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


def _device_of(device: "str | torch.device | None") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SpnasError("device 'cuda' was asked for but no CUDA device is available")
    return d


def _batches_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


@torch.no_grad()
def predict(model: nn.Module, dataset: CocoDetection, device: "str | torch.device | None" = None,
            batch_size: int = 4, progress: bool = False) -> list[dict]:
    """COCO-format detections of ``model`` on every image of ``dataset``."""
    from tqdm import tqdm
    dev = _device_of(device)
    model.eval().to(dev)
    loader = make_loader(dataset, batch_size, shuffle=False)
    results: list[dict] = []
    for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, leave=False):
        outs = model([im.to(dev, non_blocking=True) for im in images])
        for out, tgt in zip(outs, targets):
            results.extend(to_coco_results(tgt["image_id"], out["boxes"].cpu(), out["scores"].cpu(),
                                           out["labels"].cpu(), dataset.label_to_cat))
    return results


def evaluate(model: nn.Module, dataset: CocoDetection, device: "str | torch.device | None" = None,
             batch_size: int = 4, progress: bool = False) -> dict[str, "float | None"]:
    """COCO box metrics of ``model`` on ``dataset`` (see :mod:`spnas.coco_eval`)."""
    return coco_metrics(dataset.coco, predict(model, dataset, device, batch_size, progress))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(model: nn.Module, train_set: CocoDetection, val_set: Optional[CocoDetection], cfg: TrainConfig,
          ckpt_dir: "str | Path", device: "str | torch.device | None" = None, resume: bool = True,
          progress: bool = False, trainable: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
    """Train ``model`` in place and return ``{"history", "best", "iters", "images", "seconds"}``.

    ``trainable(name)`` limits training to some parameters (``freeze_swap_keys``).
    A non-finite loss raises :class:`NonFiniteLossError` naming the step and the loss terms.
    """
    from tqdm import tqdm
    dev = _device_of(device)
    ckpt_dir = Path(ckpt_dir)
    cuda = dev.type == "cuda"
    torch.manual_seed(cfg.seed)
    model.to(dev)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for n, p in model.named_parameters() if p.requires_grad and (trainable is None or trainable(n))]
    if not params:
        raise SpnasError("no trainable parameters: check freeze_swap_keys / the model description")
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    per_epoch = _batches_per_epoch(len(train_set), cfg.batch_size)
    total = cfg.iters if cfg.iters is not None else cfg.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, cfg))
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    use_amp = cuda and cfg.amp
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    it, history, best = 0, [], {"mAP": -1.0, "iteration": None, "metrics": None}
    last = ckpt_dir / "last.pth"
    if resume and last.is_file():
        ck = load_checkpoint(last)
        try:
            model.load_state_dict(ck["model"], strict=True)
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(last)!r} cannot resume this training: {exc}") from None
        if ck.get("total") != total:
            raise CheckpointError(f"checkpoint {str(last)!r} was made for {ck.get('total')} iterations, "
                                  f"this training has {total}: use a fresh output folder")
        it, history, best = ck["iteration"], ck["history"], ck["best"]
        _set_rng_state(ck["rng"])
        log.info("resumed from %s at iteration %d/%d", last, it, total)

    def save_last() -> None:
        atomic_torch_save(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "iteration": it, "total": total, "history": history, "best": best,
                                 "rng": _rng_state(), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                                 for k, v in asdict(cfg).items()}})

    def run_eval() -> None:
        nonlocal best
        if val_set is None:
            return
        metrics = evaluate(model, val_set, dev, cfg.batch_size)
        history.append({"iteration": it, **metrics})
        log.info("iteration %d: mAP %.2f AP50 %.2f", it, metrics["mAP"], metrics["AP50"])
        if metrics["mAP"] > best["mAP"]:
            best = {"mAP": metrics["mAP"], "iteration": it, "metrics": metrics}
            atomic_torch_save(ckpt_dir / "best.pth", model.state_dict())

    t0, images_seen = time.perf_counter(), 0
    bar = tqdm(total=total, initial=it, desc="train", unit="it", disable=not progress, dynamic_ncols=True)
    while it < total:
        epoch, skip = divmod(it, per_epoch)
        model.train()
        loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, workers=cfg.workers)
        for b, (images, targets) in enumerate(loader):
            if b < skip:
                continue
            images = [im.to(dev, non_blocking=True) for im in images]
            targets = [{"boxes": t["boxes"].to(dev), "labels": t["labels"].to(dev)} for t in targets]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                terms = {k: round(float(v.detach()), 6) for k, v in losses.items()}
                raise NonFiniteLossError(f"non-finite loss at step {it}: {terms}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.clip_grad_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            failpoint("train_iter", f"(iteration {it}/{total})")
            images_seen += len(images)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
            end_of_epoch = it % per_epoch == 0 or it == total
            if end_of_epoch and cfg.eval_every and (it // per_epoch) % cfg.eval_every == 0 and it != total:
                run_eval()
            if it < total and (end_of_epoch or (cfg.checkpoint_every and it % cfg.checkpoint_every == 0)):
                save_last()  # the final checkpoint is written once, after the last evaluation
            if it >= total:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    if total == 0 or not history or history[-1]["iteration"] != it:
        run_eval()
    save_last()
    return {"history": history, "best": best, "iters": it, "images": images_seen, "seconds": seconds}
