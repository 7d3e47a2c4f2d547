"""One architecture's training (or reignition) as a data-parallel launch (torchrun's processes).

:func:`train_launched` is what ``train_architecture(..., nproc=N)`` does on one machine: it
writes the call to a JSON file, runs ``python -m torch.distributed.run --standalone
--nproc-per-node N -m spnas.training.launch CALL.json RESULT.json`` and returns rank 0's
result. The same entry point serves any launcher that sets torchrun's environment, Kubeflow
Trainer's ``torch-distributed`` runtime included (``torchrun -m spnas.training.launch CALL
RESULT`` with the files on a volume every node mounts)::

    python -m spnas.training.launch CALL.json RESULT.json   # run by every rank

Every rank reads CALL.json and trains (:func:`~.architecture.train_architecture`, or
:func:`~.reignite.reignite` for a reignition call; both join the process group); rank 0 writes
RESULT.json (the performance dict) atomically.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..data.source import CocoSource
from ..utils.errors import SpnasError
from ..utils.fileio import atomic_write_json, read_json
from . import distributed
from .schedule import ReignitionSettings, TrainConfig

log = logging.getLogger(__name__)

#: The call file's format version (a launcher of another version is refused).
CALL_VERSION = 1


def write_call(path: str | os.PathLike, *, desc: Mapping[str, Any] | None, data: CocoSource,
               out_dir: str | os.PathLike, cfg: TrainConfig, arch_id: int | str = 0,
               init: str | os.PathLike | None = None, trainable: Collection[str] | None = None,
               device: str | None = None, resume: bool = True, progress: bool = False,
               **desc_overrides: Any) -> Path:
    """Write the call of one training (the keywords of ``train_architecture``) as JSON.
    ``init`` is a weights file (a state dict in memory must be saved first); ``trainable`` the
    names of the parameters that train (a predicate cannot cross processes)."""
    if trainable is not None and (callable(trainable) or isinstance(trainable, str)):
        raise SpnasError("a data-parallel training needs the trainable parameters as a collection of names, "
                         "not a predicate")
    call = {"version": CALL_VERSION, "function": "train_architecture",
            "desc": dict(desc) if desc is not None else None, "data": asdict(data),
            "out_dir": str(out_dir), "cfg": cfg.to_dict(), "arch_id": arch_id,
            "init": None if init is None else str(init),
            "trainable": None if trainable is None else sorted(trainable), "device": device, "resume": resume,
            "progress": progress, "desc_overrides": {k: v for k, v in desc_overrides.items() if v is not None}}
    return atomic_write_json(path, call)


def read_call(path: str | os.PathLike) -> dict[str, Any]:
    """The keywords of ``train_architecture`` from a call file (:func:`write_call`)."""
    call = read_json(path, "training call")
    if not isinstance(call, dict) or call.get("version") != CALL_VERSION:
        raise SpnasError(f"training call {str(path)!r} is not a version {CALL_VERSION} call of this spnas")
    return {"desc": call["desc"], "data": CocoSource(**call["data"]), "out_dir": call["out_dir"],
            "cfg": TrainConfig.from_dict(call["cfg"]), "arch_id": call["arch_id"], "init": call["init"],
            "trainable": call["trainable"], "device": call["device"], "resume": call["resume"],
            "progress": call["progress"], **call["desc_overrides"]}


def write_reignite_call(path: str | os.PathLike, *, desc: Mapping[str, Any], weights: str | os.PathLike,
                        out_dir: str | os.PathLike, settings: ReignitionSettings,
                        folder: str | os.PathLike | None = None, detection: CocoSource | None = None,
                        arch_id: int | str = 0, device: str | None = None, progress: bool = False) -> Path:
    """Write the call of one reignition (the keywords of ``reignite``) as JSON."""
    call = {"version": CALL_VERSION, "function": "reignite", "desc": dict(desc), "weights": str(weights),
            "out_dir": str(out_dir), "settings": asdict(settings), "folder": None if folder is None else str(folder),
            "detection": None if detection is None else asdict(detection), "arch_id": arch_id, "device": device,
            "progress": progress}
    return atomic_write_json(path, call)


def _read_reignite_call(call: Mapping[str, Any]) -> dict[str, Any]:
    return {"desc": call["desc"], "weights": call["weights"], "out_dir": call["out_dir"],
            "settings": ReignitionSettings(**call["settings"]), "folder": call["folder"],
            "detection": None if call["detection"] is None else CocoSource(**call["detection"]),
            "arch_id": call["arch_id"], "device": call["device"], "progress": call["progress"]}


def rank_command(call: str | os.PathLike, result: str | os.PathLike) -> list[str]:
    """The arguments of a rank (after ``torchrun`` or ``python -m torch.distributed.run ...``)."""
    return ["-m", __name__, str(call), str(result)]


def train_launched(nproc: int, desc: Mapping[str, Any] | None, data: CocoSource, out_dir: str | os.PathLike,
                   cfg: TrainConfig, *, arch_id: int | str = 0, init: str | os.PathLike | Mapping | None = None,
                   trainable: Callable[[str], bool] | Collection[str] | None = None, device: str | None = None,
                   resume: bool = True, progress: bool = False, **desc_overrides: Any) -> dict[str, Any]:
    """``train_architecture`` as ``nproc`` data-parallel processes on this machine; returns
    rank 0's performance dict. A state dict ``init`` is saved to a temporary file first. The
    launching process's checkpoint listeners (``engine.on_checkpoint``) hear every ``last.pth``
    the ranks write. A failed rank raises :class:`~.distributed.LaunchFailed`."""
    from ..models.checkpoint import save_checkpoint
    from .device import device_of
    from .engine import notify_checkpoint
    distributed.check_devices(nproc, device_of(device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spnas-launch-") as tmp:
        if isinstance(init, Mapping):
            init = save_checkpoint(Path(tmp) / "init.pth", dict(init))
        call, result = Path(tmp) / "call.json", Path(tmp) / "result.json"
        write_call(call, desc=desc, data=data, out_dir=out.resolve(), cfg=cfg, arch_id=arch_id, init=init,
                   trainable=trainable, device=device, resume=resume, progress=progress, **desc_overrides)
        distributed.launch(nproc, rank_command(call, result), watch=out.resolve() / f"train_{arch_id}" / "last.pth",
                           on_change=notify_checkpoint, what=f"architecture {arch_id}")
        if not result.is_file():
            raise distributed.LaunchFailed(f"architecture {arch_id}: the launch ended without rank 0's result")
        return read_json(result, "training result")


def reignite_launched(nproc: int, desc: Mapping[str, Any], weights: str | os.PathLike | Mapping,
                      out_dir: str | os.PathLike, settings: ReignitionSettings, *,
                      folder: str | os.PathLike | None = None, detection: CocoSource | None = None,
                      arch_id: int | str = 0, device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """``reignite`` as ``nproc`` data-parallel processes on this machine; rank 0's result."""
    from ..models.checkpoint import save_checkpoint
    from .device import device_of
    distributed.check_devices(nproc, device_of(device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="spnas-launch-") as tmp:
        if isinstance(weights, Mapping):
            weights = save_checkpoint(Path(tmp) / "weights.pth", dict(weights))
        call, result = Path(tmp) / "call.json", Path(tmp) / "result.json"
        write_reignite_call(call, desc=desc, weights=weights, out_dir=out.resolve(), settings=settings,
                            folder=folder, detection=detection, arch_id=arch_id, device=device, progress=progress)
        distributed.launch(nproc, rank_command(call, result), what=f"reignition of {arch_id}")
        if not result.is_file():
            raise distributed.LaunchFailed(f"reignition of {arch_id}: the launch ended without rank 0's result")
        return read_json(result, "reignition result")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        sys.stderr.write("usage: torchrun [options] -m spnas.training.launch CALL.json RESULT.json\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    distributed.quiet_other_ranks()
    raw = read_json(args[0], "training call")
    if isinstance(raw, dict) and raw.get("function") == "reignite" and raw.get("version") == CALL_VERSION:
        from .reignite import reignite
        perf = reignite(**_read_reignite_call(raw))
    else:
        from .architecture import train_architecture
        perf = train_architecture(**read_call(args[0]))
    if distributed.env_context().is_main:
        atomic_write_json(args[1], perf)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpnasError as exc:
        sys.stderr.write(f"spnas.training.launch: error: {exc}\n")
        sys.exit(2)
