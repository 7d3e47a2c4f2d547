"""Atomic writes and safe loading of the files a run produces.

Every file is written to a temporary file in the same folder, flushed, fsync'ed and renamed
over the target: a crash leaves the old file or the new one, never half of one. Checkpoints are
untrusted input and are only ever read with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

from .errors import SpnasError
from .faults import failpoint


class CheckpointError(SpnasError, ValueError):
    """A weights file is missing, unreadable, not a safe checkpoint or for another model."""


def _atomic(path: "str | os.PathLike", write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        failpoint("write", str(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: "str | os.PathLike", data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data))


def atomic_write_text(path: "str | os.PathLike", text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: "str | os.PathLike", obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(path: "str | os.PathLike", obj: Any) -> Path:
    return _atomic(path, lambda fh: torch.save(obj, fh))


def read_json(path: "str | os.PathLike", what: str = "file") -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`SpnasError` naming it."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise SpnasError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpnasError(f"{what} {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SpnasError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


def load_checkpoint(path: "str | os.PathLike") -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``; anything that is not a
    plain tensor checkpoint is refused with :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, unsafe globals...
        raise CheckpointError(
            f"weights file {str(path)!r} is not a safe PyTorch checkpoint (loaded with weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_state_fits(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state`` that does not fit
    ``model`` (missing, unexpected or of another shape)."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            if name.endswith("num_batches_tracked"):
                continue
            raise CheckpointError(f"{source} belongs to another architecture: tensor {name!r} is missing")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source} belongs to another architecture: tensor {name!r} has shape "
                f"{tuple(state[name].shape)}, the model expects {tuple(tensor.shape)}")
    for name in state:
        if name not in expected:
            raise CheckpointError(f"{source} belongs to another architecture: unexpected tensor {name!r}")
