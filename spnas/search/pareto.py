"""Pareto fronts over the search objectives (``mAP`` maximised, every other key minimised)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..utils.errors import SearchError
from .settings import MAXIMISED, MEASURED, canonical_objective


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
        dominated = any(all(x <= y for x, y in zip(b, a, strict=False)) and any(x < y for x, y in zip(b, a, strict=False))
                        for j, b in enumerate(vecs) if j != i)
        if not dominated:
            out.append(i)
    return out


def objective_values(record: Mapping[str, Any], objective_keys: Iterable[str]) -> dict[str, float]:
    """Objective values of a record: ``mAP`` (``segm_*``, ``mIoU``) from its metrics,
    ``params``/``gflops``... measured."""
    out = {}
    for k in objective_keys:
        k = canonical_objective(k)
        if k in MEASURED:
            out[k] = float(record[k])
        else:
            out[k] = float((record.get("metrics") or {})[k])
    return out
