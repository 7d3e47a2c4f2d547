"""Model assembly on the described backbone (torchvision ``FasterRCNN`` or ``MaskRCNN``, or the
semantic :class:`~spnas.models.semantic.SemanticFPN`).

:func:`build_detector` builds torchvision's ``FasterRCNN`` (``type: FasterRCNN``) or ``MaskRCNN``
(``type: MaskRCNN``: the same detector plus torchvision's mask head and predictor) with anchors
and RoI pooling sized to the number of feature levels (for 4 stages exactly
``fasterrcnn_resnet50_fpn``'s / ``maskrcnn_resnet50_fpn``'s). Builders take a description
(normalised here when it is not yet).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from ..utils.errors import DescError
from .backbone import SerialBackbone, SerialClassifier
from .desc import DEFAULT_REPRESENTATION_SIZE, DETECTOR_KWARGS, normalize_desc
from .neck import ParallelFPN


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
    """Build torchvision's ``FasterRCNN`` (or ``MaskRCNN`` for ``type: MaskRCNN``, its mask RoI
    pooling at 14 px over the same levels, as ``maskrcnn_resnet50_fpn``; or, for ``type:
    SemanticFPN``, the semantic-segmentation model of :mod:`.semantic`) on the described backbone:
    the one builder of every model type.

    Missing keys take the defaults of :data:`DEFAULT_DESC`; other ``FasterRCNN`` keyword
    arguments (``min_size``, ``max_size``, ``box_score_thresh``...) pass through.
    ``representation_size`` sets the width of the RoI box head (``roi_heads.box_head.fc6/fc7``
    and the predictor's input, torchvision's module names at every width).
    """
    d = normalize_desc(desc)
    backbone = build_backbone(d)
    kwargs = {k: v for k, v in d.items() if k in DETECTOR_KWARGS}
    if d["type"] == "SemanticFPN":
        from .semantic import DEFAULT_HEAD_CHANNELS, SemanticFPN
        return SemanticFPN(backbone, d["num_classes"], d.get("head_channels", DEFAULT_HEAD_CHANNELS), **kwargs)
    n_levels = len(d["neck"]["code"])
    pool = MultiScaleRoIAlign(backbone.featmap_names, output_size=7, sampling_ratio=2)
    width = d.get("representation_size", DEFAULT_REPRESENTATION_SIZE)
    head: dict[str, Any] = {"num_classes": d["num_classes"]}
    if width != DEFAULT_REPRESENTATION_SIZE:  # torchvision builds the same head itself at 1024
        resolution = pool.output_size[0]
        head = {"num_classes": None,
                "box_head": TwoMLPHead(backbone.out_channels * resolution ** 2, width),
                "box_predictor": FastRCNNPredictor(width, d["num_classes"])}
    cls: type[FasterRCNN] = FasterRCNN
    if d["type"] == "MaskRCNN":
        cls = MaskRCNN
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(backbone.featmap_names, output_size=14, sampling_ratio=2)
        if head["num_classes"] is None:  # a custom box head: torchvision then builds no mask predictor itself
            kwargs["mask_predictor"] = MaskRCNNPredictor(256, 256, d["num_classes"])
    try:
        return cls(backbone, rpn_anchor_generator=anchor_generator(n_levels + 1), box_roi_pool=pool, **head, **kwargs)
    except (TypeError, ValueError) as exc:  # a bad pass-through keyword argument
        raise DescError(f"model desc keyword arguments {sorted(kwargs)} rejected by {d['type']}: {exc}") from exc
