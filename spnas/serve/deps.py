"""The ``serve`` extra's packages, imported with a one-line hint when they are missing.

``kserve`` parses ``sys.argv`` for its own flags when it is imported (``kserve.model_server``
runs ``parse_known_args`` at import time, kserve 0.21.0), so it is imported here with an
``argv`` of the program name alone: spnas's options never reach it.
"""
from __future__ import annotations

import sys
from types import ModuleType

from ..utils.errors import ServeError

HINT = "pip install 'spnas[serve]'"


def import_kserve() -> ModuleType:
    """The ``kserve`` package, or :class:`ServeError` naming the extra to install."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kserve
    except ImportError as exc:
        raise ServeError(f"serving needs the 'serve' extra ({exc}): {HINT}") from None
    finally:
        sys.argv = saved
    return kserve


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` package, or :class:`ServeError` naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ServeError(f"serving needs the 'serve' extra ({exc}): {HINT}") from None
    return onnxruntime
