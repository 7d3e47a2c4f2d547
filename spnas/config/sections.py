"""Parsers of the config's sections (dataset, trainer, lr_scheduler, search_algorithm,
search_space, a whole step). Each checks its keys against :mod:`.schema`, reports Vega's unused
keys as ignored (``ignored``: one entry per key path, logged once by the loader), notes
settings that are legal but surprising (``warnings``: ``<key path>: <what happens>``)
and raises :class:`~spnas.utils.errors.ConfigError` naming the key path."""
from __future__ import annotations

import copy
import os
from typing import Any

from ..models.desc import normalize_desc
from ..models.encoding import looks_like_arch, parse_arch, parse_parallel, parse_serial
from ..search.settings import DEFAULT_OBJECTIVES, SearchSettings, canonical_objective
from ..training.schedule import LR_SCALINGS, WARMUP_TYPES, TrainConfig
from ..utils import checks
from ..utils.errors import CodeError, ConfigError, SpnasError, brief
from .schema import (
    _DATASET_COMMON,
    _DATASET_IMAGENET,
    _DATASET_KEYS,
    _HYPERPARAMETER_KEYS,
    _LR_SCHEDULER_KEYS,
    _MODEL_KEYS,
    _OPTIMIZER_KEYS,
    _PIPE_STEP_KEYS,
    _REF_NOT_MERGED,
    _SCHEDULER_PARAMS,
    _SEARCH_KEYS,
    _SEARCH_SPACE_KEYS,
    _SGD_KEYS,
    _STEP_KEYS,
    _TRAINER_KEYS,
    _VEGA_ALIASES,
    _VEGA_IGNORED,
)
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
    """Every key of ``section`` is ``known`` (ours), or Vega's (``_VEGA_IGNORED[ignored_kind]``:
    reported as ignored), or an error naming its path. A Vega section ignored as a whole
    (``_VEGA_IGNORED["<kind>.<key>"]``) is reported once; its own keys are still checked."""
    vega = _VEGA_IGNORED.get(ignored_kind, set()) if ignored_kind else set()
    for key in section:
        if key in known:
            continue
        if key in vega:
            inner = _VEGA_IGNORED.get(f"{ignored_kind}.{key}")
            if inner is not None:
                _check_keys(_mapping(section[key], f"{path}.{key}"), f"{path}.{key}", inner, None, [])
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
    """A ``CocoDataset`` (detection) or ``Imagenet`` (reignition's classification folder).
    ``common`` holds the settings; of the ``train``/``val``/``test`` sections only
    ``train.batch_size`` (the training batch) is used, every other key there is reported."""
    sec = _mapping(sec, path)
    _check_keys(sec, path, _DATASET_KEYS, "dataset", ignored)
    kind = {"cocodataset": "coco", "coco": "coco", "imagenet": "imagenet", "imagefolder": "imagenet"}.get(
        str(sec.get("type", "CocoDataset")).lower())
    if kind is None:
        raise _err(f"{path}.type", f"{brief(sec.get('type'))} is not supported: use CocoDataset or Imagenet")
    ours, vega_kind = (_DATASET_COMMON, "dataset.CocoDataset") if kind == "coco" else \
        (_DATASET_IMAGENET, "dataset.Imagenet")
    common = dict(_mapping(sec.get("common"), f"{path}.common"))
    _check_keys(common, f"{path}.common", ours, vega_kind, ignored)
    batch_path = f"{path}.common.batch_size"
    batch = common.get("batch_size", 4)
    for split in ("train", "val", "test"):
        extra = _mapping(sec.get(split), f"{path}.{split}")
        _check_keys(extra, f"{path}.{split}", ours, vega_kind, ignored)
        for key in extra:
            if key in ours:
                if split == "train" and key == "batch_size":
                    batch_path, batch = f"{path}.train.batch_size", extra[key]
                else:
                    ignored.append(f"{path}.{split}.{key} (the settings of dataset.common serve every split)")
    if "data_root" in common and "data_path" in common and common["data_root"] != common["data_path"]:
        raise _err(f"{path}.common.data_path", "contradicts data_root (they are the same setting)")
    root = _path_value(common.get("data_root", common.get("data_path")), f"{path}.common.data_root",
                       "a path or URI")
    if root is not None and "://" not in root:
        root = os.path.abspath(root)
    return DatasetConfig(kind=kind, data_root=root, batch_size=_int(batch, batch_path, 1),
                         img_prefix=_name_part(common.get("img_prefix", "2017"), f"{path}.common.img_prefix"),
                         ann_prefix=_name_part(common.get("ann_prefix", "instances"), f"{path}.common.ann_prefix"),
                         num_workers=(None if common.get("num_workers") is None
                                      else _int(common["num_workers"], f"{path}.common.num_workers", 0))
                         if kind == "coco" else 0)  # an Imagenet set's num_workers is Vega's (reignition reads in-process)


