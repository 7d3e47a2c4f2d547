"""The search layer: settings, mutation operators, Pareto fronts, the JSON search state and the
record types. Torch is imported only when a proposal measures a child (meta device)."""
from __future__ import annotations

from ..utils.errors import SearchError
from .operators import (
                        OP_ADD_PASS,
                        OP_ADD_STAGE,
                        OP_EXPAND,
                        OP_SWAP,
                        OP_WIDTH,
                        Rejected,
                        add_stage,
                        choose_serial_op,
                        expand,
                        mutate_parallel,
                        mutate_serial,
                        stage_sampling_probabilities,
                        swap,
                        swap_moves,
                        width,
                        width_moves,
)
from .pareto import objective_values, pareto_front
from .records import CANDIDATE_KEYS, RESULT_KEYS, Candidate, Record, Result, candidate_of, result_of
from .settings import ALGORITHMS, MAXIMISED, OBJECTIVE_KEYS, SearchSettings, canonical_objective
from .state import STATE_FORMAT, add_reignited, front, is_done, measure, new_state, pending, plateau, propose, records, update

__all__ = ["SearchError", "SearchSettings", "new_state", "propose", "update", "front", "records", "pending",
           "is_done", "measure", "plateau", "add_reignited", "pareto_front", "objective_values",
           "stage_sampling_probabilities", "choose_serial_op", "expand", "swap", "swap_moves", "width", "width_moves",
           "add_stage", "mutate_serial", "mutate_parallel",
           "Rejected", "Candidate", "Result", "Record", "CANDIDATE_KEYS", "RESULT_KEYS", "candidate_of",
           "result_of", "ALGORITHMS", "OBJECTIVE_KEYS", "MAXIMISED", "canonical_objective", "STATE_FORMAT",
           "OP_ADD_STAGE", "OP_EXPAND", "OP_SWAP", "OP_WIDTH", "OP_ADD_PASS"]
