"""Run configuration: Vega-style YAML, read in one place and validated strictly.

A config has a ``pipeline`` list of step names and one section per step (SPEC section 5)::

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
it override); ``{local_base_path}`` is the run's working directory. Keys of Vega's schema that
this project does not use are reported once as ignored; a key in neither schema is an error
naming its path.
"""
from __future__ import annotations

import copy
import itertools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

from .detector import normalize_desc
from .engine import TrainConfig
from .encoding import looks_like_arch, parse_arch, parse_parallel, parse_serial
from .errors import CodeError, ConfigError, SpnasError, brief

log = logging.getLogger(__name__)

ROLES = ("fine_tune", "serial", "reignition", "parallel", "full_train")

# Vega keys accepted but not used (reported once as ignored), per section.
_VEGA_IGNORED = {
    "general": {"backend", "device_category", "parallel_search", "parallel_fully_train", "devices_per_trainer",
                "logger", "worker", "task", "cluster", "quota", "dft", "calc_params_each_epoch", "cluster_mode",
                "ms_execute_mode", "env", "requires", "message_port", "security", "local_base_path"},
    "trainer": {"loss", "metric", "mixup", "valid_interval", "report_freq", "save_model_desc", "perfs_cmp_mode",
                "perfs_cmp_key", "cuda", "distributed", "seed", "is_detection_trainer", "model_statistics",
                "load_checkpoint", "report_on_valid", "call_metrics_on_train", "get_train_metric_after_epoch",
                "kwargs", "visual_callback", "save_best_model", "save_checkpoint", "save_ext_model",
                "report_on_epoch", "grad_clip", "pretrained_model_file"},
    "dataset": {"shuffle", "distributed", "transforms", "pin_memory", "drop_last", "imgs_per_gpu", "test_mode"},
    "pipe_step": {"desc_file", "hps_file"},
    "search_algorithm": {"policy", "codec", "random_ratio", "num_samples"},
    "step": {"evaluator", "loss", "metric"},
}
_GENERAL_OURS = {"seed", "workers", "device"}
_STEP_KEYS = {"pipe_step", "search_algorithm", "search_space", "model", "trainer", "dataset", "top_k"}
_SEARCH_KEYS = {"type", "max_sample", "objective_keys", "num_mutate", "add_stage_ratio", "expend_ratio",
                "expand_ratio", "max_stages", "min_stages", "min_blocks", "max_blocks", "max_per_stage", "max_params",
                "max_gflops", "flops_size", "max_redraws", "candidates_per_round", "seed"}
_TRAINER_KEYS = {"type", "epochs", "iters", "with_train", "optimizer", "lr_scheduler", "callbacks", "clip_grad_norm",
                 "amp", "eval_every", "checkpoint_every", "image_size"}
_DATASET_KEYS = {"type", "common", "train", "val", "test"}
_DATASET_COMMON = {"data_root", "data_path", "batch_size", "img_prefix", "ann_prefix", "num_workers"}
_MODEL_KEYS = {"pretrained_model_file", "model_desc", "models_folder"}

