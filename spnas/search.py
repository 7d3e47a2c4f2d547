"""SpNasS (serial) and SpNasP (parallel) search strategies (SPEC 2.2, 2.4).

The search is a set of pure functions over a JSON-serialisable *state* dict, so that one round
can be proposed in one process (or pod) and its results recorded in another::

    state = new_state(SearchSettings("SpNasS", max_sample=20), seeds)
    while not is_done(state):
        state, cands = propose(state)            # children of Pareto-front parents
        state = update(state, [evaluate(c) for c in cands])
    best = front(state)

State layout (plain JSON types only; ``json.loads(json.dumps(state))`` is an equal state)::

    {"format": "spnas.search/1", "settings": {...SearchSettings fields...},
     "rng": [version, [625 ints], gauss_next],   # random.Random.getstate() as lists
     "next_id": int, "round": int, "proposed": int, "records": [record, ...]}

A record is a seed (``round`` -1, ``status`` "ok", ``parent`` None) or a candidate
(``status`` "pending" until :func:`update` makes it "ok" or "failed")::

    {"id", "round", "status", "desc", "parent", "parent_desc", "parent_weights", "ops",
     "params", "gflops", "metrics", "error", "weights", "inherited", "fresh"}

Objectives: ``mAP`` comes from a record's metrics and is maximised; ``params`` (total detector
parameters) and ``gflops`` (backbone + parallel + FPN at ``flops_size``) are measured by this
module on the meta device for every record, seeds included, and are minimised. Measured values
are used (not reported ones) so that every record is compared in the same units.

All randomness comes from one ``random.Random`` seeded with ``settings.seed`` whose state is
carried in the search state: the same settings, seeds and results give the same proposals,
also across a JSON round trip of the state.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .detector import build_backbone, normalize_desc
from .encoding import MAX_BLOCKS, MAX_PARALLEL_PER_STAGE, MAX_STAGES, Bounds, SerialCode, check_bounds, parse_serial
from .errors import CodeError, ConfigError, SpnasError, brief
from .measure import gflops as measure_gflops
from .measure import params as measure_params

log = logging.getLogger(__name__)

ALGORITHMS = ("SpNasS", "SpNasP")
OBJECTIVE_KEYS = ("mAP", "params", "gflops", "latency")
OBJECTIVE_ALIASES = {"flops": "gflops", "map": "mAP", "latency_ms": "latency"}
MAXIMISED = frozenset({"mAP"})
STATE_FORMAT = "spnas.search/1"

OP_ADD_STAGE = "add_stage"
OP_EXPAND = "expand"
OP_SWAP = "swap"
OP_ADD_PASS = "add_pass"          # SpNasP ops are recorded as "add_pass:<stage>"

#: Description keys that concern the seed's own weights and are not passed to children.
_SEED_ONLY_KEYS = ("convert_pretrained", "pretrained_model_file", "weight_file")
#: Result keys :func:`update` reads; echoed candidate keys are accepted and ignored.
_RESULT_KEYS = frozenset({"id", "status", "metrics", "error", "weights", "inherited", "fresh"})
_ECHO_KEYS = frozenset({"round", "desc", "parent", "parent_desc", "parent_weights", "ops", "params", "gflops"})


class SearchError(SpnasError):
    """A search cannot go on: invalid state, invalid result, or no valid child can be found."""


class _Rejected(Exception):
    """A drawn child is invalid (internal: counted and redrawn)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- settings

def canonical_objective(key: str) -> str:
    """``"flops"`` -> ``"gflops"``, ``"map"`` -> ``"mAP"``; other keys unchanged."""
    return OBJECTIVE_ALIASES.get(key, OBJECTIVE_ALIASES.get(key.lower(), key)) if isinstance(key, str) else key


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"search setting {name}={brief(value)} is invalid: {expected}")


