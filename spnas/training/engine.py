"""The training loop for detectors, torchvision ``references/detection`` style.

:func:`train` is four steps, each a function of its own: :func:`restore` (from ``last.pth``),
:func:`train_one_epoch`, :func:`evaluate_and_keep_best` (writes ``best.pth``) and :func:`save`
(``last.pth``: weights, optimizer, scheduler, scaler, RNG, progress). SGD with momentum and
weight decay, linear warm-up, step or cosine decay per iteration, optional gradient clipping,
mixed precision and ``channels_last`` on CUDA, a data order fixed by ``(seed, epoch)``. Resuming
gives the same final weights as an uninterrupted run on CPU.

Data-parallel (:mod:`.distributed`): run inside a launch (torchrun sets ``WORLD_SIZE``), the
training joins the process group, wraps the model in ``DistributedDataParallel``, reads its
shard of every epoch (``DistributedSampler``), evaluates sharded, and keeps the ranks in step:
every rank takes the same decisions (evaluation, checkpoints, a non-finite loss) on the same
iterations, and rank 0 alone writes ``last.pth`` (holding every rank's RNG state) and
``best.pth``. A checkpoint resumes only with the world size it was made with.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.coco import CocoDetection, batches_per_epoch, make_loader
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..search.settings import quality_key
from ..utils.errors import CheckpointError, NonFiniteLossError, SpnasError
from ..utils.faults import failpoint
from . import distributed
from .device import device_of
from .evaluation import evaluate
from .schedule import TrainConfig, lr_factor

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """Everything one training carries from step to step (and ``last.pth`` holds)."""

    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    total: int
    per_epoch: int
    freeze_bn: bool = False  # BatchNorm statistics frozen in training (norm_eval, resolved)
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper that trains ``model`` (None: one process)
    ctx: distributed.DistContext = field(default_factory=distributed.DistContext)
    iteration: int = 0
    images: int = 0  # images trained on so far (resumes included)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: the best evaluation so far by the primary metric (box mAP; a semantic model's mIoU):
    #: ``{<metric>: value, "iteration", "metrics"}``
    best: dict[str, Any] = field(default_factory=lambda: {"iteration": None, "metrics": None})


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup(model: nn.Module, train_set: CocoDetection, cfg: TrainConfig, dev: torch.device,
          trainable: Callable[[str], bool] | None = None,
          ctx: distributed.DistContext | None = None) -> TrainingState:
    """Model on ``dev``, SGD over the trainable parameters, the per-iteration schedule and the
    grad scaler (fp16 only). ``trainable(name)`` limits training to some parameters (the others
    stop requiring gradients). ``ctx`` with ``world_size > 1`` (``cfg.world_size`` must match)
    wraps the model in ``DistributedDataParallel``."""
    ctx = ctx or distributed.DistContext()
    if cfg.world_size != ctx.world_size:
        raise SpnasError(f"the schedule is set for {cfg.world_size} process(es) but {ctx.world_size} train")
    model.to(dev)
    if dev.type == "cuda" and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in named if trainable is None or trainable(n)]
    if not params:
        raise SpnasError("no trainable parameters: check freeze_swap_keys / the model description")
    if trainable is not None:
        for n, p in named:
            if not trainable(n):
                p.requires_grad_(False)  # frozen: no gradient computed (and none for DDP to all-reduce)
    ddp = None
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.SGD(params, lr=cfg.effective_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    per_epoch = batches_per_epoch(len(train_set), cfg.batch_size, ctx.world_size)
    total = cfg.iters if cfg.iters is not None else cfg.epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, cfg, per_epoch))
    fp16 = dev.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    freeze = cfg.freeze_norm_stats_at(norm_batch(model, cfg)) and (cfg.norm_eval is True or statistics_estimated(model))
    return TrainingState(model, params, optimizer, scheduler, scaler, total, per_epoch, freeze, ddp=ddp, ctx=ctx)


def norm_batch(model: nn.Module, cfg: TrainConfig) -> int:
    """The batch BatchNorm sees in training: the global batch when the model's BatchNorms are
    synchronised across processes (``SyncBatchNorm``), else the per-process batch."""
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    return cfg.global_batch if synced else cfg.batch_size


def statistics_estimated(model: nn.Module) -> bool:
    """Whether most of ``model``'s BatchNorm layers hold estimated running statistics (not the
    initial mean 0 / variance 1): true for loaded or trained weights, false for a model fresh from
    its builder. ``norm_eval: auto`` freezes only estimated statistics; freezing a fresh model's
    would pin every BatchNorm to the identity and train it from scratch without normalisation."""
    bns = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats
           and m.running_mean is not None]
    if not bns:
        return False
    fresh = sum(1 for m in bns if not torch.any(m.running_mean) and torch.all(m.running_var == 1))
    return fresh * 2 < len(bns)


def restore(path: Path, st: TrainingState) -> bool:
    """Continue ``st`` from the checkpoint at ``path`` when it exists (weights, optimizer,
    scheduler, scaler, progress and this rank's RNG); a checkpoint of another model, schedule or
    world size raises :class:`CheckpointError`. Returns whether it resumed."""
    if not path.is_file():
        return False
    ck = load_checkpoint(path)
    try:
        st.model.load_state_dict(ck["model"], strict=True)
        st.optimizer.load_state_dict(ck["optimizer"])
        st.scheduler.load_state_dict(ck["scheduler"])
        st.scaler.load_state_dict(ck["scaler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot resume this training: {exc}") from None
    made = int(ck.get("world_size", 1))
    if made != st.ctx.world_size:
        raise CheckpointError(f"checkpoint {str(path)!r} was made by {made} process(es), this training runs "
                              f"{st.ctx.world_size}: resume with the same number of processes, or use a fresh "
                              "output folder")
    if ck.get("total") != st.total:
        raise CheckpointError(f"checkpoint {str(path)!r} was made for {ck.get('total')} iterations, "
                              f"this training has {st.total}: use a fresh output folder")
    st.iteration, st.history, st.best = ck["iteration"], ck["history"], ck["best"]
    st.images = int(ck.get("images", 0))
    st.freeze_bn = bool(ck.get("norm_eval", st.freeze_bn))  # decided once, at the start of the training
    rng = ck["rng"]
    _set_rng_state(rng["ranks"][st.ctx.rank] if "ranks" in rng else rng)
    log.info("resumed from %s at iteration %d/%d", path, st.iteration, st.total)
    return True


_checkpoint_listeners: ContextVar[tuple[Callable[[Path], None], ...]] = ContextVar("spnas_checkpoint_listeners",
                                                                                  default=())


@contextlib.contextmanager
def on_checkpoint(listener: Callable[[Path], None]) -> Iterator[None]:
    """Inside the block, ``listener(path)`` runs after every ``last.pth`` any training writes
    (e.g. to copy it off a pod that may be preempted). An exception in the listener stops the
    training: a checkpoint that cannot be kept must not be believed kept."""
    token = _checkpoint_listeners.set(_checkpoint_listeners.get() + (listener,))
    try:
        yield
    finally:
        _checkpoint_listeners.reset(token)


def save(path: Path, st: TrainingState, cfg: TrainConfig) -> None:
    """Write ``last.pth``: everything :func:`restore` needs (every rank's RNG state under DDP),
    the schedule (``config``), the world size and whether BatchNorm statistics were frozen
    (``norm_eval``, resolved); then tell the :func:`on_checkpoint` listeners. Every rank calls
    it (the RNG states are gathered); rank 0 alone writes."""
    rngs = distributed.all_gather(_rng_state())
    if not st.ctx.is_main:
        return
    save_checkpoint(path, {"model": st.model.state_dict(), "optimizer": st.optimizer.state_dict(),
                           "scheduler": st.scheduler.state_dict(), "scaler": st.scaler.state_dict(),
                           "iteration": st.iteration, "images": st.images, "total": st.total, "history": st.history,
                           "best": st.best, "rng": {"ranks": rngs} if st.ctx.distributed else rngs[0],
                           "config": cfg.to_dict(), "norm_eval": st.freeze_bn, "world_size": st.ctx.world_size})
    notify_checkpoint(Path(path))


def notify_checkpoint(path: Path) -> None:
    """Tell the :func:`on_checkpoint` listeners that ``path`` was (re)written."""
    for listener in _checkpoint_listeners.get():
        listener(path)


def evaluate_and_keep_best(st: TrainingState, val_set: CocoDetection | None, ckpt_dir: Path,
                           dev: torch.device, batch_size: int) -> None:
    """Evaluate on ``val_set`` (when given; sharded under DDP), append to the history and write
    ``best.pth`` (rank 0) when the mAP improved."""
    if val_set is None:
        return
    distributed.sync_buffers(st.model)  # every rank evaluates rank 0's model (the one saved)
    metrics = evaluate(st.model, val_set, dev, batch_size)
    st.history.append({"iteration": st.iteration, **metrics})
    key = quality_key(metrics)
    if st.ctx.is_main:
        log.info("iteration %d: %s %.2f%s", st.iteration, key, metrics[key],
                 f" AP50 {metrics['AP50']:.2f}" if "AP50" in metrics else "")
    if metrics[key] > st.best.get(key, -1.0):
        st.best = {key: metrics[key], "iteration": st.iteration, "metrics": metrics}
        if st.ctx.is_main:
            save_checkpoint(ckpt_dir / "best.pth", st.model.state_dict())


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def set_norm_eval(model: nn.Module) -> int:
    """Put every BatchNorm of ``model`` in eval mode (running statistics frozen; its affine
    weight and bias still train) and return how many there are. Call after ``model.train()``."""
    bns = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    for m in bns:
        m.eval()
    return len(bns)


def loader_workers(cfg: TrainConfig, dev: torch.device, world_size: int = 1) -> int:
    """Data-loader processes: ``cfg.workers`` when set; else 0 on CPU (the training uses the
    cores) and up to 4 per process on CUDA (the CPU cores shared among the processes)."""
    if cfg.workers is not None:
        return cfg.workers
    if dev.type != "cuda":
        return 0
    import os
    return max(0, min(4, (os.cpu_count() or 1) // max(1, world_size) - 1))


def train_one_epoch(st: TrainingState, train_set: CocoDetection, cfg: TrainConfig, dev: torch.device,
                    on_step: Callable[[float, bool], None]) -> int:
    """Train from ``st.iteration`` to the end of its epoch (or of the schedule). After every
    step ``on_step(loss, end_of_epoch)`` runs (evaluation, checkpoints, progress; ``loss`` is
    the mean over the ranks); a non-finite loss on any rank raises :class:`NonFiniteLossError`
    on every rank, naming the step and the loss terms. Returns the number of images this
    process saw."""
    epoch, skip = divmod(st.iteration, st.per_epoch)
    amp = dev.type == "cuda" and cfg.amp
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    st.model.train()
    if st.freeze_bn:
        set_norm_eval(st.model)
    net = st.ddp if st.ddp is not None else st.model
    loader = make_loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                         workers=loader_workers(cfg, dev, st.ctx.world_size),
                         pin_memory=dev.type == "cuda" and cfg.pin_memory, rank=st.ctx.rank,
                         world_size=st.ctx.world_size)
    seen = 0
    for b, (images, targets) in enumerate(loader):
        if b < skip:  # resuming mid-epoch: the same order, the done batches skipped
            continue
        images = [im.to(dev, non_blocking=True) for im in images]
        targets = [{k: t[k].to(dev) for k in ("boxes", "labels", "masks", "sem_seg") if k in t} for t in targets]
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp):
            losses = net(images, targets)
        loss = sum(losses.values())
        mean_loss = distributed.mean_across(loss.detach()).item()
        if not math.isfinite(mean_loss):  # the same decision on every rank: none is left waiting
            terms = {k: round(float(v.detach()), 6) for k, v in losses.items()}
            where = f" (rank {st.ctx.rank} of {st.ctx.world_size})" if st.ctx.distributed else ""
            raise NonFiniteLossError(f"non-finite loss at step {st.iteration}: {terms}{where}")
        st.optimizer.zero_grad(set_to_none=True)
        st.scaler.scale(loss).backward()
        if cfg.clip_grad_norm:
            st.scaler.unscale_(st.optimizer)
            nn.utils.clip_grad_norm_(st.params, cfg.clip_grad_norm)
        st.scaler.step(st.optimizer)
        st.scaler.update()
        st.scheduler.step()
        st.iteration += 1
        st.images += len(images) * st.ctx.world_size
        failpoint("train_iter", f"(iteration {st.iteration}/{st.total})")
        seen += len(images)
        end_of_epoch = st.iteration % st.per_epoch == 0 or st.iteration == st.total
        on_step(mean_loss, end_of_epoch)
        if end_of_epoch:
            break
    return seen


def train(model: nn.Module, train_set: CocoDetection, val_set: CocoDetection | None, cfg: TrainConfig,
          ckpt_dir: str | Path, device: str | torch.device | None = None, resume: bool = True,
          progress: bool = False, trainable: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Train ``model`` in place and return ``{"history", "best", "iters", "images", "seconds",
    "trainable", "world_size", "global_batch"}`` (``images`` and ``iters`` count the whole
    training over every process, resumes included; ``seconds`` this call's; ``trainable``: the
    number of parameter elements the optimizer updates).

    Inside a torchrun launch the training is data-parallel over the launch's processes (see the
    module docstring); ``cfg.batch_size`` is per process and the lr follows the global batch.

    Args:
        model: a detector (``build_detector``), trained in place.
        train_set, val_set: COCO splits; ``val_set`` None skips evaluation.
        cfg: the schedule.
        ckpt_dir: where ``last.pth`` and ``best.pth`` go.
        device: ``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available); under DDP on CUDA
            each rank takes ``cuda:LOCAL_RANK``.
        resume: continue from ``ckpt_dir/last.pth`` when it exists.
        progress: show a tqdm bar (rank 0).
        trainable: ``trainable(name)`` limits training to some parameters.
    """
    from tqdm import tqdm
    base = device_of(device)
    with distributed.process_group(base) as ctx:
        dev = distributed.rank_device(base, ctx)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        cfg = replace(cfg, world_size=ctx.world_size)
        ckpt_dir = Path(ckpt_dir)
        last = ckpt_dir / "last.pth"
        torch.manual_seed(distributed.rank_seed(cfg.seed, ctx.rank))
        st = setup(model, train_set, cfg, dev, trainable, ctx)
        if resume:
            restore(last, st)
        if ctx.is_main:
            log.info("norm_eval %r: BatchNorm statistics %s in training (batch size %d per process, %d process(es))",
                     cfg.norm_eval, "frozen" if st.freeze_bn else "updated", cfg.batch_size, ctx.world_size)

        bar = tqdm(total=st.total, initial=st.iteration, desc="train", unit="it",
                   disable=not progress or not ctx.is_main, dynamic_ncols=True)

        def on_step(loss: float, end_of_epoch: bool) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{st.optimizer.param_groups[0]['lr']:.4g}")
            it = st.iteration
            if end_of_epoch and cfg.eval_every and (it // st.per_epoch) % cfg.eval_every == 0 and it != st.total:
                evaluate_and_keep_best(st, val_set, ckpt_dir, dev, cfg.batch_size)
            if it < st.total and (end_of_epoch or (cfg.checkpoint_every and it % cfg.checkpoint_every == 0)):
                save(last, st, cfg)  # the final checkpoint is written once, after the last evaluation

        t0, images_seen = time.perf_counter(), 0
        while st.iteration < st.total:
            images_seen += train_one_epoch(st, train_set, cfg, dev, on_step)
        bar.close()
        seconds = time.perf_counter() - t0
        distributed.sync_buffers(st.model)  # the ranks end with one model: rank 0's
        if st.total == 0 or not st.history or st.history[-1]["iteration"] != st.iteration:
            evaluate_and_keep_best(st, val_set, ckpt_dir, dev, cfg.batch_size)
        save(last, st, cfg)
        if st.ddp is not None:
            st.ddp = None  # the wrapper holds the process group: drop it before the group goes
        return {"history": st.history, "best": st.best, "iters": st.iteration, "images": st.images,
                "images_this_call": images_seen * ctx.world_size, "seconds": seconds,
                "trainable": sum(p.numel() for p in st.params), "norm_eval": st.freeze_bn,
                "world_size": ctx.world_size, "global_batch": cfg.global_batch}