#: Limits on a config's shape, so that a hostile file (a YAML alias bomb, a self-referencing
#: anchor, a fan-out of refs) fails fast with a ConfigError instead of exhausting time or memory.
MAX_VALUES = 100_000
MAX_DEPTH = 64
MAX_REF_CHAIN = 20
#: Step names become folder names (``<workdir>/output/<step>/``) and object-store prefixes.
_STEP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the data of a step lives. ``kind`` is ``coco`` (detection) or ``imagenet``
    (folder-per-class classification, reignition)."""

    kind: str = "coco"
    data_root: Optional[str] = None
    batch_size: int = 4
    img_prefix: str = "2017"
    ann_prefix: str = "instances"
    num_workers: int = 0


@dataclass(frozen=True)
class StepConfig:
    """One pipeline step, normalised."""

    name: str
    role: str
    dataset: DatasetConfig
    trainer: TrainConfig
    model_desc: dict
    pretrained_model_file: Optional[str] = None
    models_folder: Optional[str] = None
    convert_pretrained: bool = False
    freeze_swap_keys: bool = False
    search: Optional[dict] = None          # SearchSettings keyword arguments
    codes: tuple = ()                      # search_space ranges (backbone codes or neck codes)
    top_k: Optional[int] = None
    image_size: int = 64                   # reignition crop size


@dataclass(frozen=True)
class RunConfig:
    """A whole run: working directory, seed, workers, device and the steps in order."""

    workdir: str
    seed: int
    workers: int
    device: Optional[str]
    steps: tuple[StepConfig, ...]
    ignored: tuple[str, ...] = ()
    source: str = "<dict>"

    def step(self, role: str) -> Optional[StepConfig]:
        return next((s for s in self.steps if s.role == role), None)


def _err(path: str, msg: str) -> ConfigError:
    if len(path) > 300:  # key paths are built from the config's own (possibly hostile) keys
        path = f"{path[:300]}..."
    return ConfigError(f"config key {path}: {msg}")


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


def _path_value(value: Any, path: str, what: str = "a path") -> Optional[str]:
    """``None`` or a non-empty string without NUL bytes (which no file system accepts)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _err(path, f"must be {what} string, got {brief(value)}")
    return value


