"""Weight conversion from torchvision checkpoints, by name and strictly.

* :func:`convert_torchvision` maps a torchvision ``fasterrcnn_resnet50_fpn`` state dict onto
  :func:`~spnas.models.detector.build_detector`'s model.
* :func:`convert_resnet` maps a torchvision ``resnet50``-style classification state dict onto
  a :class:`~spnas.models.backbone.SerialBackbone`.

torchvision's released COCO checkpoint was saved from a model whose backbone used
``FrozenBatchNorm2d`` (no ``num_batches_tracked`` entries); both kinds are accepted.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..utils.errors import ConversionError
from .desc import normalize_desc
from .detector import build_detector, build_serial_backbone

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "net")


def unwrap_state_dict(obj: Any) -> OrderedDict[str, torch.Tensor]:
    """Return the tensor dict of a checkpoint: a plain state dict or one wrapped under
    ``model``/``state_dict``; a DDP ``module.`` prefix is removed."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key])
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"checkpoint is not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"checkpoint entries are not tensors: {bad[:5]}")
    out = OrderedDict()
    for k, v in obj.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


#: The tensor that tells a Mask R-CNN checkpoint from a Faster R-CNN one.
MASK_PREDICTOR = "roi_heads.mask_predictor.mask_fcn_logits.weight"


def _model_shapes(model: nn.Module) -> OrderedDict[str, torch.Size]:
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


@lru_cache(maxsize=32)
def _detector_shapes(desc_key: str) -> OrderedDict[str, torch.Size]:
    with torch.device("meta"):
        return _model_shapes(build_detector(json.loads(desc_key)))


def detector_shapes(desc: Mapping[str, Any]) -> OrderedDict[str, torch.Size]:
    """State-dict names and shapes of ``build_detector(desc)`` (built on the meta device)."""
    d = normalize_desc(desc)
    arch = {k: d[k] for k in ("type", "num_classes", "backbone", "neck")}
    return _detector_shapes(json.dumps(arch, sort_keys=True))


def strict_map(source: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                what: str) -> OrderedDict[str, torch.Tensor]:
    """Match ``source`` onto ``expected`` by name; BN ``num_batches_tracked`` may be absent
    (FrozenBatchNorm2d checkpoints). Raise ConversionError listing every misfit."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    missing, wrong = [], []
    for name, shape in expected.items():
        if name in source:
            t = source[name]
            if t.shape != shape:
                wrong.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(shape)}")
            out[name] = t.detach().clone()
        elif name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0, dtype=torch.long)
        else:
            missing.append(name)
    unexpected = [k for k in source if k not in expected]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the checkpoint: {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model: {unexpected}")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: {wrong}")
        raise ConversionError(f"{what} does not fit: " + "; ".join(parts))
    return out


def convert_torchvision(state_dict: Mapping[str, Any], desc: Mapping[str, Any] | None = None
                        ) -> OrderedDict[str, torch.Tensor]:
    """Map a torchvision ``fasterrcnn_resnet50_fpn`` or ``maskrcnn_resnet50_fpn`` state dict onto
    ``build_detector(desc)``.

    ``desc`` defaults to the ResNet-50 code with the checkpoint's own class count (read from
    ``roi_heads.box_predictor.cls_score.weight``) and type (``MaskRCNN`` when the checkpoint has
    a mask predictor). Backbone, FPN (biases included), RPN, RoI and mask heads map by name; BN
    tensors saved from ``FrozenBatchNorm2d`` (no ``num_batches_tracked``) are accepted. Raises
    :class:`ConversionError` listing every tensor that does not fit.
    """
    sd = unwrap_state_dict(state_dict)
    if desc is None:
        cls = sd.get("roi_heads.box_predictor.cls_score.weight")
        if cls is None:
            raise ConversionError("checkpoint has no 'roi_heads.box_predictor.cls_score.weight': "
                                  "not a torchvision Faster R-CNN or Mask R-CNN state dict")
        desc = {"num_classes": int(cls.shape[0]), "type": "MaskRCNN" if MASK_PREDICTOR in sd else "FasterRCNN"}
    kind = "Mask R-CNN" if normalize_desc(desc)["type"] == "MaskRCNN" else "Faster R-CNN"
    return strict_map(sd, detector_shapes(desc), f"torchvision {kind} checkpoint")


def convert_resnet(state_dict: Mapping[str, Any], desc: Mapping[str, Any] | None = None,
                   prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """Map a torchvision ``resnet*``/``resnext*`` classification state dict (its ``fc`` head is
    dropped) onto the description's :class:`SerialBackbone`; names get ``prefix`` (use
    ``"backbone.body."`` for a detector). Strict: raises :class:`ConversionError` on any misfit.
    """
    sd = OrderedDict((k, v) for k, v in unwrap_state_dict(state_dict).items() if not k.startswith("fc."))
    with torch.device("meta"):
        expected = _model_shapes(build_serial_backbone(desc))
    body = strict_map(sd, expected, "torchvision ResNet checkpoint")
    return OrderedDict((prefix + k, v) for k, v in body.items())