def _norm_eval(value: Any, path: str) -> bool | str:
    """``true``, ``false`` or ``"auto"`` (any case)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if not isinstance(value, bool):
        raise _err(path, f"must be true, false or 'auto', got {brief(value)}")
    return value


def _aliased(sec: dict, ours: str, path: str) -> tuple[str, Any] | None:
    """``(key path, value)`` of the trainer setting ``ours`` given under its own name or its Vega
    spelling (:data:`_VEGA_ALIASES`); None when neither is given. Both given must agree."""
    given = [k for k in (ours, *(v for v, o in _VEGA_ALIASES.items() if o == ours)) if k in sec]
    if not given:
        return None
    if len(given) > 1 and sec[given[0]] != sec[given[1]]:
        raise _err(f"{path}.{given[1]}", f"contradicts {given[0]} (they are the same setting)")
    return f"{path}.{given[0]}", sec[given[0]]


def _trainer(sec: Any, path: str, batch_size: int, seed: int, ignored: list[str],
             warnings: list[str] | None = None, workers: int | None = None) -> tuple[TrainConfig, bool, dict[str, Any]]:
    """-> (TrainConfig, is_reignition, the reignition keys as StepConfig fields). ``batch_size``
    and ``workers`` (data loader processes) come from the step's dataset."""
    warnings = [] if warnings is None else warnings
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
    kw: dict[str, Any] = {"batch_size": batch_size, "seed": seed, "workers": workers}
    kw["epochs"] = _int(sec.get("epochs", 1 if reignition else 3), f"{path}.epochs", 0)
    if "with_train" in sec and not _bool(sec["with_train"], f"{path}.with_train"):
        kw["epochs"] = 0
    if "iters" in sec and sec["iters"] is not None:
        kw["iters"] = _int(sec["iters"], f"{path}.iters", 0)
    opt = _mapping(sec.get("optimizer"), f"{path}.optimizer")
    _check_keys(opt, f"{path}.optimizer", _OPTIMIZER_KEYS, None, ignored)
    if str(opt.get("type", "SGD")) != "SGD":
        raise _err(f"{path}.optimizer.type", f"{brief(opt.get('type'))} is not supported: SGD is")
    params = _mapping(opt.get("params"), f"{path}.optimizer.params")
    _check_keys(params, f"{path}.optimizer.params", _SGD_KEYS, "optimizer.params", ignored)
    if "lr" in params:
        kw["lr"] = _num(params["lr"], f"{path}.optimizer.params.lr", 0, open_lo=True)
    if "momentum" in params:
        kw["momentum"] = _num(params["momentum"], f"{path}.optimizer.params.momentum", 0, 1)
    if "weight_decay" in params:
        kw["weight_decay"] = _num(params["weight_decay"], f"{path}.optimizer.params.weight_decay", 0, 1)
    if "lr_scaling" in sec:
        kw["lr_scaling"] = checks.one_of(sec["lr_scaling"], f"config key {path}.lr_scaling", LR_SCALINGS)
    if "lr_reference_batch" in sec:
        kw["lr_reference_batch"] = _int(sec["lr_reference_batch"], f"{path}.lr_reference_batch", 1)
    sched = _mapping(sec.get("lr_scheduler"), f"{path}.lr_scheduler")
    if sched:
        kw.update(_scheduler(sched, f"{path}.lr_scheduler", kw["epochs"], kw.get("iters"), ignored, warnings))
    clip = _aliased(sec, "clip_grad_norm", path)
    if clip is not None and clip[1] is not None:
        kw["clip_grad_norm"] = _num(clip[1], clip[0], 0, open_lo=True)
    amp = _aliased(sec, "amp", path)
    if amp is not None:
        kw["amp"] = _bool(amp[1], amp[0])
    for key in ("channels_last", "cudnn_benchmark", "pin_memory"):  # CUDA speed-ups, on by default
        if key in sec:
            kw[key] = _bool(sec[key], f"{path}.{key}")
    every = _aliased(sec, "eval_every", path)
    if every is not None:
        kw["eval_every"] = _int(every[1], every[0], 0)
    if "checkpoint_every" in sec:
        kw["checkpoint_every"] = _int(sec["checkpoint_every"], f"{path}.checkpoint_every", 0)
    if "norm_eval" in sec:
        kw["norm_eval"] = _norm_eval(sec["norm_eval"], f"{path}.norm_eval")
    extra = {"image_size": None if sec.get("image_size") is None else _int(sec["image_size"], f"{path}.image_size", 16),
             "recalibrate_images": _int(sec.get("recalibrate_images", 64), f"{path}.recalibrate_images", 0),
             "head_iters": _int(sec.get("head_iters", 0), f"{path}.head_iters", 0)}
    try:
        return TrainConfig(**kw), reignition, extra
    except SpnasError as exc:
        raise _err(path, str(exc)) from None


