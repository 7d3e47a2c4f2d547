"""The config layer: Vega-style YAML read in one place, validated strictly and frozen
(:class:`RunConfig`). No torch."""
from __future__ import annotations

from .loader import apply_overrides, load_config
from .schema import MAX_DEPTH, MAX_REF_CHAIN, MAX_VALUES, ROLES
from .types import DatasetConfig, RunConfig, StepConfig

__all__ = ["load_config", "apply_overrides", "RunConfig", "StepConfig", "DatasetConfig", "ROLES", "MAX_VALUES",
           "MAX_DEPTH", "MAX_REF_CHAIN"]
