"""Architecture codes of SP-NAS.

Serial code (the backbone): stages joined by ``-``; each character is one residual block,
``1`` keeps the channel width, ``2`` doubles it at that block::

    111-2111-211111-211      ResNet-50 with bottleneck blocks

Parallel code (the neck): one non-negative integer per stage, the number of extra passes of
that stage (``[0, 0, 0, 0]`` is the plain serial network).

Vega's one-string form ``<t>_<serial>_<parallel>`` (``r_111-2111-211111-211_0-0-0-0``;
t = ``r`` bottleneck, ``b`` basic, ``x`` resnext) is accepted too.

Parsing checks syntax and structural limits only; the search applies its own (tighter,
configurable) bounds with :func:`check_bounds`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..utils.errors import CodeError, brief

#: Structural limits of any code this library builds (the search bounds are tighter).
MAX_BLOCKS = 128
MAX_STAGES = 8
MAX_DOUBLINGS = 6
MAX_PARALLEL_PER_STAGE = 8
_MAX_CODE_CHARS = 1024

BLOCK_TYPES = ("basic", "bottleneck", "resnext")
_BLOCK_ALIASES = {
    "basic": "basic", "basicblock": "basic", "b": "basic",
    "bottleneck": "bottleneck", "bottleneckblock": "bottleneck", "r": "bottleneck",
    "resnext": "resnext", "resnextblock": "resnext", "resnext32x4d": "resnext", "x": "resnext",
}
_VEGA_LETTER = {"basic": "b", "bottleneck": "r", "resnext": "x"}


def normalize_block(name: str) -> str:
    """Return the canonical block type (``basic``/``bottleneck``/``resnext``) for any accepted
    spelling (``BottleneckBlock``, ``BasicBlock``, Vega's one-letter ``r``/``b``/``x``)."""
    if not isinstance(name, str) or name.strip().lower().replace("_", "") not in _BLOCK_ALIASES:
        raise CodeError(
            f"unknown block type {brief(name)}: expected one of {', '.join(BLOCK_TYPES)} "
            "(or BasicBlock, BottleneckBlock, ResNeXtBlock)")
    return _BLOCK_ALIASES[name.strip().lower().replace("_", "")]


@dataclass(frozen=True)
class SerialCode:
    """A parsed serial code: a tuple of stages, each a string of ``1``/``2`` characters."""

    stages: tuple[str, ...]

    def __str__(self) -> str:
        return "-".join(self.stages)

    @property
    def blocks(self) -> str:
        """All block characters in order, stage boundaries removed."""
        return "".join(self.stages)

    @property
    def num_blocks(self) -> int:
        return sum(len(s) for s in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage_starts(self) -> list[int]:
        """Global indices of the first block of every stage."""
        starts, i = [], 0
        for s in self.stages:
            starts.append(i)
            i += len(s)
        return starts

    def block_positions(self) -> list[tuple[int, int]]:
        """``(stage, index within stage)`` of every block, in order."""
        return [(s, j) for s, st in enumerate(self.stages) for j in range(len(st))]

    def width_multipliers(self) -> list[int]:
        """``2**(number of '2' up to and including block i)`` for every block i."""
        out, n = [], 0
        for c in self.blocks:
            n += c == "2"
            out.append(2 ** n)
        return out


def parse_serial(code: str | SerialCode) -> SerialCode:
    """Parse and validate a serial code such as ``"111-2111-211111-211"``.

    Raises :class:`CodeError` quoting the code for: a non-string, an empty code, an empty
    stage, a character other than ``1``/``2``/``-``, more than :data:`MAX_BLOCKS` blocks,
    :data:`MAX_STAGES` stages or :data:`MAX_DOUBLINGS` width doublings.
    """
    if isinstance(code, SerialCode):
        return code
    if not isinstance(code, str):
        raise CodeError(f"serial code must be a string like '111-2111-211111-211', got {brief(code)}")
    text = code.strip()
    if not text:
        raise CodeError(f"serial code {brief(code)} is empty")
    if len(text) > _MAX_CODE_CHARS:  # far beyond any valid code: refuse before scanning it
        raise CodeError(f"serial code {brief(code)} is {len(text)} characters long; "
                        f"at most {MAX_BLOCKS} blocks in {MAX_STAGES} stages are allowed")
    for pos, ch in enumerate(text):
        if ch not in "12-":
            raise CodeError(
                f"serial code {brief(code)} has bad character {ch!r} at position {pos}: "
                "only '1' (keep width), '2' (double width) and '-' (stage boundary) are allowed")
    stages = tuple(text.split("-"))
    for i, s in enumerate(stages):
        if not s:
            raise CodeError(f"serial code {brief(code)}: stage {i} is empty")
    parsed = SerialCode(stages)
    if parsed.num_stages > MAX_STAGES:
        raise CodeError(f"serial code {brief(code)} has {parsed.num_stages} stages; at most {MAX_STAGES} are allowed")
    if parsed.num_blocks > MAX_BLOCKS:
        raise CodeError(f"serial code {brief(code)} has {parsed.num_blocks} blocks; at most {MAX_BLOCKS} are allowed")
    doublings = parsed.blocks.count("2")
    if doublings > MAX_DOUBLINGS:
        raise CodeError(
            f"serial code {brief(code)} doubles the width {doublings} times; at most {MAX_DOUBLINGS} are allowed")
    return parsed


def parse_parallel(code: str | Sequence[int] | None, num_stages: int | None = None) -> tuple[int, ...]:
    """Parse a parallel code: a list ``[0, 1, 0, 0]`` or a string ``"0-1-0-0"`` / ``"0,1,0,0"``.

    ``None`` or an empty list means all zeros (needs ``num_stages``). Integral floats (KFP
    struct parameters arrive as floats) are accepted. When ``num_stages`` is given the length
    must match it. Raises :class:`CodeError` quoting the code.
    """
    if code is None or (isinstance(code, (list, tuple)) and len(code) == 0):
        if num_stages is None:
            raise CodeError(f"parallel code {brief(code)} is empty and the number of stages is unknown")
        return (0,) * num_stages
    shown = brief(code)
    too_many = f"extra passes on one stage; at most {MAX_PARALLEL_PER_STAGE} are allowed"
    values: list[int] = []
    if isinstance(code, str):
        text = code.strip().strip("[]")
        sep = "," if "," in text else "-"
        parts = [p.strip() for p in text.split(sep)]
        if not text or any(p == "" for p in parts):
            raise CodeError(f"parallel code {shown} has an empty entry")
        for p in parts:
            # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
            if not (p.isascii() and p.isdigit()):
                raise CodeError(f"parallel code {shown}: entry {brief(p, 60)} is not a non-negative integer")
            if len(p.lstrip("0")) > len(str(MAX_PARALLEL_PER_STAGE)):  # int() of 5000 digits raises
                raise CodeError(f"parallel code {shown}: {brief(p, 60)} {too_many}")
            values.append(int(p))
    elif isinstance(code, (list, tuple)):
        for v in code:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise CodeError(f"parallel code {shown}: entry {brief(v, 60)} is not an integer")
            if v < 0:
                raise CodeError(f"parallel code {shown}: entry {brief(v, 60)} is negative")
            values.append(int(v))
    else:
        raise CodeError(f"parallel code must be a list of integers like [0, 1, 0, 0], got {shown}")
    for v in values:
        if v > MAX_PARALLEL_PER_STAGE:
            raise CodeError(f"parallel code {shown}: {brief(v, 60)} {too_many}")
    if num_stages is not None and len(values) != num_stages:
        raise CodeError(
            f"parallel code {shown} has {len(values)} entries but the serial code has {num_stages} stages")
    if len(values) > MAX_STAGES:
        raise CodeError(f"parallel code {shown} has {len(values)} entries; a code has one per stage and "
                        f"at most {MAX_STAGES} stages")
    return tuple(values)


def parse_arch(text: str) -> tuple[str, SerialCode, tuple[int, ...]]:
    """Parse Vega's one-string form ``<t>_<serial>_<parallel>`` -> (block, serial, parallel).

    The parallel part may be omitted (``r_111-2111-211111-211`` means all zeros).
    """
    if not isinstance(text, str):
        raise CodeError(f"architecture string must look like 'r_111-2111-211111-211_0-0-0-0', got {brief(text)}")
    parts = text.strip().split("_")
    if len(parts) not in (2, 3):
        raise CodeError(
            f"architecture string {brief(text)} must have the form <t>_<serial>[_<parallel>], "
            "e.g. 'r_111-2111-211111-211_0-0-0-0'")
    if parts[0] not in _VEGA_LETTER.values():
        raise CodeError(f"architecture string {brief(text)}: block letter {brief(parts[0])} is not one of r, b, x")
    block = normalize_block(parts[0])
    serial = parse_serial(parts[1])
    parallel = parse_parallel(parts[2] if len(parts) == 3 else None, serial.num_stages)
    return block, serial, parallel


def format_arch(block: str, serial: str | SerialCode, parallel: Iterable[int] | None = None) -> str:
    """Inverse of :func:`parse_arch`: ``('bottleneck', '11-21', [0, 1]) -> 'r_11-21_0-1'``."""
    s = parse_serial(serial)
    if parallel is not None and not isinstance(parallel, (str, list, tuple)):
        try:
            parallel = list(parallel)
        except TypeError:
            raise CodeError(f"parallel code must be a list of integers like [0, 1, 0, 0], "
                            f"got {brief(parallel)}") from None
    p = parse_parallel(parallel, s.num_stages)
    return f"{_VEGA_LETTER[normalize_block(block)]}_{s}_{'-'.join(map(str, p))}"


def looks_like_arch(text: object) -> bool:
    """True when ``text`` is a Vega one-string architecture (contains ``_``)."""
    return isinstance(text, str) and "_" in text


@dataclass(frozen=True)
class Bounds:
    """Search-space bounds (defaults: 8-60 blocks, 4-6 stages, 3 extra passes per stage)."""

    min_blocks: int = 8
    max_blocks: int = 60
    min_stages: int = 4
    max_stages: int = 6
    max_parallel_per_stage: int = 3


def check_bounds(serial: str | SerialCode, parallel: Sequence[int] | None = None,
                 bounds: Bounds = Bounds()) -> None:
    """Raise :class:`CodeError` when a code lies outside the search-space ``bounds``."""
    s = parse_serial(serial)
    if not bounds.min_blocks <= s.num_blocks <= bounds.max_blocks:
        raise CodeError(
            f"serial code '{s}' has {s.num_blocks} blocks, outside [{bounds.min_blocks}, {bounds.max_blocks}]")
    if not bounds.min_stages <= s.num_stages <= bounds.max_stages:
        raise CodeError(
            f"serial code '{s}' has {s.num_stages} stages, outside [{bounds.min_stages}, {bounds.max_stages}]")
    if parallel is not None:
        p = parse_parallel(parallel, s.num_stages)
        if any(k > bounds.max_parallel_per_stage for k in p):
            raise CodeError(
                f"parallel code {list(p)} exceeds {bounds.max_parallel_per_stage} extra passes on a stage")