_SCHEDULERS = ("WarmupScheduler", "MultiStepLR", "CosineAnnealingLR")


def _scheduler(sched: dict, path: str, epochs: int, iters: int | None, ignored: list[str], warnings: list[str],
               after: bool = False) -> dict[str, Any]:
    """TrainConfig keywords of an ``lr_scheduler`` (``after``: a WarmupScheduler's
    ``after_scheduler_config``).

    ``by_epoch`` as Vega's: when true, a WarmupScheduler's ``warmup_iters`` and the
    milestones / ``T_max`` of the decay count epochs, when false iterations. Absent, it is true
    for MultiStepLR and CosineAnnealingLR (Vega's default) and false for WarmupScheduler
    (``warmup_iters`` counts iterations, as its name says; Vega's default would count epochs).
    A MultiStepLR or CosineAnnealingLR alone has no warm-up, as in Vega."""
    _check_keys(sched, path, _LR_SCHEDULER_KEYS, "lr_scheduler", ignored)
    kind = sched.get("type")
    kinds = _SCHEDULERS[1:] if after else _SCHEDULERS
    if kind not in kinds:
        raise _err(f"{path}.type", f"{brief(kind)} is not supported: {', '.join(kinds[:-1])} or {kinds[-1]}")
    by_epoch = _bool(sched.get("by_epoch", kind != "WarmupScheduler"), f"{path}.by_epoch")
    params = _mapping(sched.get("params"), f"{path}.params")
    _check_keys(params, f"{path}.params", _SCHEDULER_PARAMS[kind], kind, ignored)
    out: dict[str, Any] = {}
    if kind == "WarmupScheduler":
        if "warmup_type" in params:
            out["warmup_type"] = checks.one_of(params["warmup_type"], f"config key {path}.params.warmup_type",
                                               WARMUP_TYPES)
        if "warmup_iters" in params:
            n = _int(params["warmup_iters"], f"{path}.params.warmup_iters", 0)
            out["warmup_epochs" if by_epoch else "warmup_iters"] = n
        if "warmup_ratio" in params:
            out["warmup_factor"] = _num(params["warmup_ratio"], f"{path}.params.warmup_ratio", 0, 1)
        after_sec = _mapping(params.get("after_scheduler_config"), f"{path}.params.after_scheduler_config")
        if after_sec:
            out.update(_scheduler(after_sec, f"{path}.params.after_scheduler_config", epochs, iters, ignored, warnings,
                                  after=True))
        else:
            warnings.append(f"{path}: a WarmupScheduler without after_scheduler_config gets the default "
                            "step decay after its warm-up: the lr is multiplied by 0.1 at 66.7 % and again at "
                            "88.9 % of the training iterations")
        return out
    if not after:
        out["warmup_iters"] = 0
    out["decay_unit"] = "epoch" if by_epoch else "iter"
    # how long the training is in the decay's unit, when the config alone tells
    length = (epochs if iters is None else None) if by_epoch else iters
    unit = "training epochs" if by_epoch else "training iterations"
    if kind == "MultiStepLR":
        ms = params.get("milestones", [])
        if not isinstance(ms, list) or not all(isinstance(m, (int, float)) and not isinstance(m, bool)
                                               and 0 < m < float("inf") for m in ms):
            raise _err(f"{path}.params.milestones", f"must be a list of positive numbers, got {brief(ms)}")
        late = [m for m in ms if length and m >= length]
        if late:
            warnings.append(f"{path}.params.milestones: {brief(late)} lie at or beyond the end of the "
                            f"{length} {unit}: never reached")
        out["schedule"] = "step"
        out["milestones"] = tuple(ms)
        if "gamma" in params:
            out["gamma"] = _num(params["gamma"], f"{path}.params.gamma", 0, 1, open_lo=True)
        return out
    out["schedule"] = "cosine"  # CosineAnnealingLR
    if "T_max" in params:
        out["cosine_t_max"] = _num(params["T_max"], f"{path}.params.T_max", 0, open_lo=True)
    if "eta_min" in params:
        out["eta_min"] = _num(params["eta_min"], f"{path}.params.eta_min", 0)
    return out


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
    _check_keys(sec, path, _SEARCH_SPACE_KEYS, "search_space", ignored)
    hps = sec.get("hyperparameters") or []
    if not isinstance(hps, list):
        raise _err(f"{path}.hyperparameters", f"must be a list, got {brief(hps)}")
    found: dict[str, tuple] = {}
    for i, hp in enumerate(hps):
        hp = _mapping(hp, f"{path}.hyperparameters[{i}]")
        _check_keys(hp, f"{path}.hyperparameters[{i}]", _HYPERPARAMETER_KEYS, "hyperparameter", ignored)
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


