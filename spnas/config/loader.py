"""Run configuration: Vega-style YAML, read in one place and validated strictly.

A config has a ``pipeline`` list of step names and one section per step::

    pipeline: [fine_tune, serial, reignition, parallel, fully_train]
    fine_tune:
      pipe_step: {type: TrainPipeStep}
      dataset: {type: CocoDataset, common: {data_root: data/demo, batch_size: 4}}
      model: {pretrained_model_file: ..., model_desc: {type: FasterRCNN, convert_pretrained: true, ...}}
      trainer: {type: Trainer, epochs: 2, optimizer: {type: SGD, params: {lr: 0.02}}, lr_scheduler: ...}
    serial:
      pipe_step: {type: SearchPipeStep}
      search_algorithm: {type: SpNasS, max_sample: 6, ...}
      search_space: {type: SearchSpace, hyperparameters: [{key: network.backbone.code, type: CATEGORY, range: [...]}]}
      trainer: {ref: fine_tune.trainer}

A step's role comes from its content: ``SpNasS`` -> serial search, ``SpNasP`` -> parallel
search, a trainer with ``ReignitionCallback`` -> reignition, the first other train step ->
fine_tune, later ones -> full train. ``ref: step.section`` copies another section (keys beside
it override) except the keys Vega's refs leave behind (``with_train``, ``callbacks``...);
``{local_base_path}`` (``general.local_base_path`` or Vega's ``general.task.local_base_path``)
is the run's working directory. Keys of Vega's schema that this project does not use are
reported once as ignored (:attr:`RunConfig.ignored`, logged at INFO), settings that are legal
but surprising once as warnings (:attr:`RunConfig.warnings`); a key in neither schema is an
error naming its path.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..utils.errors import ConfigError, brief
from .schema import (
    _GENERAL_OURS,
    _GENERAL_TASK_OURS,
    _REF_NOT_MERGED,
    _STEP_NAME,
    MAX_DEPTH,
    MAX_REF_CHAIN,
    MAX_VALUES,
    ROLES,
)
from .sections import _bool, _check_keys, _err, _int, _mapping, _path_value, _step
from .types import RunConfig, StepConfig

log = logging.getLogger(__name__)

#: What ``yaml.safe_load`` raises on bad input. Besides YAMLError, its constructors of explicit
#: tags fail with ValueError (``!!int x``, ``!!timestamp 2020-13-45``, an int of over 4300 digits),
#: IndexError (``!!float`` with no value), KeyError (``!!bool maybe``), AttributeError
#: (``!!timestamp x``); deep nesting raises RecursionError.
_YAML_ERRORS = (yaml.YAMLError, ValueError, LookupError, AttributeError, TypeError, RecursionError)


def _walk(node: Any) -> Iterator[tuple[Any, str, int]]:
    """Every value of ``node`` with its key path and depth, depth first and iteratively (a
    self-referencing YAML anchor cannot make it recurse; callers stop it by their own limits)."""
    stack: list[tuple[Any, str, int]] = [(node, "", 0)]
    while stack:
        item = stack.pop()
        yield item
        node, path, depth = item
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node))


def _check_shape(raw: dict, name: str) -> None:
    """Raise :class:`ConfigError` for a mapping key that is not a string, nesting deeper than
    :data:`MAX_DEPTH` or more than :data:`MAX_VALUES` values."""
    for count, (node, path, depth) in enumerate(_walk(raw), 1):
        if count > MAX_VALUES:
            raise ConfigError(f"config {name!r} has more than {MAX_VALUES} values "
                              "(a YAML alias bomb or a self-referencing anchor?)")
        if depth > MAX_DEPTH:
            raise _err(path, f"is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, str):
                    raise _err(path or "<top level>", f"key {brief(k)} is not a string")


def _count_values(node: Any, limit: int) -> int:
    """Number of values in ``node`` (mappings and lists included), stopping past ``limit``."""
    return sum(1 for _ in itertools.islice(_walk(node), limit + 1))


def _substitute(node: Any, workdir: str) -> Any:
    if isinstance(node, str):
        return node.replace("{local_base_path}", workdir)
    if isinstance(node, list):
        return [_substitute(v, workdir) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, workdir) for k, v in node.items()}
    return node


def _resolve_refs(raw: dict, origins: dict[str, tuple[str, frozenset]] | None = None) -> dict:
    """Replace every ``{ref: "step.section[.sub]"}`` mapping by a copy of its target, less the
    keys Vega's refs do not copy (:data:`~.schema._REF_NOT_MERGED`: ``with_train``, ``callbacks``...).

    Each target is resolved once; a ref cycle, a chain longer than :data:`MAX_REF_CHAIN` or
    copies adding up to more than :data:`MAX_VALUES` values raise :class:`ConfigError`.
    ``origins`` (when given) receives, for each section with a ref, ``path -> (ref, the keys
    copied from it)``, so that a key is reported where it is written (:func:`_written_at`)."""
    done: dict[str, tuple[Any, int]] = {}   # ref -> (resolved target, its number of values)
    copied = [0]

    def lookup(ref: str, path: str, chain: tuple[str, ...]) -> Any:
        if ref in chain:
            raise _err(f"{path}.ref", f"ref cycle {' -> '.join(map(brief, chain + (ref,)))}")
        if len(chain) >= MAX_REF_CHAIN:
            raise _err(f"{path}.ref", f"ref chain is longer than {MAX_REF_CHAIN}: {' -> '.join(map(brief, chain))}")
        if ref not in done:
            node: Any = raw
            for part in ref.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise _err(f"{path}.ref", f"{brief(ref)} does not name a section of this config")
                node = node[part]
            target = resolve(node, ref, chain + (ref,))
            done[ref] = (target, _count_values(target, MAX_VALUES))
        target, size = done[ref]
        copied[0] += size
        if copied[0] > MAX_VALUES:
            raise _err(f"{path}.ref", f"refs expand the config beyond {MAX_VALUES} values")
        return copy.deepcopy(target)

    def resolve(node: Any, path: str, chain: tuple[str, ...] = ()) -> Any:
        if isinstance(node, dict):
            if "ref" in node:
                ref = node["ref"]
                if not isinstance(ref, str):
                    raise _err(f"{path}.ref", f"must be a string like 'fine_tune.trainer', got {brief(ref)}")
                base = lookup(ref, path, chain)
                if not isinstance(base, dict):
                    raise _err(f"{path}.ref", f"{brief(ref)} is not a mapping")
                rest = {k: v for k, v in node.items() if k != "ref"}
                base = {k: v for k, v in base.items() if k not in _REF_NOT_MERGED}  # as Vega's merge_reference
                if origins is not None:
                    origins[path] = (ref, frozenset(base) - frozenset(rest))
                return {**base, **{k: resolve(v, f"{path}.{k}", chain) for k, v in rest.items()}}
            return {k: resolve(v, f"{path}.{k}" if path else k, chain) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, f"{path}[{i}]", chain) for i, v in enumerate(node)]
        return node
    return resolve(raw, "")


def _written_at(item: str, origins: dict[str, tuple[str, frozenset]]) -> str:
    """An ignored key's report with the key path where the config writes it: a key that a
    ``ref:`` copied is reported once, at its source, not again at every section that refs it."""
    nodes = sorted(origins, key=len, reverse=True)
    for _ in range(MAX_REF_CHAIN + 1):
        for node in nodes:
            ref, copied = origins[node]
            if item.startswith(node + "."):
                rest = item[len(node) + 1:]
                if re.split(r"[.\[: ]", rest, maxsplit=1)[0] in copied:
                    item = f"{ref}.{rest}"
                    break
        else:
            return item
    return item


def _report_once(ignored: list[str], origins: dict[str, tuple[str, frozenset]]) -> list[str]:
    """The ignored items, each once: a Vega key a ref copied is reported at its source; a key a
    step's role has no use for (``"<path> (not used: <why>)"``) at the step, unless the section
    it was copied from is reported for that key already."""
    unused_at = {item.partition(" (not used: ")[0] for item in ignored if " (not used: " in item}
    out = []
    for item in ignored:
        path, marked, _ = item.partition(" (not used: ")
        if not marked:
            out.append(_written_at(item, origins))
        elif _written_at(path, origins) == path or _written_at(path, origins) not in unused_at:
            out.append(item)
    return list(dict.fromkeys(out))


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """``--set a.b.c=value`` (value parsed as YAML) applied to the raw config."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {brief(item)} must look like key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {brief(item)}: {brief(part)} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except _YAML_ERRORS as exc:
            raise ConfigError(f"--set {brief(item)}: value is not valid YAML: {exc}") from None
    return raw


