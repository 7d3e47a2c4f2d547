"""Model descriptions (Vega ``model_desc`` style): defaults, spellings and validation. No torch.

A description is a plain dict::

    {"type": "FasterRCNN",           # or "MaskRCNN" (boxes and instance masks), "SemanticFPN" (label maps)
     "num_classes": 91,
     "backbone": {"type": "SerialBackbone", "code": "111-2111-211111-211",
                  "block": "bottleneck", "base_channels": 64, "norm": "bn"},
     "neck": {"type": "ParallelFPN", "code": [0, 0, 0, 0], "out_channels": 256},
      "representation_size": 1024,   # RoI box head width (optional; 1024 when absent; detectors only)
      "head_channels": 128,          # semantic head width (SemanticFPN only; 128 when absent)
    ...any other FasterRCNN keyword argument (min_size, max_size, ...)}

:func:`normalize_desc` fills defaults, accepts Vega's spellings and rejects unknown keys. A
description is normalised once where it enters (config, CLI, pod input); builders and cost
measures take the normalised dict.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..utils import checks
from ..utils.errors import DescError, brief
from .encoding import format_arch, looks_like_arch, normalize_block, parse_arch, parse_parallel, parse_serial

DEFAULT_CODE = "111-2111-211111-211"
DEFAULT_DESC: dict[str, Any] = {
    "type": "FasterRCNN",
    "num_classes": 91,
    "backbone": {"type": "SerialBackbone", "code": DEFAULT_CODE, "block": "bottleneck",
                 "base_channels": 64, "norm": "bn"},
    "neck": {"type": "ParallelFPN", "code": None, "out_channels": 256},
}
#: Model types (spellings -> canonical): torchvision's Faster R-CNN (boxes) and Mask R-CNN (boxes
#: and instance masks: the same detector plus torchvision's mask head and predictor).
_DETECTOR_TYPES = {"fasterrcnn": "FasterRCNN", "faster_rcnn": "FasterRCNN",
                   "maskrcnn": "MaskRCNN", "mask_rcnn": "MaskRCNN",
                   "semanticfpn": "SemanticFPN", "semantic_fpn": "SemanticFPN"}
#: ... and the semantic-segmentation model (:mod:`.semantic`: a Panoptic-FPN-style semantic head
#: over every FPN level of the same backbone and parallel neck; one class per pixel).
MODEL_TYPES = ("FasterRCNN", "MaskRCNN", "SemanticFPN")
#: The task each model type solves (``spnas train --task``).
TASK_OF_TYPE = {"FasterRCNN": "detection", "MaskRCNN": "instance_segmentation",
                "SemanticFPN": "semantic_segmentation"}
TYPE_OF_TASK = {task: mtype for mtype, task in TASK_OF_TYPE.items()}
#: The keyword arguments a ``SemanticFPN`` takes (its image transform's: the detectors' meaning).
SEMANTIC_KWARGS = frozenset({"min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size"})
_BACKBONE_TYPES = {"serialbackbone", "serialnet"}
_NECK_TYPES = {"parallelfpn", "fpn"}
#: Vega model_desc keys that configure phases, not the architecture: accepted and kept, the
#: phases honour them (``convert_pretrained``, ``freeze_swap_keys``...).
NON_ARCH_KEYS = frozenset({"convert_pretrained", "freeze_swap_keys", "pretrained_model_file", "weight_file"})
#: ``FasterRCNN`` keyword arguments a description may set (torchvision 0.29's signature minus
#: ``backbone``/``num_classes``, plus the transform's ``size_divisible``/``fixed_size``); a test
#: keeps this list equal to torchvision's own signature.
_ARCH_KWARGS = frozenset({"rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor"})
DETECTOR_KWARGS = frozenset({
    "bbox_reg_weights", "box_batch_size_per_image", "box_bg_iou_thresh", "box_detections_per_img",
    "box_fg_iou_thresh", "box_nms_thresh", "box_positive_fraction", "box_score_thresh", "image_mean", "image_std",
    "max_size", "min_size", "rpn_batch_size_per_image", "rpn_bg_iou_thresh", "rpn_fg_iou_thresh", "rpn_nms_thresh",
    "rpn_positive_fraction", "rpn_post_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
    "rpn_pre_nms_top_n_train", "rpn_score_thresh", "size_divisible", "fixed_size"}) | _ARCH_KWARGS
#: Width of the RoI box head (torchvision ``TwoMLPHead``'s ``representation_size``): 1024 is
#: torchvision's (``fasterrcnn_resnet50_fpn`` checkpoints need it). A narrower head suits a narrow
#: backbone: at 1024 the head of a 16-channel backbone holds ~90 % of the detector's parameters
#: and a third of its training time, so the search's cost objectives would barely see the backbone.
DEFAULT_REPRESENTATION_SIZE = 1024
#: Normalisation layers of the backbone: ``bn`` (BatchNorm2d), ``frozen_bn`` (FrozenBatchNorm2d)
#: or ``syncbn`` (BatchNorm2d whose statistics are synchronised across the processes of a
#: data-parallel training on CUDA: ``SyncBatchNorm``, for small per-GPU batches; the same
#: weights and state-dict names as ``bn``).
NORMS = ("bn", "frozen_bn", "syncbn")
_NORM_SPELLINGS = {"bn": "bn", "batchnorm": "bn", "batchnorm2d": "bn", "frozen_bn": "frozen_bn",
                   "frozenbn": "frozen_bn", "frozen": "frozen_bn", "frozenbatchnorm2d": "frozen_bn",
                   "syncbn": "syncbn", "sync_bn": "syncbn", "syncbatchnorm": "syncbn"}


def normalize_norm(norm: Any) -> str:
    """``"bn"``, ``"frozen_bn"`` or ``"syncbn"`` for any accepted spelling (``BatchNorm2d``,
    ``FrozenBatchNorm2d``, ``SyncBatchNorm``...)."""
    key = str(norm).strip().lower()
    if key not in _NORM_SPELLINGS:
        raise DescError(f"model desc backbone.norm: must be one of {', '.join(NORMS)}, got {brief(norm)}")
    return _NORM_SPELLINGS[key]


def _int(value: Any, key: str, minimum: int = 1) -> int:
    return checks.integer(value, f"model desc {key}", minimum, error=DescError)


def _section(desc: dict[str, Any], key: str, default_type: str, types: set[str]) -> dict[str, Any]:
    """``desc[key]`` popped: a mapping (missing = empty) whose ``type`` (popped too) is one of ``types``."""
    sec = desc.pop(key, None) or {}
    if not isinstance(sec, Mapping):
        raise DescError(f"model desc {key} must be a mapping, got {sec!r}")
    sec = dict(sec)
    kind = sec.pop("type", default_type)
    if str(kind).lower() not in types:
        raise DescError(f"model desc {key}.type {kind!r} is not supported: expected {default_type!r}")
    return sec


def normalize_desc(desc: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return a complete, canonical copy of ``desc`` (defaults filled, spellings unified).

    Raises :class:`DescError` naming the key path for an unknown key or a bad value, and
    :class:`~spnas.errors.CodeError` for a bad code.
    """
    desc = copy.deepcopy(dict(desc or {}))
    if not isinstance(desc, dict):
        raise DescError(f"model desc must be a mapping, got {type(desc).__name__}")
    out = copy.deepcopy(DEFAULT_DESC)
    dtype = desc.pop("type", "FasterRCNN")
    if str(dtype).lower() not in _DETECTOR_TYPES:
        raise DescError(f"model desc type {dtype!r} is not supported: expected one of {list(MODEL_TYPES)}")
    out["type"] = _DETECTOR_TYPES[str(dtype).lower()]
    out["num_classes"] = _int(desc.pop("num_classes", 91), "num_classes", 2)

    bb = _section(desc, "backbone", "SerialBackbone", _BACKBONE_TYPES)
    neck = _section(desc, "neck", "ParallelFPN", _NECK_TYPES)

    code = bb.pop("code", DEFAULT_CODE)
    block = bb.pop("block", None)
    parallel = neck.pop("code", None)
    if looks_like_arch(code):
        a_block, serial, a_parallel = parse_arch(code)
        if block is not None and normalize_block(block) != a_block:
            raise DescError(f"model desc backbone.block {block!r} contradicts the code {code!r}")
        if parallel is not None and parse_parallel(parallel, serial.num_stages) != a_parallel:
            raise DescError(f"model desc neck.code {parallel!r} contradicts the code {code!r}")
        block, parallel = a_block, a_parallel
    else:
        serial = parse_serial(code)
    bbo = out["backbone"]
    bbo["code"] = str(serial)
    bbo["block"] = normalize_block(block if block is not None else "bottleneck")
    bbo["base_channels"] = _int(bb.pop("base_channels", 64), "backbone.base_channels")
    bbo["norm"] = normalize_norm(bb.pop("norm", "bn"))
    if bb:
        raise DescError(f"model desc backbone has unknown key(s) {sorted(bb)}; "
                        "known: type, code, block, base_channels, norm")
    out["neck"]["code"] = list(parse_parallel(parallel, serial.num_stages))
    out["neck"]["out_channels"] = _int(neck.pop("out_channels", 256), "neck.out_channels")
    if neck:
        raise DescError(f"model desc neck has unknown key(s) {sorted(neck)}; known: type, code, out_channels")
    semantic = out["type"] == "SemanticFPN"
    for key, other in (("representation_size", False), ("head_channels", True)):
        if key in desc:
            if semantic != other:
                raise DescError(f"model desc key {key!r} does not apply to a {out['type']} "
                                f"({'the semantic head of a SemanticFPN' if other else 'the RoI box head of a detector'})")
            out[key] = _int(desc.pop(key), key)
    for key in list(desc):
        if key in NON_ARCH_KEYS:
            out[key] = desc.pop(key)
        elif key in _ARCH_KWARGS:
            raise DescError(f"model desc key {key!r} is derived from the architecture and cannot be set")
        elif key in DETECTOR_KWARGS:
            if semantic and key not in SEMANTIC_KWARGS:
                raise DescError(f"model desc key {key!r} is a detector setting; a SemanticFPN has no RPN or RoI "
                                f"heads (its settings: {', '.join(sorted(SEMANTIC_KWARGS))}, head_channels)")
            out[key] = desc.pop(key)
    if desc:
        raise DescError(f"model desc has unknown key(s) {sorted(desc)}; known: type, num_classes, backbone, "
                        f"neck, representation_size, head_channels, {', '.join(sorted(NON_ARCH_KEYS))} and "
                        "FasterRCNN keyword arguments")
    return out


def arch_string(desc: Mapping[str, Any]) -> str:
    """Vega's one-string form of a description, e.g. ``r_111-2111-211111-211_0-0-0-0``."""
    d = normalize_desc(desc)
    return format_arch(d["backbone"]["block"], d["backbone"]["code"], d["neck"]["code"])