#: Why a key a step's role does not use is reported (the key path's tail -> reason).
_UNUSED_BY_ROLE = {
    "pretrained_model_file": "a step after fine_tune takes the previous phase's models",
    "models_folder": "a step after fine_tune takes the previous phase's models",
    "fine_tune.models_folder": "fine_tune starts from model_desc and pretrained_model_file",
    "convert_pretrained": "only fine_tune converts a checkpoint",
    "freeze_swap_keys": "only a search step trains its candidates",
    "top_k": "only a reignition or full train step chooses models",
    "image_size": "only a reignition step crops images",
    "recalibrate_images": "only a reignition step recalibrates BatchNorm statistics",
    "head_iters": "only a reignition step fine-tunes the heads of a reignited detector",
}


def _unused(path: str, why: str) -> str:
    return f"{path} (not used: {_UNUSED_BY_ROLE[why]})"


def _step(name: str, sec: dict, seed: int, roles_before: list[str], defaults: dict, ignored: list[str],
          warnings: list[str] | None = None) -> StepConfig:
    warnings = [] if warnings is None else warnings
    _check_keys(sec, name, _STEP_KEYS, "step", ignored)
    pipe = _mapping(sec.get("pipe_step"), f"{name}.pipe_step")
    _check_keys(pipe, f"{name}.pipe_step", _PIPE_STEP_KEYS, "pipe_step", ignored)
    ptype = pipe.get("type", "SearchPipeStep" if "search_algorithm" in sec else "TrainPipeStep")
    if ptype not in ("TrainPipeStep", "SearchPipeStep"):
        raise _err(f"{name}.pipe_step.type", f"{brief(ptype)} is not supported: TrainPipeStep or SearchPipeStep")
    model = _mapping(sec.get("model"), f"{name}.model")
    _check_keys(model, f"{name}.model", _MODEL_KEYS, "model", ignored)
    dataset = _dataset(sec["dataset"], f"{name}.dataset", ignored) if "dataset" in sec else defaults.get("dataset")
    if dataset is None:
        raise _err(f"{name}.dataset", "is missing (the first step must name its dataset)")
    if dataset.kind == "coco":
        defaults.setdefault("dataset", dataset)
    if "trainer" in sec:
        trainer, reignition, extra = _trainer(sec["trainer"], f"{name}.trainer", dataset.batch_size, seed,
                                                   ignored, warnings, dataset.num_workers)
    else:  # the first train step's trainer, less what a ref does not copy; its keys were reported there
        inherited = {k: v for k, v in defaults.get("trainer_raw", {}).items() if k not in _REF_NOT_MERGED}
        trainer, reignition, extra = _trainer(inherited, f"{name}.trainer", dataset.batch_size, seed, [],
                                                   warnings, dataset.num_workers)
    if "trainer" in sec and not reignition:
        defaults.setdefault("trainer_raw", copy.deepcopy(sec["trainer"]))
    search = None
    if ptype == "SearchPipeStep" or "search_algorithm" in sec:
        if "search_algorithm" not in sec:
            raise _err(f"{name}.search_algorithm", "is missing for a SearchPipeStep")
        search = _search(sec["search_algorithm"], f"{name}.search_algorithm", seed, ignored)
        search.setdefault("memory_batch", trainer.batch_size)  # the memory estimate at the step's own batch
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
    desc_keys = set(desc_raw)
    desc_raw = copy.deepcopy(desc_raw)
    convert = desc_raw.pop("convert_pretrained", False)
    freeze = desc_raw.pop("freeze_swap_keys", False)
    defaults_desc = copy.deepcopy(defaults.get("model_desc", {}))
    merged = _merge(defaults_desc, desc_raw)
    try:
        mtype = normalize_desc(merged)["type"]
    except SpnasError as exc:
        raise _err(f"{name}.model.model_desc", str(exc)) from None
    keys = [canonical_objective(k) for k in (search or {}).get("objective_keys") or ()]
    segm = [k for k in keys if str(k).startswith("segm_")]
    if segm and mtype != "MaskRCNN":
        raise _err(f"{name}.search_algorithm.objective_keys", f"{segm[0]!r} is a mask metric: it needs "
                   f"model_desc type 'MaskRCNN' (this step's model is a {mtype}, which predicts no masks)")
    if "mIoU" in keys and mtype != "SemanticFPN":
        raise _err(f"{name}.search_algorithm.objective_keys", "'mIoU' is a semantic-segmentation metric: it needs "
                   f"model_desc type 'SemanticFPN' (this step's model is a {mtype})")
    if mtype == "SemanticFPN" and search is not None:
        boxes = [k for k in keys if k == "mAP" or str(k).startswith("segm_")]
        if boxes:
            raise _err(f"{name}.search_algorithm.objective_keys", f"{boxes[0]!r} is a detection metric; a "
                       "SemanticFPN is measured by 'mIoU'")
        if not keys:  # the algorithm's default objectives, with the semantic model's quality
            search["objective_keys"] = tuple("mIoU" if k == "mAP" else k
                                             for k in DEFAULT_OBJECTIVES[search["algorithm"]])
    if role == "fine_tune":
        defaults["model_desc"] = merged
    top_k = sec.get("top_k")
    if top_k is not None:
        top_k = _int(top_k, f"{name}.top_k", 0 if role == "reignition" else 1)
    pretrained = _path_value(model.get("pretrained_model_file"), f"{name}.model.pretrained_model_file")
    where = f"{name}.pipe_step.models_folder" if "models_folder" in pipe else f"{name}.model.models_folder"
    folder = _path_value(pipe.get("models_folder", model.get("models_folder")), where)
    if "models_folder" in pipe and "models_folder" in model:  # checked too, though pipe_step's wins
        _path_value(model["models_folder"], f"{name}.model.models_folder")
    # keys this role has no use for: reported, never silently dropped
    for part, sub in (("pipe_step", pipe), ("model", model)):
        if "models_folder" in sub:
            ignored.append(_unused(f"{name}.{part}.models_folder",
                                   "fine_tune.models_folder" if role == "fine_tune" else "models_folder"))
    if pretrained is not None and role != "fine_tune":
        ignored.append(_unused(f"{name}.model.pretrained_model_file", "pretrained_model_file"))
    if "convert_pretrained" in desc_keys and role != "fine_tune":
        ignored.append(_unused(f"{name}.model.model_desc.convert_pretrained", "convert_pretrained"))
    if "freeze_swap_keys" in desc_keys and role not in ("serial", "parallel"):
        ignored.append(_unused(f"{name}.model.model_desc.freeze_swap_keys", "freeze_swap_keys"))
    if top_k is not None and role not in ("reignition", "full_train"):
        ignored.append(_unused(f"{name}.top_k", "top_k"))
    for key in ("image_size", "recalibrate_images", "head_iters"):
        if key in _mapping(sec.get("trainer"), f"{name}.trainer") and role != "reignition":
            ignored.append(_unused(f"{name}.trainer.{key}", key))
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
