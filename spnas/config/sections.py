"""Parsers of the config's sections (dataset, trainer, lr_scheduler, search_algorithm,
search_space, a whole step). Each checks its keys against :mod:`.schema`, reports Vega's unused
keys as ignored and raises :class:`~spnas.utils.errors.ConfigError` naming the key path."""
from __future__ import annotations

import copy
import os
from typing import Any

from ..models.desc import normalize_desc
from ..models.encoding import looks_like_arch, parse_arch, parse_parallel, parse_serial
from ..search.settings import SearchSettings
from ..training.schedule import TrainConfig
from ..utils import checks
from ..utils.errors import CodeError, ConfigError, SpnasError, brief
from .schema import _DATASET_COMMON, _DATASET_KEYS, _MODEL_KEYS, _SEARCH_KEYS, _STEP_KEYS, _TRAINER_KEYS, _VEGA_IGNORED
from .types import DatasetConfig, StepConfig


def _err(path: str, msg: str) -> ConfigError:
    if len(path) > 300:  # key paths are built from the config's own (possibly hostile) keys
        path = f"{path[:300]}..."
    return ConfigError(f"config key {path}: {msg}")


def _path_value(value: Any, path: str, what: str = "a path") -> str | None:
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


def _check_keys(section: dict, path: str, known: set, ignored_kind: str | None, ignored: list[str]) -> None:
    vega = _VEGA_IGNORED.get(ignored_kind, set()) if ignored_kind else set()
    for key in section:
        if key in known:
            continue
        if key in vega:
            ignored.append(f"{path}.{key}")
            continue
        raise _err(f"{path}.{key}", f"unknown key (known here: {', '.join(sorted(known | vega))})")


def _int(value: Any, path: str, minimum: int = 0) -> int:
    return checks.integer(value, f"config key {path}", minimum)


def _num(value: Any, path: str, lo: float = 0.0, hi: float | None = None, open_lo: bool = False) -> float:
    return checks.number(value, f"config key {path}", lo, hi, open_lo)


def _bool(value: Any, path: str) -> bool:
    return checks.boolean(value, f"config key {path}")


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


def _trainer(sec: Any, path: str, batch_size: int, seed: int, ignored: list[str]
             ) -> tuple[TrainConfig, bool, dict[str, Any]]:
    """-> (TrainConfig, is_reignition, the reignition keys as StepConfig fields)."""
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
    extra = {"image_size": None if sec.get("image_size") is None else _int(sec["image_size"], f"{path}.image_size", 16),
             "recalibrate_images": _int(sec.get("recalibrate_images", 64), f"{path}.recalibrate_images", 0),
             "head_iters": _int(sec.get("head_iters", 0), f"{path}.head_iters", 0)}
    try:
        return TrainConfig(**kw), reignition, extra
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
    trainer, reignition, extra = _trainer(trainer_sec, f"{name}.trainer", dataset.batch_size, seed, ignored)
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
                      search=search, codes=codes, top_k=top_k, **extra)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
