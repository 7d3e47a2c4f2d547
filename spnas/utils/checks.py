"""One set of value checks for every setting the library reads (config keys, CLI options,
training, search and model settings, KFP parameters).

Each check returns the value in its canonical type or raises ``error`` (default
:class:`~spnas.utils.errors.ConfigError`) with one message shape::

    <where>: must be <what was expected>, got <the value, quoted briefly>

Integral floats are accepted where an integer is expected: KFP struct parameters deliver every
number as a float. Huge integers are compared, never converted to float, so ``10**400`` is
refused with a message instead of an ``OverflowError``.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError, brief


def fail(where: str, expected: str, value: Any, error: type[Exception] = ConfigError) -> Exception:
    """The error for ``value`` at ``where`` that should have been ``expected``."""
    return error(f"{where}: must be {expected}, got {brief(value)}")


def _bounds_text(kind: str, minimum: Any, maximum: Any) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    if maximum is not None:
        return f"{kind} <= {maximum}"
    return kind


def integer(value: Any, where: str, minimum: int | None = None, maximum: int | None = None,
            error: type[Exception] = ConfigError) -> int:
    """An ``int`` (not a bool) within ``[minimum, maximum]``; an integral float becomes an int."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    expected = _bounds_text("an integer", minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, expected, value, error)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise fail(where, expected, value, error)
    return value


def number(value: Any, where: str, lo: float | None = None, hi: float | None = None, open_lo: bool = False,
           error: type[Exception] = ConfigError) -> float:
    """A finite ``float`` within ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise fail(where, "a number", value, error)
    try:
        x = float(value)
    except OverflowError:  # an integer beyond the float range
        raise error(f"{where}: must be a number, got {brief(value)} (too large)") from None
    if not math.isfinite(x):
        raise fail(where, "a finite number", value, error)
    if (lo is not None and (x < lo or (open_lo and x == lo))) or (hi is not None and x > hi):
        left = "(" if open_lo else "["
        span = f"in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise fail(where, f"a number {span}", value, error)
    return x


def ratio(value: Any, where: str, error: type[Exception] = ConfigError) -> float:
    """A probability in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise fail(where, "a probability in [0, 1]", value, error)
    return float(value)


def boolean(value: Any, where: str, error: type[Exception] = ConfigError) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise fail(where, "true or false", value, error)
    return value


def one_of(value: Any, where: str, options: tuple[str, ...] | list[str],
           error: type[Exception] = ConfigError) -> str:
    """One of ``options`` (exact match)."""
    if not isinstance(value, str) or value not in options:
        raise fail(where, f"one of {', '.join(map(repr, options))}", value, error)
    return value
