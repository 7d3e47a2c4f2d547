"""Data-parallel training across processes (``torch.distributed``), launched by torchrun.

The processes of one training (ranks) are started by ``torch.distributed.run``, the engine
behind ``torchrun``: on one machine by :func:`launch` (``spnas train --nproc N``, ``spnas run
--nproc N``, a pod with several GPUs), on several by Kubeflow Trainer's ``torch-distributed``
runtime. Each rank finds its place in the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`process_group` joins the group (NCCL on
CUDA, gloo on CPU) for the length of a training.

Contracts the engine keeps under DDP (see :mod:`.engine`): every rank starts from the same
weights; the data order is the single-process order (``DistributedSampler`` seeded like the
single-process loader), so the ranks' batches of a step together are exactly the images of one
single-process step at ``world_size`` times the batch; rank ``r`` draws its random numbers from
its own stream (:func:`rank_seed`); rank 0 alone writes files and shows progress.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..utils.errors import ConfigError, SpnasError

log = logging.getLogger(__name__)


class LaunchFailed(SpnasError):
    """A distributed launch ended without a result (a rank failed or was killed)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in its training: ``rank`` of ``world_size`` processes,
    ``local_rank`` on its machine (its GPU index)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and logs progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def env_context() -> DistContext:
    """The place torchrun's environment gives this process (world size 1 outside torchrun)."""
    return DistContext(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def in_launch() -> bool:
    """Whether this process is one rank of a multi-process launch."""
    return env_context().distributed


def current() -> DistContext:
    """This process's place: from the initialised process group, else (world size 1) a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistContext()


def is_main() -> bool:
    """True outside a process group and on rank 0 of one."""
    return current().is_main


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA training under DDP, else ``device``."""
    if device.type == "cuda" and ctx.distributed:
        return torch.device("cuda", ctx.local_rank)
    return device


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random stream (sampling inside the model): the run's ``seed``
    on rank 0 (a single process draws what rank 0 draws), distinct for every (seed, rank) pair
    with ``0 <= seed < 2**32``."""
    return seed + rank * 2 ** 32


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (torchrun's agent) dies (Linux;
    elsewhere nothing). torchrun starts each rank in a session of its own, so killing the
    launching process group (a pod's training child cut at its time limit) would otherwise leave
    the ranks training on as orphans."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the rank merely outlives a killed agent
        return
    if os.getppid() == 1:  # the agent died before the call: follow it now
        os._exit(1)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistContext]:
    """Join the process group torchrun's environment describes for the block (NCCL when
    ``device`` is CUDA, gloo on CPU) and leave it afterwards; outside a launch (or when a group
    is already initialised by the caller) nothing changes. Yields this process's context."""
    env = env_context()
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise SpnasError("this torch build has no torch.distributed: data-parallel training is not possible")
    die_with_parent()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend)
    log.debug("rank %d of %d joined the %s process group", env.rank, env.world_size, backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if current().distributed:
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    ctx = current()
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics): DDP sends them
    before each forward, so after the last step each rank holds its own batch's update; this
    makes the ranks evaluate and save one model (rank 0's, as in its checkpoint)."""
    if not current().distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (a copy; the tensor itself in a single process)."""
    ctx = current()
    if not ctx.distributed:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / ctx.world_size


def check_nproc(nproc: Any, where: str = "--nproc") -> int:
    """``nproc`` as a positive int, or :class:`ConfigError` naming ``where``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"{where} must be a positive integer (processes of one training), got {nproc!r}")
    return nproc


def check_devices(nproc: int, device: torch.device) -> None:
    """Refuse more processes than GPUs for a CUDA training (one process per GPU)."""
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); one process per "
                          "GPU at most")


def launch_argv(nproc: int, module_args: Sequence[str]) -> list[str]:
    """The command that runs ``python <module_args>`` as ``nproc`` ranks on this machine
    through ``torch.distributed.run`` (torchrun's engine; a free port is chosen by
    ``--standalone``)."""
    check_nproc(nproc)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *module_args]


def launch(nproc: int, module_args: Sequence[str], *, watch: Path | None = None,
           on_change: Callable[[Path], None] | None = None, what: str = "training", poll: float = 0.5) -> None:
    """Run ``module_args`` as ``nproc`` ranks (:func:`launch_argv`) and wait; a failed launch
    raises :class:`LaunchFailed` naming the exit status. While it runs, ``on_change(watch)``
    is called each time the file ``watch`` is replaced (ranks write checkpoints atomically, so
    every version seen is whole) and once more at the end if it changed: the in-process
    checkpoint listeners of the launching process keep working for a training in other
    processes. An exception from ``on_change`` stops the launch and propagates."""
    argv = launch_argv(nproc, module_args)
    log.info("%s: launching %d processes: %s", what, nproc, " ".join(argv[1:]))
    seen = _stamp(watch)
    # the launch stays in this process group: whoever stops this process's group (a pod's
    # training child cut at its time limit, Ctrl-C) stops the ranks too
    proc = subprocess.Popen(argv)
    try:
        while True:
            try:
                rc = proc.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                rc = None
            stamp = _stamp(watch)
            if watch is not None and on_change is not None and stamp is not None and stamp != seen:
                seen = stamp
                on_change(watch)
            if rc is not None:
                break
    except BaseException:
        _stop(proc)
        raise
    if rc != 0:
        raise LaunchFailed(f"{what}: the distributed launch of {nproc} processes exited with status {rc} "
                           "(the failing rank's error is above in the log)")


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launch: SIGTERM (torchrun's agent then stops its ranks), SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings only (one voice per training)."""
    if not env_context().is_main:
        logging.getLogger("spnas").setLevel(logging.WARNING)