def _name_part(value: Any, path: str) -> str:
    """A piece of a file name (``img_prefix``/``ann_prefix``): no separators, NUL or ``..``."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, int) and not 0 <= value < 10**9):
        raise _err(path, f"must be a string such as '2017', got {brief(value)}")
    text = str(value)
    if any(c in text for c in "/\\\x00") or ".." in text:
        raise _err(path, f"{brief(text)} must be part of a file name (no '/', '\\', '..' or NUL)")
    return text


def _mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, f"must be a mapping, got {brief(value)}")
    return value


def _check_keys(section: dict, path: str, known: set, ignored_kind: Optional[str], ignored: list[str]) -> None:
    vega = _VEGA_IGNORED.get(ignored_kind, set()) if ignored_kind else set()
    for key in section:
        if key in known:
            continue
        if key in vega:
            ignored.append(f"{path}.{key}")
            continue
        raise _err(f"{path}.{key}", f"unknown key (known here: {', '.join(sorted(known | vega))})")


def _int(value: Any, path: str, minimum: int = 0) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(path, f"must be an integer >= {minimum}, got {brief(value)}")
    return value


def _num(value: Any, path: str, lo: float = 0.0, hi: float = float("inf"), open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _err(path, f"must be a number, got {brief(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        raise _err(path, f"must be a number, got {brief(value)} (too large)") from None
    if number < lo or number > hi or (open_lo and number == lo):
        raise _err(path, f"must be in {'(' if open_lo else '['}{lo}, {hi}], got {brief(value)}")
    return number


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _err(path, f"must be true or false, got {brief(value)}")
    return value


def _substitute(node: Any, workdir: str) -> Any:
    if isinstance(node, str):
        return node.replace("{local_base_path}", workdir)
    if isinstance(node, list):
        return [_substitute(v, workdir) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, workdir) for k, v in node.items()}
    return node


def _resolve_refs(raw: dict) -> dict:
    """Replace every ``{ref: "step.section[.sub]"}`` mapping by a copy of its target.

    Each target is resolved once; a ref cycle, a chain longer than :data:`MAX_REF_CHAIN` or
    copies adding up to more than :data:`MAX_VALUES` values raise :class:`ConfigError`."""
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
                return {**base, **{k: resolve(v, f"{path}.{k}", chain) for k, v in rest.items()}}
            return {k: resolve(v, f"{path}.{k}" if path else k, chain) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, f"{path}[{i}]", chain) for i, v in enumerate(node)]
        return node
    return resolve(raw, "")


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


def _dataset(sec: Any, path: str, ignored: list[str]) -> DatasetConfig:
    sec = _mapping(sec, path)
    _check_keys(sec, path, _DATASET_KEYS, "dataset", ignored)
    kind = {"cocodataset": "coco", "coco": "coco", "imagenet": "imagenet", "imagefolder": "imagenet"}.get(
        str(sec.get("type", "CocoDataset")).lower())
    if kind is None:
        raise _err(f"{path}.type", f"{brief(sec.get('type'))} is not supported: use CocoDataset or Imagenet")
    common = dict(_mapping(sec.get("common"), f"{path}.common"))
    for split in ("train", "val", "test"):
        extra = _mapping(sec.get(split), f"{path}.{split}")
        _check_keys(extra, f"{path}.{split}", _DATASET_COMMON, "dataset", ignored)
    _check_keys(common, f"{path}.common", _DATASET_COMMON, "dataset", ignored)
    root = _path_value(common.get("data_root", common.get("data_path")), f"{path}.common.data_root",
                       "a path or URI")
    if root is not None and "://" not in root:
        root = os.path.abspath(root)
    return DatasetConfig(kind=kind, data_root=root,
                         batch_size=_int(common.get("batch_size", 4), f"{path}.common.batch_size", 1),
                         img_prefix=_name_part(common.get("img_prefix", "2017"), f"{path}.common.img_prefix"),
                         ann_prefix=_name_part(common.get("ann_prefix", "instances"), f"{path}.common.ann_prefix"),
                         num_workers=_int(common.get("num_workers", 0), f"{path}.common.num_workers", 0))


def _trainer(sec: Any, path: str, batch_size: int, seed: int, ignored: list[str]) -> tuple[TrainConfig, bool, int]:
    """-> (TrainConfig, is_reignition, image_size)."""
    sec = _mapping(sec, path)
    _check_keys(sec, path, _TRAINER_KEYS, "trainer", ignored)
    callbacks = sec.get("callbacks") or []
    callbacks = [callbacks] if isinstance(callbacks, str) else callbacks
    if not isinstance(callbacks, list) or not all(isinstance(c, str) for c in callbacks):
        raise _err(f"{path}.callbacks", f"must be a name or a list of names, got {brief(callbacks)}")
    reignition = "ReignitionCallback" in callbacks
    for c in callbacks:
        if c != "ReignitionCallback":
            ignored.append(f"{path}.callbacks: {c}")
    kw: dict[str, Any] = {"batch_size": batch_size, "seed": seed}
    kw["epochs"] = _int(sec.get("epochs", 1 if reignition else 3), f"{path}.epochs", 0)
    if sec.get("with_train") is False:
        kw["epochs"] = 0
    if "iters" in sec and sec["iters"] is not None:
        kw["iters"] = _int(sec["iters"], f"{path}.iters", 0)
    opt = _mapping(sec.get("optimizer"), f"{path}.optimizer")
    _check_keys(opt, f"{path}.optimizer", {"type", "params"}, None, ignored)
    if str(opt.get("type", "SGD")) != "SGD":
        raise _err(f"{path}.optimizer.type", f"{brief(opt.get('type'))} is not supported: SGD is")
    params = _mapping(opt.get("params"), f"{path}.optimizer.params")
    _check_keys(params, f"{path}.optimizer.params", {"lr", "momentum", "weight_decay"}, None, ignored)
    if "lr" in params:
        kw["lr"] = _num(params["lr"], f"{path}.optimizer.params.lr", 0, open_lo=True)
    if "momentum" in params:
        kw["momentum"] = _num(params["momentum"], f"{path}.optimizer.params.momentum", 0, 1)
    if "weight_decay" in params:
        kw["weight_decay"] = _num(params["weight_decay"], f"{path}.optimizer.params.weight_decay", 0, 1)
    sched = _mapping(sec.get("lr_scheduler"), f"{path}.lr_scheduler")
    if sched:
        kw.update(_scheduler(sched, f"{path}.lr_scheduler", kw["epochs"], ignored))
    if "clip_grad_norm" in sec and sec["clip_grad_norm"] is not None:
        kw["clip_grad_norm"] = _num(sec["clip_grad_norm"], f"{path}.clip_grad_norm", 0, open_lo=True)
    for key in ("amp",):
        if key in sec:
            kw[key] = _bool(sec[key], f"{path}.{key}")
    for key in ("eval_every", "checkpoint_every"):
        if key in sec:
            kw[key] = _int(sec[key], f"{path}.{key}", 0)
    image_size = _int(sec.get("image_size", 64), f"{path}.image_size", 16)
    try:
        return TrainConfig(**kw), reignition, image_size
    except SpnasError as exc:
        raise _err(path, str(exc)) from None


def _scheduler(sched: dict, path: str, epochs: int, ignored: list[str]) -> dict[str, Any]:
    kind = sched.get("type")
    params = _mapping(sched.get("params"), f"{path}.params")
    _check_keys(sched, path, {"type", "params"}, None, ignored)
    out: dict[str, Any] = {}
    if kind == "WarmupScheduler":
        _check_keys(params, f"{path}.params", {"warmup_type", "warmup_iters", "warmup_ratio", "after_scheduler_config",
                                                "by_epoch"}, None, ignored)
        if params.get("warmup_type", "linear") != "linear":
            raise _err(f"{path}.params.warmup_type", f"{brief(params['warmup_type'])} is not supported: linear is")
        if "warmup_iters" in params:
            out["warmup_iters"] = _int(params["warmup_iters"], f"{path}.params.warmup_iters", 0)
        if "warmup_ratio" in params:
            out["warmup_factor"] = _num(params["warmup_ratio"], f"{path}.params.warmup_ratio", 0, 1)
        after = _mapping(params.get("after_scheduler_config"), f"{path}.params.after_scheduler_config")
        if after:
            out.update(_scheduler(after, f"{path}.params.after_scheduler_config", epochs, ignored))
        return out
    if kind == "MultiStepLR":
        _check_keys(params, f"{path}.params", {"milestones", "gamma"}, None, ignored)
        ms = params.get("milestones", [])
        if not isinstance(ms, list) or not all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in ms):
            raise _err(f"{path}.params.milestones", f"must be a list of positive epochs, got {brief(ms)}")
        if epochs and any(m > epochs for m in ms):
            raise _err(f"{path}.params.milestones", f"{brief(ms)} lie beyond the {epochs} training epochs")
        out["schedule"] = "step"
        out["steps"] = tuple(m / epochs for m in ms) if epochs else ()
        if "gamma" in params:
            out["gamma"] = _num(params["gamma"], f"{path}.params.gamma", 0, 1, open_lo=True)
        return out
    if kind == "CosineAnnealingLR":
        _check_keys(params, f"{path}.params", {"T_max", "eta_min"}, None, ignored)
        out["schedule"] = "cosine"
        return out
    raise _err(f"{path}.type", f"{brief(kind)} is not supported: WarmupScheduler, MultiStepLR or CosineAnnealingLR")


def _search(sec: Any, path: str, seed: int, ignored: list[str]) -> dict:
    sec = _mapping(sec, path)
    _check_keys(sec, path, _SEARCH_KEYS, "search_algorithm", ignored)
    kind = sec.get("type")
    if kind not in ("SpNasS", "SpNasP"):
        raise _err(f"{path}.type", f"{brief(kind)} is not a search algorithm of this project: SpNasS or SpNasP")
    out = {k: v for k, v in sec.items() if k in _SEARCH_KEYS and k not in ("type", "expend_ratio")}
    if "expend_ratio" in sec:
        if "expand_ratio" in sec and sec["expand_ratio"] != sec["expend_ratio"]:
            raise _err(f"{path}.expend_ratio", "contradicts expand_ratio (they are the same setting)")
        out["expand_ratio"] = sec["expend_ratio"]
    if "objective_keys" in out:
        ok = out["objective_keys"]
        out["objective_keys"] = (ok,) if isinstance(ok, str) else (tuple(ok) if isinstance(ok, list) else ok)
    out["algorithm"] = kind
    out.setdefault("seed", seed)
    from .search import SearchSettings
    try:
        SearchSettings(**out)
    except TypeError as exc:
        raise _err(path, str(exc)) from None
    except ConfigError as exc:
        raise _err(path, str(exc)) from None
    return out


def _search_space(sec: Any, path: str, ignored: list[str]) -> tuple[str, tuple]:
    sec = _mapping(sec, path)
    _check_keys(sec, path, {"type", "hyperparameters"}, None, ignored)
    hps = sec.get("hyperparameters") or []
    if not isinstance(hps, list):
        raise _err(f"{path}.hyperparameters", f"must be a list, got {brief(hps)}")
    found: dict[str, tuple] = {}
    for i, hp in enumerate(hps):
        hp = _mapping(hp, f"{path}.hyperparameters[{i}]")
        _check_keys(hp, f"{path}.hyperparameters[{i}]", {"key", "type", "range"}, None, ignored)
        key = hp.get("key")
        if key not in ("network.backbone.code", "network.neck.code"):
            raise _err(f"{path}.hyperparameters[{i}].key",
                       f"{brief(key)} is not searched here: network.backbone.code or network.neck.code")
        if str(hp.get("type", "CATEGORY")).upper() != "CATEGORY":
            raise _err(f"{path}.hyperparameters[{i}].type", f"{brief(hp.get('type'))}: only CATEGORY is supported")
        rng = hp.get("range")
        if not isinstance(rng, list) or not rng:
            raise _err(f"{path}.hyperparameters[{i}].range", f"must be a non-empty list, got {brief(rng)}")
        for j, code in enumerate(rng):  # a malformed code fails here, not hours into the search
            try:
                if key == "network.neck.code":
                    parse_parallel(code)
                elif looks_like_arch(code):
                    parse_arch(code)
                else:
                    parse_serial(code)
            except CodeError as exc:
                raise _err(f"{path}.hyperparameters[{i}].range[{j}]", str(exc)) from None
        found[key] = tuple(tuple(r) if isinstance(r, list) else r for r in rng)
    return ("network.backbone.code", found["network.backbone.code"]) if "network.backbone.code" in found else \
        (("network.neck.code", found["network.neck.code"]) if found else ("", ()))


def load_config(source: "str | os.PathLike | dict", workdir: "str | os.PathLike | None" = None,
                overrides: Sequence[str] = ()) -> RunConfig:
    """Read, resolve and validate a run config; raises :class:`ConfigError` naming the key path."""
    name = "<dict>"
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
    else:
        name = str(source)
        try:
            with open(source, "r", encoding="utf-8") as fh:
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
    base = _path_value(general.get("local_base_path", "runs/spnas"), "general.local_base_path")
    try:
        wd = str(Path(workdir if workdir else base).resolve())
    except (OSError, ValueError, RuntimeError) as exc:
        raise _err("general.local_base_path", f"{brief(str(workdir or base))} cannot be resolved: {exc}") from None
    raw = _substitute(_resolve_refs(raw), wd)
    ignored: list[str] = []
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
    seed = _int(general.get("seed", 0), "general.seed", 0)
    if seed >= 2**63:  # torch.manual_seed and the search's generator take a 64-bit seed
        raise _err("general.seed", f"must be below 2**63, got {brief(seed)}")
    workers = _int(general.get("workers", 1), "general.workers", 1)
    device = general.get("device")
    if device not in (None, "auto", "cpu", "cuda"):
        raise _err("general.device", f"must be auto, cpu or cuda, got {brief(device)}")

    steps: list[StepConfig] = []
    seen_roles: list[str] = []
    defaults: dict[str, Any] = {}
    for name_ in pipeline:
        if name_ not in raw:
            raise _err(name_, "is listed in pipeline but has no section")
        steps.append(_step(name_, _mapping(raw[name_], name_), seed, seen_roles, defaults, ignored))
        seen_roles.append(steps[-1].role)
    if len(set(seen_roles)) != len(seen_roles):
        raise _err("pipeline", f"steps {pipeline} have repeated roles {seen_roles}")
    order = [ROLES.index(r) for r in seen_roles]
    if order != sorted(order):
        raise _err("pipeline", f"steps must run in the order {' -> '.join(ROLES)}; got roles {seen_roles}")
    for item in dict.fromkeys(ignored):
        log.info("config %s: %s is not used by this project; ignored", name, item)
    return RunConfig(workdir=wd, seed=seed, workers=workers, device=None if device == "auto" else device,
                     steps=tuple(steps), ignored=tuple(dict.fromkeys(ignored)), source=name)


def _step(name: str, sec: dict, seed: int, roles_before: list[str], defaults: dict, ignored: list[str]) -> StepConfig:
    _check_keys(sec, name, _STEP_KEYS, "step", ignored)
    pipe = _mapping(sec.get("pipe_step"), f"{name}.pipe_step")
    _check_keys(pipe, f"{name}.pipe_step", {"type", "models_folder"}, "pipe_step", ignored)
    ptype = pipe.get("type", "SearchPipeStep" if "search_algorithm" in sec else "TrainPipeStep")
    if ptype not in ("TrainPipeStep", "SearchPipeStep"):
        raise _err(f"{name}.pipe_step.type", f"{brief(ptype)} is not supported: TrainPipeStep or SearchPipeStep")
    model = _mapping(sec.get("model"), f"{name}.model")
    _check_keys(model, f"{name}.model", _MODEL_KEYS, None, ignored)
    dataset = _dataset(sec["dataset"], f"{name}.dataset", ignored) if "dataset" in sec else defaults.get("dataset")
    if dataset is None:
        raise _err(f"{name}.dataset", "is missing (the first step must name its dataset)")
    if dataset.kind == "coco":
        defaults.setdefault("dataset", dataset)
    trainer_sec = sec["trainer"] if "trainer" in sec else defaults.get("trainer_raw", {})
    trainer, reignition, image_size = _trainer(trainer_sec, f"{name}.trainer", dataset.batch_size, seed, ignored)
    if "trainer" in sec and not reignition:
        defaults.setdefault("trainer_raw", copy.deepcopy(sec["trainer"]))
    search = None
    if ptype == "SearchPipeStep" or "search_algorithm" in sec:
        if "search_algorithm" not in sec:
            raise _err(f"{name}.search_algorithm", "is missing for a SearchPipeStep")
        search = _search(sec["search_algorithm"], f"{name}.search_algorithm", seed, ignored)
        role = "serial" if search["algorithm"] == "SpNasS" else "parallel"
    elif reignition:
        role = "reignition"
    elif not roles_before:
        role = "fine_tune"
    else:
        role = "full_train"
    if dataset.kind != "coco" and role != "reignition":
        raise _err(f"{name}.dataset.type", "only the reignition step reads a classification (Imagenet) set")
    key, codes = _search_space(sec.get("search_space"), f"{name}.search_space", ignored)
    if codes and role not in ("serial", "parallel", "fine_tune"):
        raise _err(f"{name}.search_space", f"has no meaning for a {role} step")
    if key == "network.neck.code" and role == "serial":
        raise _err(f"{name}.search_space", "a serial search searches network.backbone.code")
    if key == "network.backbone.code" and role == "parallel":
        raise _err(f"{name}.search_space", "a parallel search searches network.neck.code")
    desc_raw = _mapping(model.get("model_desc"), f"{name}.model.model_desc")
    desc_raw = copy.deepcopy(desc_raw)
    convert = desc_raw.pop("convert_pretrained", False)
    freeze = desc_raw.pop("freeze_swap_keys", False)
    defaults_desc = copy.deepcopy(defaults.get("model_desc", {}))
    merged = _merge(defaults_desc, desc_raw)
    try:
        normalize_desc(merged)
    except SpnasError as exc:
        raise _err(f"{name}.model.model_desc", str(exc)) from None
    if role == "fine_tune":
        defaults["model_desc"] = merged
    top_k = sec.get("top_k")
    if top_k is not None:
        top_k = _int(top_k, f"{name}.top_k", 0 if role == "reignition" else 1)
    pretrained = _path_value(model.get("pretrained_model_file"), f"{name}.model.pretrained_model_file")
    where = f"{name}.pipe_step.models_folder" if "models_folder" in pipe else f"{name}.model.models_folder"
    folder = _path_value(pipe.get("models_folder", model.get("models_folder")), where)
    return StepConfig(name=name, role=role, dataset=dataset, trainer=trainer, model_desc=merged,
                      pretrained_model_file=pretrained, models_folder=folder,
                      convert_pretrained=_bool(convert, f"{name}.model.model_desc.convert_pretrained"),
                      freeze_swap_keys=_bool(freeze, f"{name}.model.model_desc.freeze_swap_keys"),
                      search=search, codes=codes, top_k=top_k, image_size=image_size)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
