"""Model descriptions (Vega ``model_desc`` style) and Faster R-CNN assembly.

A description is a plain dict::

    {"type": "FasterRCNN", "num_classes": 91,
     "backbone": {"type": "SerialBackbone", "code": "111-2111-211111-211",
                  "block": "bottleneck", "base_channels": 64, "norm": "bn"},
     "neck": {"type": "ParallelFPN", "code": [0, 0, 0, 0], "out_channels": 256},
     ...any other FasterRCNN keyword argument (min_size, max_size, ...)}

:func:`normalize_desc` fills defaults, accepts Vega's spellings and rejects unknown keys;
:func:`build_detector` builds torchvision's ``FasterRCNN`` with anchors and RoI pooling sized
to the number of feature levels (for 4 stages exactly ``fasterrcnn_resnet50_fpn``'s).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Mapping

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from .backbone import SerialBackbone, SerialClassifier, norm_layer_for
from .encoding import format_arch, looks_like_arch, normalize_block, parse_arch, parse_parallel, parse_serial
from .errors import CodeError, DescError
from .parallel import ParallelFPN

DEFAULT_CODE = "111-2111-211111-211"
DEFAULT_DESC: dict[str, Any] = {
    "type": "FasterRCNN",
    "num_classes": 91,
    "backbone": {"type": "SerialBackbone", "code": DEFAULT_CODE, "block": "bottleneck",
                 "base_channels": 64, "norm": "bn"},
    "neck": {"type": "ParallelFPN", "code": None, "out_channels": 256},
}
_DETECTOR_TYPES = {"fasterrcnn", "faster_rcnn"}
_BACKBONE_TYPES = {"serialbackbone", "serialnet"}
_NECK_TYPES = {"parallelfpn", "fpn"}
#: Vega model_desc keys that configure phases, not the architecture: accepted and kept, the
#: phases honour them (``convert_pretrained``, ``freeze_swap_keys``...).
NON_ARCH_KEYS = frozenset({"convert_pretrained", "freeze_swap_keys", "pretrained_model_file", "weight_file"})
_SKIP = {"self", "backbone", "num_classes", "kwargs"}
DETECTOR_KWARGS = frozenset(
    p for p in inspect.signature(FasterRCNN.__init__).parameters if p not in _SKIP
) | {"size_divisible", "fixed_size"}
_ARCH_KWARGS = {"rpn_anchor_generator", "rpn_head", "box_roi_pool", "box_head", "box_predictor"}


def _int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, float) and value.is_integer():  # KFP structs deliver ints as floats
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DescError(f"model desc {key} must be an integer >= {minimum}, got {value!r}")
    return value


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
        raise DescError(f"model desc type {dtype!r} is not supported: expected 'FasterRCNN'")
    out["num_classes"] = _int(desc.pop("num_classes", 91), "num_classes", 2)

    bb = desc.pop("backbone", None) or {}
    if not isinstance(bb, Mapping):
        raise DescError(f"model desc backbone must be a mapping, got {bb!r}")
    bb = dict(bb)
    btype = bb.pop("type", "SerialBackbone")
    if str(btype).lower() not in _BACKBONE_TYPES:
        raise DescError(f"model desc backbone.type {btype!r} is not supported: expected 'SerialBackbone'")
    neck = desc.pop("neck", None) or {}
    if not isinstance(neck, Mapping):
        raise DescError(f"model desc neck must be a mapping, got {neck!r}")
    neck = dict(neck)
    ntype = neck.pop("type", "ParallelFPN")
    if str(ntype).lower() not in _NECK_TYPES:
        raise DescError(f"model desc neck.type {ntype!r} is not supported: expected 'ParallelFPN'")

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
    norm = bb.pop("norm", "bn")
    norm_layer_for(norm)
    bbo["norm"] = "frozen_bn" if "frozen" in str(norm).lower() else "bn"
    if bb:
        raise DescError(f"model desc backbone has unknown key(s) {sorted(bb)}; "
                        "known: type, code, block, base_channels, norm")
    out["neck"]["code"] = list(parse_parallel(parallel, serial.num_stages))
    out["neck"]["out_channels"] = _int(neck.pop("out_channels", 256), "neck.out_channels")
    if neck:
        raise DescError(f"model desc neck has unknown key(s) {sorted(neck)}; known: type, code, out_channels")
    for key in list(desc):
        if key in NON_ARCH_KEYS:
            out[key] = desc.pop(key)
        elif key in _ARCH_KWARGS:
            raise DescError(f"model desc key {key!r} is derived from the architecture and cannot be set")
        elif key in DETECTOR_KWARGS:
            out[key] = desc.pop(key)
    if desc:
        raise DescError(f"model desc has unknown key(s) {sorted(desc)}; known: type, num_classes, backbone, "
                        f"neck, {', '.join(sorted(NON_ARCH_KEYS))} and FasterRCNN keyword arguments")
    return out


def arch_string(desc: Mapping[str, Any]) -> str:
    """Vega's one-string form of a description, e.g. ``r_111-2111-211111-211_0-0-0-0``."""
    d = normalize_desc(desc)
    return format_arch(d["backbone"]["block"], d["backbone"]["code"], d["neck"]["code"])


def build_serial_backbone(desc: Mapping[str, Any] | None = None) -> SerialBackbone:
    """The description's backbone alone (for reignition and conversion checks)."""
    bb = normalize_desc(desc)["backbone"]
    return SerialBackbone(bb["code"], bb["block"], bb["base_channels"], bb["norm"])


def build_backbone(desc: Mapping[str, Any] | None = None) -> ParallelFPN:
    """The description's backbone + parallel sub-networks + FPN (the detector's ``backbone``)."""
    d = normalize_desc(desc)
    return ParallelFPN(build_serial_backbone(d), d["neck"]["code"], d["neck"]["out_channels"])


def build_classifier(desc: Mapping[str, Any] | None, num_classes: int) -> SerialClassifier:
    """Backbone of ``desc`` + global pool + linear head with ``num_classes`` outputs."""
    return SerialClassifier(build_serial_backbone(desc), num_classes)


def anchor_generator(num_levels: int) -> AnchorGenerator:
    """One anchor size per FPN level (32 * 2**i) and ratios (0.5, 1, 2): torchvision's
    defaults for 4 stages + the extra pooled level."""
    sizes = tuple((32 * 2 ** i,) for i in range(num_levels))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)


def build_detector(desc: Mapping[str, Any] | None = None) -> nn.Module:
    """Build torchvision's ``FasterRCNN`` on the described backbone.

    Missing keys take the defaults of :data:`DEFAULT_DESC`; other ``FasterRCNN`` keyword
    arguments (``min_size``, ``max_size``, ``box_score_thresh``...) pass through.
    """
    d = normalize_desc(desc)
    backbone = build_backbone(d)
    kwargs = {k: v for k, v in d.items() if k in DETECTOR_KWARGS}
    n_levels = len(d["neck"]["code"])
    try:
        return FasterRCNN(
            backbone, num_classes=d["num_classes"],
            rpn_anchor_generator=anchor_generator(n_levels + 1),
            box_roi_pool=MultiScaleRoIAlign(backbone.featmap_names, output_size=7, sampling_ratio=2),
            **kwargs)
    except (TypeError, ValueError) as exc:  # a bad pass-through keyword argument
        raise DescError(f"model desc keyword arguments {sorted(kwargs)} rejected by FasterRCNN: {exc}") from exc


__all__ = ["DEFAULT_DESC", "normalize_desc", "arch_string", "build_detector", "build_backbone",
           "build_serial_backbone", "build_classifier", "anchor_generator", "CodeError"]
