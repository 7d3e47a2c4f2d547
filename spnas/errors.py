"""Typed errors of the spnas library.

Every error the library raises on purpose derives from :class:`SpnasError`; the ones about
malformed input also derive from :class:`ValueError`, so callers may catch either.
"""
from __future__ import annotations


class SpnasError(Exception):
    """Base class of every error raised on purpose by spnas."""


class CodeError(SpnasError, ValueError):
    """A serial or parallel architecture code is malformed or out of bounds."""


class DescError(SpnasError, ValueError):
    """A model description (``desc`` dict) has an unknown key or a bad value."""


class ConversionError(SpnasError, ValueError):
    """A checkpoint does not map onto the model (lists the tensors that do not fit)."""


class InheritanceError(SpnasError, ValueError):
    """A child architecture cannot inherit weights from the given parent."""


class ConfigError(SpnasError, ValueError):
    """A setting (command-line option, training setting, config key) has an invalid value."""


def brief(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting hostile input in messages."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit cannot even be shown
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