def _as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():   # KFP structs deliver ints as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, "expected an integer")
    if minimum is not None and value < minimum:
        raise _bad(name, value, f"expected an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise _bad(name, value, f"expected an integer <= {maximum}")
    return value


def _as_ratio(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # no float(): 10**400
        raise _bad(name, value, "expected a probability in [0, 1]")
    return float(value)


@dataclass
class SearchSettings:
    """Settings of one search phase. Validated (and integral floats cast to int) on creation;
    an impossible value raises :class:`~spnas.errors.ConfigError` naming the field.

    ``objective_keys`` are stored canonically (``flops`` -> ``gflops``)."""

    algorithm: str                                   # "SpNasS" | "SpNasP"
    max_sample: int = 20                             # candidates proposed in total (seeds not counted)
    candidates_per_round: int = 4
    objective_keys: tuple[str, ...] = ("mAP", "params")
    num_mutate: int = 3                              # a child is made by 1..num_mutate operations
    add_stage_ratio: float = 0.05                    # SpNasS: P(add-stage) per operation
    expand_ratio: float = 0.3                        # SpNasS: else P(expand); else swap
    min_blocks: int = 8
    max_blocks: int = 60
    min_stages: int = 4
    max_stages: int = 6
    max_per_stage: int = 3                           # SpNasP: max extra passes per stage
    max_params: int | None = None                    # budget on total detector parameters
    max_gflops: float | None = None                  # budget on GFLOPs at flops_size
    flops_size: int = 800
    max_redraws: int = 200                           # draws per child before SearchError
    seed: int = 0

    def __post_init__(self) -> None:
        alg = self.algorithm
        match = [a for a in ALGORITHMS if isinstance(alg, str) and a.lower() == alg.strip().lower()]
        if not match:
            raise _bad("algorithm", alg, f"expected one of {', '.join(ALGORITHMS)}")
        self.algorithm = match[0]
        self.max_sample = _as_int("max_sample", self.max_sample, 1)
        self.candidates_per_round = _as_int("candidates_per_round", self.candidates_per_round, 1)
        keys = self.objective_keys
        if isinstance(keys, str):
            keys = (keys,)
        if not isinstance(keys, (list, tuple)) or not keys:
            raise _bad("objective_keys", self.objective_keys, f"expected a non-empty list of {OBJECTIVE_KEYS}")
        canon = []
        for k in keys:
            c = canonical_objective(k)
            if c not in OBJECTIVE_KEYS:
                raise _bad("objective_keys", self.objective_keys,
                           f"unknown objective {k!r}; allowed: mAP (maximised), params, gflops (alias flops)")
            if c in canon:
                raise _bad("objective_keys", self.objective_keys, f"objective {c!r} is listed twice")
            canon.append(c)
        self.objective_keys = tuple(canon)
        self.num_mutate = _as_int("num_mutate", self.num_mutate, 1)
        self.add_stage_ratio = _as_ratio("add_stage_ratio", self.add_stage_ratio)
        self.expand_ratio = _as_ratio("expand_ratio", self.expand_ratio)
        self.min_blocks = _as_int("min_blocks", self.min_blocks, 1, MAX_BLOCKS)
        self.max_blocks = _as_int("max_blocks", self.max_blocks, 1, MAX_BLOCKS)
        if self.min_blocks > self.max_blocks:
            raise _bad("min_blocks", self.min_blocks, f"greater than max_blocks={self.max_blocks}")
        self.min_stages = _as_int("min_stages", self.min_stages, 1, MAX_STAGES)
        self.max_stages = _as_int("max_stages", self.max_stages, 1, MAX_STAGES)
        if self.min_stages > self.max_stages:
            raise _bad("min_stages", self.min_stages, f"greater than max_stages={self.max_stages}")
        if self.max_stages > self.max_blocks:
            raise _bad("max_stages", self.max_stages, f"greater than max_blocks={self.max_blocks}")
        self.max_per_stage = _as_int("max_per_stage", self.max_per_stage, 0, MAX_PARALLEL_PER_STAGE)
        if self.algorithm == "SpNasP" and self.max_per_stage < 1:
            raise _bad("max_per_stage", self.max_per_stage, "SpNasP needs at least 1 extra pass per stage")
        if self.max_params is not None:
            self.max_params = _as_int("max_params", self.max_params, 1)
        if self.max_gflops is not None:
            v = self.max_gflops
            # compared, not float()ed: an int beyond the float range (10**400) is refused, not an OverflowError
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= sys.float_info.max:
                raise _bad("max_gflops", v, "expected a positive number or None")
            self.max_gflops = float(v)
        self.flops_size = _as_int("flops_size", self.flops_size, 32)
        self.max_redraws = _as_int("max_redraws", self.max_redraws, 1)
        self.seed = _as_int("seed", self.seed)

    @property
    def bounds(self) -> Bounds:
        """Bounds a child must satisfy. SpNasP keeps its parent's serial code, so only its
        per-stage maximum applies there: the block/stage bounds belong to the serial phase
        (a small serial network from it must not make every parallel child invalid)."""
        if self.algorithm == "SpNasP":
            return Bounds(1, MAX_BLOCKS, 1, MAX_STAGES, self.max_per_stage)
        return Bounds(self.min_blocks, self.max_blocks, self.min_stages, self.max_stages, self.max_per_stage)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``objective_keys`` as a list); ``SearchSettings(**d)`` restores it."""
        d = asdict(self)
        d["objective_keys"] = list(self.objective_keys)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"search settings have unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------- measuring

@functools.lru_cache(maxsize=4096)
def _measure_cached(desc_json: str, size: int) -> tuple[int, float]:
    desc = json.loads(desc_json)
    return int(measure_params(desc)["total"]), float(measure_gflops(desc, size))


def measure(desc: Mapping[str, Any], size: int) -> tuple[int, float]:
    """``(total detector params, GFLOPs at size x size)`` of a description (cached)."""
    d = normalize_desc(desc)
    return _measure_cached(json.dumps(d, sort_keys=True), size)


@functools.lru_cache(maxsize=1024)
def _stage_pass_cached(code: str, block: str, base_channels: int, norm: str, size: int) -> tuple[float, ...]:
    desc = {"backbone": {"code": code, "block": block, "base_channels": base_channels, "norm": norm},
            "neck": {"code": [1] * parse_serial(code).num_stages}}
    with torch.device("meta"):
        bb = build_backbone(desc)
        x = torch.empty(1, 3, size, size)
    bb.eval()
    costs = []
    with torch.no_grad():
        x = bb.body.stem(x)
        for s, stage in enumerate(bb.body.stages):
            counter = FlopCounterMode(display=False)
            with counter:
                y = stage(x)
                bb.connections[s][0](y)
            costs.append(counter.get_total_flops() / 1e9)
            x = y
    return tuple(costs)


def stage_pass_gflops(desc: Mapping[str, Any], size: int) -> list[float]:
    """GFLOPs of one extra parallel pass of every stage at ``size x size`` input: the stage
    module on its input shape plus its connection module (cached per backbone)."""
    bb = normalize_desc(desc)["backbone"]
    return list(_stage_pass_cached(bb["code"], bb["block"], bb["base_channels"], bb["norm"], size))


def stage_sampling_probabilities(desc: Mapping[str, Any], settings: SearchSettings) -> list[float]:
    """SpNasP: probability of each stage to get the next extra pass, given ``desc``'s neck code.

    Proportional to 1 / (GFLOPs of the pass to add) over stages with fewer than
    ``max_per_stage`` passes; 0 for full stages; all zeros when every stage is full.
    """
    d = normalize_desc(desc)
    costs = stage_pass_gflops(d, settings.flops_size)
    weights = [1.0 / c if k < settings.max_per_stage else 0.0 for c, k in zip(costs, d["neck"]["code"])]
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [0.0] * len(weights)


# ----------------------------------------------------------------------------- operators

def choose_serial_op(rng: random.Random, num_stages: int, settings: SearchSettings) -> str:
    """Draw one SpNasS operation: add-stage with probability ``add_stage_ratio`` (only while
    ``num_stages < max_stages``), else expand with probability ``expand_ratio``, else swap."""
    if num_stages < settings.max_stages and rng.random() < settings.add_stage_ratio:
        return OP_ADD_STAGE
    return OP_EXPAND if rng.random() < settings.expand_ratio else OP_SWAP


def expand(code: "str | SerialCode", rng: random.Random) -> str:
    """Insert a ``1`` block into a uniformly drawn stage, at a uniform position after its first
    block (the stage's stride-2 head is never displaced)."""
    stages = list(parse_serial(code).stages)
    s = rng.randrange(len(stages))
    pos = rng.randint(1, len(stages[s]))
    stages[s] = stages[s][:pos] + "1" + stages[s][pos:]
    return "-".join(stages)


def swap_moves(code: "str | SerialCode") -> list[tuple[int, int]]:
    """Valid swaps ``(boundary, direction)``: boundary b lies between stages b and b+1;
    direction -1 moves it one block left, +1 one block right; no stage becomes empty."""
    stages = parse_serial(code).stages
    moves = []
    for b in range(len(stages) - 1):
        if len(stages[b]) > 1:
            moves.append((b, -1))
        if len(stages[b + 1]) > 1:
            moves.append((b, +1))
    return moves


def swap(code: "str | SerialCode", rng: random.Random) -> str | None:
    """Move one uniformly drawn stage boundary by one block; the block sequence and the stage
    count are kept. ``None`` when no boundary can move (every stage has one block)."""
    moves = swap_moves(code)
    if not moves:
        return None
    b, d = rng.choice(moves)
    stages = list(parse_serial(code).stages)
    if d < 0:
        stages[b], stages[b + 1] = stages[b][:-1], stages[b][-1] + stages[b + 1]
    else:
        stages[b], stages[b + 1] = stages[b] + stages[b + 1][0], stages[b + 1][1:]
    return "-".join(stages)


def add_stage(code: "str | SerialCode") -> str:
    """Append a stage of one ``1`` block (stride 2, same width as the last block)."""
    return f"{parse_serial(code)}-1"


def mutate_serial(code: "str | SerialCode", rng: random.Random, settings: SearchSettings) -> tuple[str, list[str]]:
    """SpNasS child code: 1..num_mutate operations applied in sequence to ``code``.

    Returns ``(child code, op names)``; raises ``_Rejected`` when a drawn swap cannot move any
    boundary. Bounds are checked by the caller."""
    current = str(parse_serial(code))
    ops = []
    for _ in range(rng.randint(1, settings.num_mutate)):
        op = choose_serial_op(rng, parse_serial(current).num_stages, settings)
        if op == OP_ADD_STAGE:
            current = add_stage(current)
        elif op == OP_EXPAND:
            current = expand(current, rng)
        else:
            nxt = swap(current, rng)
            if nxt is None:
                raise _Rejected("no possible swap", f"code '{current}' has no stage boundary that can move")
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
    :func:`stage_sampling_probabilities` of the code so far. Raises ``_Rejected`` when every
    stage is full."""
    d = normalize_desc(desc)
    code = list(d["neck"]["code"])
    ops = []
    for _ in range(rng.randint(1, settings.num_mutate)):
        d["neck"]["code"] = code
        probs = stage_sampling_probabilities(d, settings)
        if sum(probs) <= 0:
            raise _Rejected("all stages full",
                            f"parallel code {code} has {settings.max_per_stage} passes on every stage")
        s = _draw_weighted(rng, probs)
        code[s] += 1
        ops.append(f"{OP_ADD_PASS}:{s}")
    return code, ops


# ----------------------------------------------------------------------------- Pareto front

def _value(point: Mapping[str, Any], key: str, index: int) -> float:
    for k in (key, canonical_objective(key)):
        if k in point:
            v = point[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SearchError(f"point {index}: objective {key!r} must be a finite number, got {v!r}")
            return float(v)
    raise SearchError(f"point {index} has no objective {key!r} (keys: {sorted(point)})")


def pareto_front(points: Sequence[Mapping[str, Any]], objective_keys: Iterable[str]) -> list[int]:
    """Indices (ascending) of the non-dominated points. ``mAP`` is maximised, every other key
    minimised. A point is dominated when another is at least as good in every objective and
    strictly better in one, so equal points (duplicates) are all kept."""
    keys = [canonical_objective(k) for k in objective_keys]
    if not keys:
        raise SearchError("pareto_front needs at least one objective key")
    vecs = [[(-1.0 if k in MAXIMISED else 1.0) * _value(p, k, i) for k in keys] for i, p in enumerate(points)]
    out = []
    for i, a in enumerate(vecs):
        dominated = any(all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a))
                        for j, b in enumerate(vecs) if j != i)
        if not dominated:
            out.append(i)
    return out


def objective_values(record: Mapping[str, Any], objective_keys: Iterable[str]) -> dict[str, float]:
    """Objective values of a record: ``mAP`` from its metrics, ``params``/``gflops`` measured."""
    out = {}
    for k in objective_keys:
        k = canonical_objective(k)
        if k in ("params", "gflops"):
            out[k] = float(record[k])
        else:
            out[k] = float((record.get("metrics") or {})[k])
    return out


# ----------------------------------------------------------------------------- state

def _copy(state: Mapping[str, Any]) -> dict:
    """Deep copy through JSON: the copy has exactly the types a reloaded state has."""
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError) as exc:
        raise SearchError(f"search state is not JSON-serialisable: {exc}") from exc


def _load(state: Mapping[str, Any]) -> tuple[dict, SearchSettings]:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise SearchError(f"not a search state (expected format {STATE_FORMAT!r}); make one with new_state()")
    st = _copy(state)
    return st, SearchSettings.from_dict(st["settings"])


def _rng_from(st: Mapping[str, Any]) -> random.Random:
    rng = random.Random()
    version, internal, gauss = st["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return rng


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _dedup_key(desc: Mapping[str, Any], algorithm: str) -> str:
    serial = desc["backbone"]["code"]
    if algorithm == "SpNasS":
        return serial
    return f"{serial}|{'-'.join(str(k) for k in desc['neck']['code'])}"


def _objective_metrics(metrics: Any, settings: SearchSettings, where: str) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise SearchError(f"{where}: metrics must be a mapping with {list(_metric_keys(settings))}, got {metrics!r}")
    out = dict(metrics)
    for k in _metric_keys(settings):
        if k not in out and k.lower() in out:
            out[k] = out[k.lower()]
        if k not in out:
            raise SearchError(f"{where}: metrics {sorted(out)} lack the objective {k!r}")
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SearchError(f"{where}: metric {k!r} must be a number, got {v!r}")
        out[k] = float(v)
    return out


def _metric_keys(settings: SearchSettings) -> list[str]:
    return [k for k in settings.objective_keys if k not in ("params", "gflops")]


def new_state(settings: SearchSettings, seeds: Sequence[Mapping[str, Any]]) -> dict:
    """Start a search. ``seeds``: parents with known results, each
    ``{"desc": model desc, "metrics": {"mAP": ...}, "weights": uri or None}`` (other keys, e.g.
    of records of an earlier phase, are ignored). Seeds become ok records with ids
    ``0..len(seeds)-1``, round -1 and no parent; candidate ids continue after them."""
    if not isinstance(settings, SearchSettings):
        raise SearchError(f"settings must be a SearchSettings, got {type(settings).__name__}")
    if not seeds:
        raise SearchError("a search needs at least one seed (the fine-tuned or reignited network with its metrics)")
    recs = []
    for i, seed in enumerate(seeds):
        if not isinstance(seed, Mapping) or "desc" not in seed:
            raise SearchError(f"seed {i} must be a mapping with 'desc', 'metrics' and 'weights', got {seed!r}")
        desc = normalize_desc(seed["desc"])
        metrics = _objective_metrics(seed.get("metrics"), settings, f"seed {i}")
        for k in _metric_keys(settings):
            if not math.isfinite(metrics[k]):
                raise SearchError(f"seed {i}: metric {k!r} is {metrics[k]}, not a finite number")
        weights = seed.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise SearchError(f"seed {i}: weights must be a path/URI string or None, got {weights!r}")
        try:
            check_bounds(desc["backbone"]["code"], desc["neck"]["code"], settings.bounds)
        except CodeError as exc:
            log.warning("seed %d lies outside the search bounds (%s); its children must not", i, exc)
        n_params, n_gflops = measure(desc, settings.flops_size)
        recs.append({"id": i, "round": -1, "status": "ok", "desc": desc, "parent": None, "parent_desc": None,
                     "parent_weights": None, "ops": [], "params": n_params, "gflops": n_gflops,
                     "metrics": metrics, "error": None, "weights": weights, "inherited": None, "fresh": None})
    state = {"format": STATE_FORMAT, "settings": settings.to_dict(),
             "rng": _rng_to_json(random.Random(settings.seed)),
             "next_id": len(recs), "round": 0, "proposed": 0, "records": recs}
    log.info("%s search: %d seed(s), max_sample %d, objectives %s", settings.algorithm, len(recs),
             settings.max_sample, list(settings.objective_keys))
    return _copy(state)


def _front_records(st: Mapping[str, Any], settings: SearchSettings) -> list[dict]:
    ok = [r for r in st["records"] if r["status"] == "ok"]
    points = [objective_values(r, settings.objective_keys) for r in ok]
    return [ok[i] for i in pareto_front(points, settings.objective_keys)]


def _child_desc(parent_desc: Mapping[str, Any], serial: str, parallel: Sequence[int]) -> dict:
    d = copy.deepcopy(dict(parent_desc))
    for key in _SEED_ONLY_KEYS:
        d.pop(key, None)
    d["backbone"]["code"] = serial
    d["neck"]["code"] = list(parallel)
    return normalize_desc(d)


def _draw_child(rng: random.Random, parents: Sequence[Mapping[str, Any]], settings: SearchSettings,
                seen: set[str]) -> tuple[dict, Mapping[str, Any], list[str], int, float]:
    parent = rng.choice(parents)
    pdesc = parent["desc"]
    if settings.algorithm == "SpNasS":
        serial, ops = mutate_serial(pdesc["backbone"]["code"], rng, settings)
        parallel = [0] * parse_serial(serial).num_stages
    else:
        serial = pdesc["backbone"]["code"]
        parallel, ops = mutate_parallel(pdesc, rng, settings)
    try:
        check_bounds(serial, parallel, settings.bounds)
    except CodeError as exc:
        raise _Rejected("out of bounds", str(exc)) from None
    child = _child_desc(pdesc, serial, parallel)
    key = _dedup_key(child, settings.algorithm)
    if key in seen:
        raise _Rejected("duplicate", f"code {key} was already proposed")
    n_params, n_gflops = measure(child, settings.flops_size)
    if settings.max_params is not None and n_params > settings.max_params:
        raise _Rejected("over max_params", f"{key}: {n_params} params > max_params {settings.max_params}")
    if settings.max_gflops is not None and n_gflops > settings.max_gflops:
        raise _Rejected("over max_gflops", f"{key}: {n_gflops:.3f} GFLOPs > max_gflops {settings.max_gflops}")
    return child, parent, ops, n_params, n_gflops


def propose(state: Mapping[str, Any], k: int | None = None) -> tuple[dict, list[dict]]:
    """Propose up to ``k`` (default ``candidates_per_round``) new candidates, never more than
    ``max_sample`` in total. Returns ``(new state, candidates)``; ``state`` is not mutated.

    Each candidate ``{"id", "round", "desc", "parent", "parent_desc", "parent_weights", "ops",
    "params", "gflops"}`` is a child of a parent drawn uniformly from the current Pareto front,
    within every bound and budget, and new to the whole search; it is recorded as pending.
    Raises :class:`SearchError` when ``max_redraws`` draws give no valid child."""
    st, settings = _load(state)
    if k is None:
        k = settings.candidates_per_round
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise SearchError(f"propose: k must be a non-negative integer, got {k!r}")
    count = min(k, settings.max_sample - st["proposed"])
    if count <= 0:
        return st, []
    rng = _rng_from(st)
    parents = sorted(_front_records(st, settings), key=lambda r: r["id"])
    seen = {_dedup_key(r["desc"], settings.algorithm) for r in st["records"]}
    round_no = st["round"]
    cands = []
    for _ in range(count):
        reasons: Counter = Counter()
        last = ""
        for _attempt in range(settings.max_redraws):
            try:
                child, parent, ops, n_params, n_gflops = _draw_child(rng, parents, settings, seen)
                break
            except _Rejected as rej:
                reasons[rej.reason] += 1
                last = rej.detail
                log.debug("rejected child: %s", rej.detail)
        else:
            why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            raise SearchError(
                f"could not find a valid new child after {settings.max_redraws} draws: {why} "
                f"(last: {last}); {len(parents)} parent(s) on the front, {st['proposed'] + len(cands)} "
                f"candidate(s) proposed. Widen the bounds or budgets, or lower max_sample")
        seen.add(_dedup_key(child, settings.algorithm))
        cand = {"id": st["next_id"], "round": round_no, "desc": child, "parent": parent["id"],
                "parent_desc": copy.deepcopy(parent["desc"]), "parent_weights": parent["weights"],
                "ops": ops, "params": n_params, "gflops": n_gflops}
        st["next_id"] += 1
        st["records"].append({**copy.deepcopy(cand), "status": "pending", "metrics": None, "error": None,
                              "weights": None, "inherited": None, "fresh": None})
        cands.append(cand)
    st["proposed"] += len(cands)
    st["round"] = round_no + 1
    st["rng"] = _rng_to_json(rng)
    log.info("%s round %d: proposed %s (%d/%d)", settings.algorithm, round_no,
             [(c["id"], _dedup_key(c["desc"], settings.algorithm), c["ops"]) for c in cands],
             st["proposed"], settings.max_sample)
    return _copy(st), _copy(cands)


def _opt_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SearchError(f"{where} must be a non-negative integer or None, got {value!r}")
    return value


def update(state: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict:
    """Record evaluation results of pending candidates; returns a new state.

    ``results``: ``[{"id", "status": "ok"|"failed", "metrics", "error", "weights", "inherited",
    "fresh"}]``. An ok result needs finite objective metrics; one whose metric is not finite
    (NaN from a diverged run) is recorded as failed. Failed candidates stay in the state (and
    count towards ``max_sample``) but never reach the front. Raises :class:`SearchError` for an
    unknown or non-pending id, an unknown key or a bad value."""
    st, settings = _load(state)
    by_id = {r["id"]: r for r in st["records"]}
    for res in results:
        if not isinstance(res, Mapping):
            raise SearchError(f"a result must be a mapping, got {res!r}")
        unknown = sorted(set(res) - _RESULT_KEYS - _ECHO_KEYS)
        if unknown:
            raise SearchError(f"result {res.get('id')!r} has unknown key(s) {unknown}; known: {sorted(_RESULT_KEYS)}")
        rid = res.get("id")
        if isinstance(rid, float) and rid.is_integer():
            rid = int(rid)
        if rid not in by_id:
            raise SearchError(f"result for unknown candidate id {res.get('id')!r}")
        rec = by_id[rid]
        if rec["status"] != "pending":
            raise SearchError(f"candidate {rid} is not pending (status {rec['status']!r}); "
                              "a result can be recorded once")
        status = res.get("status")
        where = f"result of candidate {rid}"
        weights = res.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise SearchError(f"{where}: weights must be a path/URI string or None, got {weights!r}")
        error = res.get("error")
        if status == "ok":
            metrics = _objective_metrics(res.get("metrics"), settings, where)
            bad = [k for k in _metric_keys(settings) if not math.isfinite(metrics[k])]
            if bad:
                status = "failed"
                error = f"non-finite metric(s) {', '.join(f'{k}={metrics[k]}' for k in bad)}"
                log.warning("candidate %d: %s; recorded as failed", rid, error)
        elif status == "failed":
            metrics = dict(res["metrics"]) if isinstance(res.get("metrics"), Mapping) else None
            error = str(error) if error is not None else "failed (no error message given)"
            log.info("candidate %d failed: %s", rid, error)
        else:
            raise SearchError(f"{where}: status must be 'ok' or 'failed', got {status!r}")
        rec.update(status=status, metrics=metrics, error=error if status == "failed" else None, weights=weights,
                   inherited=_opt_int(res.get("inherited"), f"{where}: inherited"),
                   fresh=_opt_int(res.get("fresh"), f"{where}: fresh"))
    return _copy(st)


def records(state: Mapping[str, Any]) -> list[dict]:
    """Every record (seeds, pending, ok and failed candidates) in id order; a copy."""
    st, _ = _load(state)
    return sorted(st["records"], key=lambda r: r["id"])


def front(state: Mapping[str, Any]) -> list[dict]:
    """The ok records (seeds included) on the current Pareto front, in id order; a copy."""
    st, settings = _load(state)
    return sorted(_front_records(st, settings), key=lambda r: r["id"])


def pending(state: Mapping[str, Any]) -> list[dict]:
    """The proposed candidates still waiting for a result."""
    return [r for r in records(state) if r["status"] == "pending"]


def is_done(state: Mapping[str, Any]) -> bool:
    """True once ``max_sample`` candidates have been proposed and none is pending."""
    st, settings = _load(state)
    return st["proposed"] >= settings.max_sample and not any(r["status"] == "pending" for r in st["records"])


def settings_of(state: Mapping[str, Any]) -> SearchSettings:
    """The settings a state was created with."""
    return _load(state)[1]


__all__ = ["SearchSettings", "SearchError", "new_state", "propose", "update", "pareto_front", "front",
           "is_done", "records", "pending", "settings_of", "stage_sampling_probabilities", "stage_pass_gflops",
           "choose_serial_op", "expand", "swap", "swap_moves", "add_stage", "mutate_serial", "mutate_parallel",
           "measure", "objective_values"]
