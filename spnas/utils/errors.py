"""Every typed error of the spnas library, in one place.

Everything the library raises on purpose derives from :class:`SpnasError`; errors about
malformed input also derive from :class:`ValueError`, so callers may catch either. Messages name
the file, key or value at fault (hostile values are quoted through :func:`brief`).
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


class CheckpointError(SpnasError, ValueError):
    """A weights file is missing, unreadable, not a safe checkpoint or for another model."""


class DataError(SpnasError, ValueError):
    """A dataset file or entry is missing or malformed."""


class StorageError(SpnasError):
    """An object-store operation failed: bad URI, missing configuration, unreachable endpoint,
    denied access, or a missing bucket/object. The message names the endpoint and/or URI and
    never contains credentials."""


class SearchError(SpnasError):
    """A search cannot go on: invalid state, invalid result, or no valid child can be found."""


class NonFiniteLossError(SpnasError, FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


class PhaseError(SpnasError):
    """A phase cannot go on (e.g. every candidate of a round failed)."""


def brief(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting hostile input in messages."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit cannot even be shown
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class PreflightError(SpnasError):
    """A pipeline run refused before any training: every problem found, each naming its key,
    URI or version."""


class ServeError(SpnasError):
    """An export folder cannot be served or described (a file missing or malformed, the parity
    gate not passed, the ``serve`` extra not installed) or the model server cannot start. The
    message names the file, setting or address at fault."""


class RegistryError(SpnasError):
    """The model registry is unreachable, a model, version or alias is missing, or an export
    cannot be registered (its parity gate did not pass, a file or key is missing, the
    ``registry`` extra is not installed). The message names the registry URI (without
    credentials) and the model, version or alias at fault."""
