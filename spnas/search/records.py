"""The record types of a search, written once: what a proposal hands out (:class:`Candidate`),
what a training gives back (:class:`Result`) and what the state keeps (:class:`Record`).

Every layer that passes these around (the local runner, the Kubeflow pods, the phase functions)
takes its key lists from here, so they cannot drift.
"""
from __future__ import annotations

from typing import Any, TypedDict


class Candidate(TypedDict):
    """A proposed child: its description, its parent (id, description, weights URI or path),
    the operations that made it, and what the search measured of it: ``params``, ``gflops``,
    ``memory`` (estimated training MiB) and ``latency`` (end-to-end ms); the last two are None
    unless an objective or a budget needs them."""

    id: int
    round: int
    desc: dict[str, Any]
    parent: int | None
    parent_desc: dict[str, Any] | None
    parent_weights: str | None
    ops: list[str]
    params: int
    gflops: float
    memory: float | None
    latency: float | None


class Result(TypedDict, total=False):
    """What training a candidate gives back: ``status`` ``ok`` (with metrics and weights) or
    ``failed`` (with the error), how many tensors were inherited / fresh, how many parameter
    elements trained (``trainable``; fewer than all under ``freeze_swap_keys``), and what the
    training cost: ``iters`` (iterations), ``images`` (images seen) and ``seconds`` (wall time)."""

    id: int
    status: str
    metrics: dict[str, Any] | None
    error: str | None
    weights: str | None
    inherited: int | None
    fresh: int | None
    iters: int | None
    images: int | None
    seconds: float | None
    trainable: int | None


class Record(Candidate, Result):
    """A candidate with its result (``status`` ``pending`` until the result arrives), or a seed
    (``round`` -1, no parent). ``lineage_iters``: training iterations along its lineage since
    fine_tune."""

    lineage_iters: int | None


CANDIDATE_KEYS: tuple[str, ...] = tuple(Candidate.__annotations__)
RESULT_KEYS: tuple[str, ...] = tuple(Result.__annotations__)


def candidate_of(record: Record | dict[str, Any]) -> Candidate:
    """The candidate part of a record."""
    return {k: record[k] for k in CANDIDATE_KEYS}  # type: ignore[return-value]


def result_of(result: Result | dict[str, Any]) -> Result:
    """The result keys of a result (other keys, e.g. a traceback or echoed candidate keys, dropped)."""
    return {k: result[k] for k in RESULT_KEYS if k in result}  # type: ignore[return-value]