def load_config(source: str | os.PathLike | dict, workdir: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> RunConfig:
    """Read, resolve and validate a run config; raises :class:`ConfigError` naming the key path."""
    name = "<dict>"
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        name = str(source)
        try:
            with open(source, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {name!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {name!r} cannot be read: {exc}") from None
        except _YAML_ERRORS as exc:
            raise ConfigError(f"config file {name!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {name!r} must be a mapping at the top level")
    raw = apply_overrides(raw, overrides)  # a deep copy: shared anchors stay shared, cycles are kept
    _check_shape(raw, name)
    general = _mapping(raw.get("general"), "general")
    task = _mapping(general.get("task"), "general.task")
    if "local_base_path" in general and "local_base_path" in task and general["local_base_path"] != task["local_base_path"]:
        raise _err("general.task.local_base_path", "contradicts general.local_base_path (they are the same setting)")
    base_key = "general.task.local_base_path" if "local_base_path" in task else "general.local_base_path"
    base = _path_value(general.get("local_base_path", task.get("local_base_path", "runs/spnas")), base_key)
    try:
        wd = str(Path(workdir if workdir else base).resolve())
    except (OSError, ValueError, RuntimeError) as exc:
        raise _err(base_key, f"{brief(str(workdir or base))} cannot be resolved: {exc}") from None
    origins: dict[str, tuple[str, frozenset]] = {}
    raw = _substitute(_resolve_refs(raw, origins), wd)
    ignored: list[str] = []
    warnings: list[str] = []
    pipeline = raw.get("pipeline")
    if not isinstance(pipeline, list) or not pipeline or not all(isinstance(p, str) for p in pipeline):
        raise _err("pipeline", f"must be a non-empty list of step names, got {brief(pipeline)}")
    for i, step_name in enumerate(pipeline):
        if not _STEP_NAME.fullmatch(step_name):
            raise _err(f"pipeline[{i}]", f"step name {brief(step_name)} must be 1-64 letters, digits, '_' or '-' "
                       "starting with a letter or '_' (it names the step's output folder)")
        if step_name in pipeline[:i]:
            raise _err(f"pipeline[{i}]", f"step {step_name!r} is listed twice")
    for key in raw:
        if key not in ("general", "pipeline") and key not in pipeline:
            if not isinstance(raw[key], dict):
                raise _err(key, f"is neither 'general', 'pipeline' nor a step section (got {brief(raw[key])})")
            ignored.append(f"{key} (a section not in the pipeline)")
    general = _mapping(raw.get("general"), "general")
    _check_keys(general, "general", _GENERAL_OURS, "general", ignored)
    _check_keys(_mapping(general.get("task"), "general.task"), "general.task", _GENERAL_TASK_OURS, "general.task",
                ignored)
    seed = _int(general.get("seed", 0), "general.seed", 0)
    if seed >= 2**63:  # torch.manual_seed and the search's generator take a 64-bit seed
        raise _err("general.seed", f"must be below 2**63, got {brief(seed)}")
    workers = _int(general.get("workers", 1), "general.workers", 1)
    device = general.get("device")
    control = _bool(general.get("control", True), "general.control")
    if device not in (None, "auto", "cpu", "cuda"):
        raise _err("general.device", f"must be auto, cpu or cuda, got {brief(device)}")

    steps: list[StepConfig] = []
    seen_roles: list[str] = []
    defaults: dict[str, Any] = {}
    for name_ in pipeline:
        if name_ not in raw:
            raise _err(name_, "is listed in pipeline but has no section")
        steps.append(_step(name_, _mapping(raw[name_], name_), seed, seen_roles, defaults, ignored, warnings))
        seen_roles.append(steps[-1].role)
    if len(set(seen_roles)) != len(seen_roles):
        raise _err("pipeline", f"steps {pipeline} have repeated roles {seen_roles}")
    order = [ROLES.index(r) for r in seen_roles]
    if order != sorted(order):
        raise _err("pipeline", f"steps must run in the order {' -> '.join(ROLES)}; got roles {seen_roles}")
    ignored = _report_once(ignored, origins)
    for item in dict.fromkeys(ignored):
        path, marked, why = item.partition(" (not used: ")  # a key this step's role has no use for
        if marked:
            log.info("config %s: %s is not used: %s; ignored", name, path, why.removesuffix(")"))
        else:
            log.info("config %s: %s is not used by this project; ignored", name, item)
    for item in dict.fromkeys(warnings):
        log.warning("config %s: %s", name, item)
    return RunConfig(workdir=wd, seed=seed, workers=workers, device=None if device == "auto" else device, control=control,
                     steps=tuple(steps), ignored=tuple(dict.fromkeys(ignored)), source=name,
                     warnings=tuple(dict.fromkeys(warnings)))
