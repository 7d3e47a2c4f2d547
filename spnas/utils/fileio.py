"""Atomic writes and safe JSON reads of the files a run produces (no torch here).

Every file is written to a temporary file in the same folder, flushed, fsync'ed and renamed
over the target: a crash leaves the old file or the new one, never half of one. ``mode`` sets the
permissions from creation on (default 0600, owner only, as ``tempfile.mkstemp`` creates files).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import SpnasError
from .faults import failpoint


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], mode: int = 0o600,
                 fsync: bool = True) -> Path:
    """Write ``path`` through ``write(fh)`` atomically: temp file (``mode``), flush, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        failpoint("write", str(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o600, fsync: bool = True) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), mode, fsync)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o600) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, mode: int = 0o600, fsync: bool = True) -> Path:
    """``obj`` as indented JSON (NaN refused: it is not JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"), mode, fsync)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`SpnasError` naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise SpnasError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpnasError(f"{what} {str(path)!r} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SpnasError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None
