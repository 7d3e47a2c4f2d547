"""A search's state file, round by round: propose, find the open round, record results, report.

These functions work on ``state.json`` (the JSON search state of :mod:`spnas.search.state`),
write it atomically and import no torch until a proposal measures its children. ``spnas run``
and the Kubeflow pods both use them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..search import add_reignited, front, is_done, pending, plateau, propose, records, update
from ..search.records import Candidate, Result, candidate_of, result_of
from ..search.settings import MAXIMISED
from ..utils.fileio import atomic_write_json, read_json
from .reports import pareto_plot, write_output_csv
from .steps import check_round

STATE_FILE = "state.json"


def search_propose(state_path: str | Path, k: int | None = None) -> list[Candidate]:
    """Propose the next round's candidates; the state file is updated atomically."""
    state, candidates = propose(read_json(state_path, "search state"), k)
    atomic_write_json(state_path, state)
    return candidates


def search_pending(state_path: str | Path) -> list[Candidate]:
    """Candidates proposed but not yet recorded (a round interrupted before its update), in the
    form :func:`search_propose` returned them; empty when no round is open."""
    return [candidate_of(r) for r in pending(read_json(state_path, "search state"))]


def search_update(state_path: str | Path, step_name: str, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Record a round's results (a round in which every candidate failed stops the search with
    the list of errors); returns ``{"front": [ids], "done": bool}``."""
    state = read_json(state_path, "search state")
    round_no = min((r["round"] for r in pending(state)), default=state.get("round"))
    check_round(step_name, round_no, results)
    state = update(state, [result_of(r) for r in results])
    atomic_write_json(state_path, state)
    return {"front": [r["id"] for r in front(state)], "done": is_done(state)}


def search_plateau(state_path: str | Path) -> bool:
    """Whether the search must reignite its front now (see :func:`spnas.search.plateau`)."""
    return plateau(read_json(state_path, "search state"))


def search_add_reignited(state_path: str | Path, reignited: Sequence[Mapping[str, Any]]) -> None:
    """Record the front's reignited models in the state file (see :func:`spnas.search.add_reignited`)."""
    atomic_write_json(state_path, add_reignited(read_json(state_path, "search state"), reignited))


def search_report(state_path: str | Path, out_dir: str | Path, title: str,
                  control: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``output.csv`` (Pareto records) and ``pareto.png`` (every candidate, the front
    highlighted, the phase's equal-budget ``control`` drawn when given) for a search phase."""
    state = read_json(state_path, "search state")
    fr = front(state)
    out = Path(out_dir)
    write_output_csv(out, fr)
    keys = list(state["settings"].get("objective_keys") or ())
    costs = [k for k in keys if k not in MAXIMISED]
    png = pareto_plot(records(state), [r["id"] for r in fr], out / "pareto.png", title, control=control,
                      x_key=costs[0] if costs else "params", objectives=keys)
    return {"output_csv": str(out / "output.csv"), "plot": str(png)}


__all__ = ["STATE_FILE", "search_propose", "search_pending", "search_update", "search_report", "search_plateau",
           "search_add_reignited", "Result"]
