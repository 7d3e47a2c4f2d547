"""Settings of one search phase (SpNasS or SpNasP) and the objectives. No torch."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..models.encoding import MAX_BLOCKS, MAX_PARALLEL_PER_STAGE, MAX_STAGES, Bounds
from ..utils import checks
from ..utils.errors import ConfigError

ALGORITHMS = ("SpNasS", "SpNasP")
OBJECTIVE_KEYS = ("mAP", "segm_mAP", "segm_AP50", "mIoU", "params", "gflops", "latency", "memory")
OBJECTIVE_ALIASES = {"flops": "gflops", "map": "mAP", "miou": "mIoU", "latency_ms": "latency"}
#: Maximised objectives: box mAP, a Mask R-CNN's mask AP (``segm_*``) and a SemanticFPN's mean
#: IoU; the others minimised.
MAXIMISED = frozenset({"mAP", "segm_mAP", "segm_AP50", "mIoU"})
#: Objectives measured by the search itself when it proposes a child (params, GFLOPs and memory
#: on the meta device; latency end to end, in isolation); the others (mAP) come from training.
MEASURED = frozenset({"params", "gflops", "latency", "memory"})
#: Default objectives: SpNasS trades mAP for size; SpNasP for compute, since extra passes cost
#: FLOPs, not parameters (ResNet-50 neck [3, 3, 3, 3]: +20 % params, 2.9x GFLOPs).
DEFAULT_OBJECTIVES = {"SpNasS": ("mAP", "params"), "SpNasP": ("mAP", "gflops")}
#: Largest ``max_swap_shift``: a boundary moves by at most this many blocks in one swap.
MAX_SWAP_SHIFT = 8


#: The second figure reports print beside a quality figure.
SECOND_FIGURE = {"mAP": "AP50", "segm_mAP": "segm_AP50", "segm_AP50": "segm_mAP", "mIoU": "pixel_acc"}


def quality_key(metrics: Mapping[str, Any] | None, objectives: Iterable[str] = ()) -> str:
    """The figure models are compared by: the first maximised key of ``objectives`` (the run's or
    the search's objective keys) that ``metrics`` hold; else ``"mIoU"`` for a semantic model's
    metrics (they hold no box mAP), else ``"mAP"`` (a Mask R-CNN's box mAP too). Records,
    controls, the run's result, reports, reignition's before/after choice and the plateau trigger
    all compare by it, so a Mask R-CNN searched by ``segm_mAP`` is compared by ``segm_mAP``
    throughout."""
    m = metrics or {}
    for k in objectives:
        k = canonical_objective(k)
        if k in MAXIMISED and m.get(k) is not None:
            return k
    return "mIoU" if "mIoU" in m and "mAP" not in m else "mAP"


def quality(metrics: Mapping[str, Any] | None, objectives: Iterable[str] = ()) -> float | None:
    """The value of :func:`quality_key` in ``metrics`` (None when missing or undefined)."""
    m = metrics or {}
    return m.get(quality_key(m, objectives))


def canonical_objective(key: str) -> str:
    """``"flops"`` -> ``"gflops"``, ``"map"`` -> ``"mAP"``; other keys unchanged."""
    return OBJECTIVE_ALIASES.get(key, OBJECTIVE_ALIASES.get(key.lower(), key)) if isinstance(key, str) else key


def _where(name: str) -> str:
    return f"search setting {name}"


def _bad(name: str, value: Any, expected: str) -> Exception:
    return checks.fail(_where(name), expected, value)


def _as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    return checks.integer(value, _where(name), minimum, maximum)


def _as_ratio(name: str, value: Any) -> float:
    return checks.ratio(value, _where(name))


@dataclass
class SearchSettings:
    """Settings of one search phase. Validated (and integral floats cast to int) on creation;
    an impossible value raises :class:`~spnas.errors.ConfigError` naming the field.

    ``objective_keys`` are stored canonically (``flops`` -> ``gflops``)."""

    algorithm: str                                   # "SpNasS" | "SpNasP"
    max_sample: int = 20                             # candidates proposed in total (seeds not counted)
    candidates_per_round: int = 4
    objective_keys: tuple[str, ...] | None = None    # None: DEFAULT_OBJECTIVES of the algorithm
    num_mutate: int = 3                              # a child is made by 1..num_mutate operations
    add_stage_ratio: float = 0.05                    # SpNasS: P(add-stage) per operation
    expand_ratio: float = 0.3                        # SpNasS: else P(expand); else width / swap
    width_ratio: float = 0.2                         # SpNasS: else P(width move); else swap
    max_swap_shift: int = 2                          # SpNasS: a swap moves a boundary by 1..this many blocks
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
    max_memory_mb: float | None = None               # budget on the estimated training memory (MiB)
    max_latency_ms: float | None = None              # budget on the measured end-to-end latency (ms)
    memory_batch: int = 4                            # images per step of the memory estimate (the trainer's batch)
    reignition_patience: int | None = None           # SpNasS: reignite after this many rounds without a better front
    max_reignitions: int = 2                         # SpNasS: at most this many reignitions inside the search
    refresh_seeds: bool = False                      # the first candidates retrain each seed unchanged (see state)

    def __post_init__(self) -> None:
        alg = self.algorithm
        match = [a for a in ALGORITHMS if isinstance(alg, str) and a.lower() == alg.strip().lower()]
        if not match:
            raise _bad("algorithm", alg, f"one of {', '.join(ALGORITHMS)}")
        self.algorithm = match[0]
        self.max_sample = _as_int("max_sample", self.max_sample, 1)
        self.candidates_per_round = _as_int("candidates_per_round", self.candidates_per_round, 1)
        keys = DEFAULT_OBJECTIVES[self.algorithm] if self.objective_keys is None else self.objective_keys
        if isinstance(keys, str):
            keys = (keys,)
        if not isinstance(keys, (list, tuple)) or not keys:
            raise _bad("objective_keys", self.objective_keys, f"a non-empty list of {OBJECTIVE_KEYS}")
        canon = []
        for k in keys:
            c = canonical_objective(k)
            if c not in OBJECTIVE_KEYS:
                raise _bad("objective_keys", self.objective_keys,
                           f"a list of mAP, segm_mAP, segm_AP50, mIoU (maximised), params, gflops (alias flops), latency, "
                           f"memory; {k!r} is unknown")
            if c in canon:
                raise _bad("objective_keys", self.objective_keys, f"a list without repeats; {c!r} is listed twice")
            canon.append(c)
        self.objective_keys = tuple(canon)
        self.num_mutate = _as_int("num_mutate", self.num_mutate, 1)
        self.add_stage_ratio = _as_ratio("add_stage_ratio", self.add_stage_ratio)
        self.expand_ratio = _as_ratio("expand_ratio", self.expand_ratio)
        self.width_ratio = _as_ratio("width_ratio", self.width_ratio)
        self.max_swap_shift = _as_int("max_swap_shift", self.max_swap_shift, 1, MAX_SWAP_SHIFT)
        self.min_blocks = _as_int("min_blocks", self.min_blocks, 1, MAX_BLOCKS)
        self.max_blocks = _as_int("max_blocks", self.max_blocks, 1, MAX_BLOCKS)
        if self.min_blocks > self.max_blocks:
            raise _bad("min_blocks", self.min_blocks, f"at most max_blocks={self.max_blocks}")
        self.min_stages = _as_int("min_stages", self.min_stages, 1, MAX_STAGES)
        self.max_stages = _as_int("max_stages", self.max_stages, 1, MAX_STAGES)
        if self.min_stages > self.max_stages:
            raise _bad("min_stages", self.min_stages, f"at most max_stages={self.max_stages}")
        if self.max_stages > self.max_blocks:
            raise _bad("max_stages", self.max_stages, f"at most max_blocks={self.max_blocks}")
        checks.boolean(self.refresh_seeds, _where("refresh_seeds"))
        self.max_per_stage = _as_int("max_per_stage", self.max_per_stage, 0, MAX_PARALLEL_PER_STAGE)
        if self.algorithm == "SpNasP" and self.max_per_stage < 1:
            raise _bad("max_per_stage", self.max_per_stage, "at least 1 for SpNasP (extra passes per stage)")
        if self.max_params is not None:
            self.max_params = _as_int("max_params", self.max_params, 1)
        if self.max_gflops is not None:
            v = self.max_gflops
            # compared, not float()ed: an int beyond the float range (10**400) is refused, not an OverflowError
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= sys.float_info.max:
                raise _bad("max_gflops", v, "a positive number or None")
            self.max_gflops = float(v)
        self.flops_size = _as_int("flops_size", self.flops_size, 32)
        self.max_redraws = _as_int("max_redraws", self.max_redraws, 1)
        self.seed = _as_int("seed", self.seed)
        for name in ("max_memory_mb", "max_latency_ms"):
            if getattr(self, name) is not None:
                setattr(self, name, checks.number(getattr(self, name), _where(name), 0, open_lo=True))
        self.memory_batch = _as_int("memory_batch", self.memory_batch, 1)
        if self.reignition_patience is not None:
            self.reignition_patience = _as_int("reignition_patience", self.reignition_patience, 1)
        self.max_reignitions = _as_int("max_reignitions", self.max_reignitions, 0)

    @property
    def needs_memory(self) -> bool:
        """Whether a proposal must estimate a child's training memory (objective or budget)."""
        return "memory" in self.objective_keys or self.max_memory_mb is not None

    @property
    def needs_latency(self) -> bool:
        """Whether a proposal must measure a child's latency (objective or budget)."""
        return "latency" in self.objective_keys or self.max_latency_ms is not None

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
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"search settings have unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))
