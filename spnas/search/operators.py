"""Mutation operators of the search: SpNasS grows a serial code by add-stage / expand / width /
swap, SpNasP adds parallel passes to stages drawn with probability inversely proportional to their
FLOPs. All randomness comes from the ``random.Random`` passed in."""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from ..models.desc import normalize_desc
from ..models.encoding import SerialCode, parse_serial
from .settings import SearchSettings

OP_ADD_STAGE = "add_stage"
OP_EXPAND = "expand"
OP_SWAP = "swap"
OP_WIDTH = "width"
OP_ADD_PASS = "add_pass"          # SpNasP ops are recorded as "add_pass:<stage>"


class Rejected(Exception):
    """A drawn child is invalid (counted and redrawn by the proposer)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def stage_sampling_probabilities(desc: Mapping[str, Any], settings: SearchSettings) -> list[float]:
    """SpNasP: probability of each stage to get the next extra pass, given ``desc``'s neck code.

    Proportional to 1 / (GFLOPs of the pass to add) over stages with fewer than
    ``max_per_stage`` passes; 0 for full stages; all zeros when every stage is full.
    """
    from ..models.cost import stage_pass_gflops  # torch, only when proposing
    d = normalize_desc(desc)
    costs = stage_pass_gflops(d, settings.flops_size)
    weights = [1.0 / c if k < settings.max_per_stage else 0.0 for c, k in zip(costs, d["neck"]["code"], strict=False)]
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [0.0] * len(weights)


# ----------------------------------------------------------------------------- operators

def choose_serial_op(rng: random.Random, num_stages: int, settings: SearchSettings) -> str:
    """Draw one SpNasS operation: add-stage with probability ``add_stage_ratio`` (only while
    ``num_stages < max_stages``), else expand with probability ``expand_ratio``, else width with
    probability ``width_ratio``, else swap."""
    if num_stages < settings.max_stages and rng.random() < settings.add_stage_ratio:
        return OP_ADD_STAGE
    if rng.random() < settings.expand_ratio:
        return OP_EXPAND
    return OP_WIDTH if rng.random() < settings.width_ratio else OP_SWAP


def expand(code: str | SerialCode, rng: random.Random) -> str:
    """Insert a ``1`` block into a uniformly drawn stage, at a uniform position after its first
    block (the stage's stride-2 head is never displaced)."""
    stages = list(parse_serial(code).stages)
    s = rng.randrange(len(stages))
    pos = rng.randint(1, len(stages[s]))
    stages[s] = stages[s][:pos] + "1" + stages[s][pos:]
    return "-".join(stages)


def swap_moves(code: str | SerialCode, max_shift: int = 1) -> list[tuple[int, int]]:
    """Valid swaps ``(boundary, shift)``: boundary b lies between stages b and b+1; a shift of
    -k moves it k blocks left (stage b hands its last k blocks to stage b+1), +k moves it k
    blocks right; ``1 <= k <= max_shift`` and no stage becomes empty. Ordered by boundary, then
    shift."""
    stages = parse_serial(code).stages
    return [(b, d) for b in range(len(stages) - 1) for d in range(-max_shift, max_shift + 1)
            if d != 0 and len(stages[b] if d < 0 else stages[b + 1]) > abs(d)]


def swap(code: str | SerialCode, rng: random.Random, max_shift: int = 1) -> str | None:
    """Move one stage boundary by up to ``max_shift`` blocks, the ``(boundary, shift)`` pair
    drawn uniformly from :func:`swap_moves`; the block sequence and the stage count are kept.
    ``None`` when no boundary can move (every stage has one block)."""
    moves = swap_moves(code, max_shift)
    if not moves:
        return None
    b, d = rng.choice(moves)
    stages = list(parse_serial(code).stages)
    joined = stages[b] + stages[b + 1]
    cut = len(stages[b]) + d
    stages[b], stages[b + 1] = joined[:cut], joined[cut:]
    return "-".join(stages)


def width_moves(code: str | SerialCode) -> list[tuple[int, int]]:
    """Valid width moves ``(block, direction)``: the ``2`` at global block index ``block`` trades
    places with the ``1`` just before it (direction -1) or just after it (+1). Stage boundaries
    do not matter: widths depend only on where the ``2`` s stand, and any such code parses."""
    blocks = parse_serial(code).blocks
    return [(i, d) for i, ch in enumerate(blocks) if ch == "2" for d in (-1, 1)
            if 0 <= i + d < len(blocks) and blocks[i + d] == "1"]


def width(code: str | SerialCode, rng: random.Random) -> str | None:
    """Move one ``2`` one block earlier or later, the move drawn uniformly from
    :func:`width_moves`; stage lengths, the block count and the number of ``2`` s are kept and
    only the block between the old and new positions changes its width. ``None`` when no ``2``
    has a neighbouring ``1``."""
    moves = width_moves(code)
    if not moves:
        return None
    i, d = rng.choice(moves)
    parsed = parse_serial(code)
    blocks = list(parsed.blocks)
    blocks[i], blocks[i + d] = blocks[i + d], blocks[i]
    out, pos = [], 0
    for st in parsed.stages:
        out.append("".join(blocks[pos:pos + len(st)]))
        pos += len(st)
    return "-".join(out)


def add_stage(code: str | SerialCode) -> str:
    """Append a stage of one ``1`` block (stride 2, same width as the last block)."""
    return f"{parse_serial(code)}-1"


def mutate_serial(code: str | SerialCode, rng: random.Random, settings: SearchSettings) -> tuple[str, list[str]]:
    """SpNasS child code: 1..num_mutate operations applied in sequence to ``code``.

    Returns ``(child code, op names)``; raises :class:`Rejected` when a drawn swap cannot move any
    boundary or a drawn width move has no ``2`` to move. Bounds are checked by the caller."""
    current = str(parse_serial(code))
    ops = []
    for _ in range(rng.randint(1, settings.num_mutate)):
        op = choose_serial_op(rng, parse_serial(current).num_stages, settings)
        if op == OP_ADD_STAGE:
            current = add_stage(current)
        elif op == OP_EXPAND:
            current = expand(current, rng)
        elif op == OP_WIDTH:
            nxt = width(current, rng)
            if nxt is None:
                raise Rejected("no possible width move", f"code '{current}' has no '2' next to a '1'")
            current = nxt
        else:
            nxt = swap(current, rng, settings.max_swap_shift)
            if nxt is None:
                raise Rejected("no possible swap", f"code '{current}' has no stage boundary that can move")
            current = nxt
        ops.append(op)
    return current, ops


def _draw_weighted(rng: random.Random, weights: Sequence[float]) -> int:
    total = sum(weights)
    r = rng.random() * total
    acc, last = 0.0, -1
    for i, w in enumerate(weights):
        if w <= 0:
            continue
        acc += w
        last = i
        if r < acc:
            return i
    return last


def mutate_parallel(desc: Mapping[str, Any], rng: random.Random,
                    settings: SearchSettings) -> tuple[list[int], list[str]]:
    """SpNasP child neck code: 1..num_mutate extra passes, each on a stage drawn by
    :func:`stage_sampling_probabilities` of the code so far. Raises :class:`Rejected` when every
    stage is full."""
    d = normalize_desc(desc)
    code = list(d["neck"]["code"])
    ops = []
    for _ in range(rng.randint(1, settings.num_mutate)):
        d["neck"]["code"] = code
        probs = stage_sampling_probabilities(d, settings)
        if sum(probs) <= 0:
            raise Rejected("all stages full",
                            f"parallel code {code} has {settings.max_per_stage} passes on every stage")
        s = _draw_weighted(rng, probs)
        code[s] += 1
        ops.append(f"{OP_ADD_PASS}:{s}")
    return code, ops
