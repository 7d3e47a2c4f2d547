"""Weight conversion from torchvision and weight inheritance between architectures (SPEC 3).

* :func:`convert_torchvision` maps a torchvision ``fasterrcnn_resnet50_fpn`` state dict onto
  :func:`~spnas.detector.build_detector`'s model by name, strictly.
* :func:`convert_resnet` maps a torchvision ``resnet50``-style classification state dict onto
  a :class:`~spnas.backbone.SerialBackbone`.
* :func:`inherit_weights` builds a child's state dict from its parent's (expand, swap,
  add-stage and parallel children) and reports which tensors were inherited and which are fresh.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Mapping

import torch
from torch import nn

from .backbone import last_bn_name
from .detector import build_detector, build_serial_backbone, normalize_desc
from .encoding import SerialCode, parse_serial
from .errors import ConversionError, InheritanceError

log = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^(?P<prefix>(?:backbone\.)?body\.)layer(?P<stage>\d+)\.(?P<idx>\d+)\.(?P<rest>.+)$")
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "net")


def unwrap_state_dict(obj: Any) -> "OrderedDict[str, torch.Tensor]":
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


def _model_shapes(model: nn.Module) -> "OrderedDict[str, torch.Size]":
    return OrderedDict((k, v.shape) for k, v in model.state_dict().items())


@lru_cache(maxsize=32)
def _detector_shapes(desc_key: str) -> "OrderedDict[str, torch.Size]":
    import json
    with torch.device("meta"):
        return _model_shapes(build_detector(json.loads(desc_key)))


def detector_shapes(desc: Mapping[str, Any]) -> "OrderedDict[str, torch.Size]":
    """State-dict names and shapes of ``build_detector(desc)`` (built on the meta device)."""
    import json
    d = normalize_desc(desc)
    arch = {k: d[k] for k in ("type", "num_classes", "backbone", "neck")}
    return _detector_shapes(json.dumps(arch, sort_keys=True))


def _strict_map(source: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                what: str) -> "OrderedDict[str, torch.Tensor]":
    """Match ``source`` onto ``expected`` by name; BN ``num_batches_tracked`` may be absent
    (FrozenBatchNorm2d checkpoints). Raise ConversionError listing every misfit."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
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
                        ) -> "OrderedDict[str, torch.Tensor]":
    """Map a torchvision ``fasterrcnn_resnet50_fpn`` state dict onto ``build_detector(desc)``.

    ``desc`` defaults to the ResNet-50 code with the checkpoint's own class count (read from
    ``roi_heads.box_predictor.cls_score.weight``). Backbone, FPN (biases included), RPN and RoI
    heads map by name; BN tensors saved from ``FrozenBatchNorm2d`` (no ``num_batches_tracked``)
    are accepted. Raises :class:`ConversionError` listing every tensor that does not fit.
    """
    sd = unwrap_state_dict(state_dict)
    if desc is None:
        cls = sd.get("roi_heads.box_predictor.cls_score.weight")
        if cls is None:
            raise ConversionError("checkpoint has no 'roi_heads.box_predictor.cls_score.weight': "
                                  "not a torchvision Faster R-CNN state dict")
        desc = {"num_classes": int(cls.shape[0])}
    return _strict_map(sd, detector_shapes(desc), "torchvision Faster R-CNN checkpoint")


def convert_resnet(state_dict: Mapping[str, Any], desc: Mapping[str, Any] | None = None,
                   prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """Map a torchvision ``resnet*``/``resnext*`` classification state dict (its ``fc`` head is
    dropped) onto the description's :class:`SerialBackbone`; names get ``prefix`` (use
    ``"backbone.body."`` for a detector). Strict: raises :class:`ConversionError` on any misfit.
    """
    sd = OrderedDict((k, v) for k, v in unwrap_state_dict(state_dict).items() if not k.startswith("fc."))
    with torch.device("meta"):
        expected = _model_shapes(build_serial_backbone(desc))
    body = _strict_map(sd, expected, "torchvision ResNet checkpoint")
    return OrderedDict((prefix + k, v) for k, v in body.items())


# ----------------------------------------------------------------------------- inheritance

def align_blocks(parent: "str | SerialCode", child: "str | SerialCode") -> dict[int, int]:
    """Map child block index -> parent block index (global indices, SPEC 3).

    The parent's blocks must appear in the child in order with the same characters; extra child
    blocks are inserted ``1`` blocks (expand) or blocks after the last parent block (add-stage).
    Among valid alignments the one keeping most stage starts on stage starts wins, then the
    earliest. Raises :class:`InheritanceError` when the child is not derivable from the parent.
    """
    p, c = parse_serial(parent), parse_serial(child)
    pb, cb = p.blocks, c.blocks
    ps, cs = set(p.stage_starts()), set(c.stage_starts())
    n, m = len(pb), len(cb)
    neg = -10 ** 9
    # best[i][j]: best score aligning pb[i:] into cb[j:]
    best = [[neg] * (m + 1) for _ in range(n + 1)]
    for j in range(m + 1):
        best[n][j] = 0
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            v = neg
            if cb[j] == pb[i] and best[i + 1][j + 1] > neg:
                v = best[i + 1][j + 1] + ((i in ps) == (j in cs))
            if cb[j] == "1" and best[i][j + 1] > v:
                v = best[i][j + 1]
            best[i][j] = v
    if best[0][0] <= neg // 2:
        raise InheritanceError(
            f"child code '{c}' is not derivable from parent code '{p}' by expand, swap or add-stage: "
            "the parent's blocks must appear in the child in order")
    mapping, i, j = {}, 0, 0
    while i < n:
        if cb[j] == pb[i] and best[i + 1][j + 1] > neg and \
                best[i + 1][j + 1] + ((i in ps) == (j in cs)) == best[i][j]:
            mapping[j] = i
            i += 1
        j += 1
    return mapping


def _block_key_map(parent: SerialCode, child: SerialCode, mapping: dict[int, int]) -> dict[tuple[int, int], tuple[int, int]]:
    ppos, cpos = parent.block_positions(), child.block_positions()
    return {cpos[cj]: ppos[pj] for cj, pj in mapping.items()}


def inherit_weights(parent_desc: Mapping[str, Any], parent_state: Mapping[str, torch.Tensor],
                    child_desc: Mapping[str, Any], seed: int = 0
                    ) -> "tuple[OrderedDict[str, torch.Tensor], dict[str, list[str]]]":
    """Child state dict from the parent's weights (SPEC 3) and a report.

    * matched blocks (by global index, inserted blocks excluded) keep every tensor;
    * an inserted (expand) block is fresh with its last residual BN at zero: an identity;
    * a block that now needs a projection shortcut its parent block lacked gets a fresh one that
      passes its input through (1x1 identity conv, identity BN);
    * new stages, FPN levels and connection modules are fresh (connections start at zero);
    * everything else with the same name and shape is inherited.

    Fresh tensors are drawn from ``seed``. ``report`` has ``inherited`` and ``fresh`` (child
    tensor names) and ``dropped`` (parent tensors the child has no use for).
    """
    pd, cd = normalize_desc(parent_desc), normalize_desc(child_desc)
    for key in ("block", "base_channels"):
        if pd["backbone"][key] != cd["backbone"][key]:
            raise InheritanceError(
                f"backbone.{key} differs between parent ({pd['backbone'][key]!r}) and child "
                f"({cd['backbone'][key]!r}): weights cannot be inherited")
    pcode, ccode = parse_serial(pd["backbone"]["code"]), parse_serial(cd["backbone"]["code"])
    mapping = align_blocks(pcode, ccode)
    block_map = _block_key_map(pcode, ccode, mapping)
    parent_sd = unwrap_state_dict(parent_state)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        child = build_detector(cd)
    body = child.backbone.body
    cpos = ccode.block_positions()
    identity_init: set[str] = set()
    for g, (s, j) in enumerate(cpos):
        blk = getattr(body, f"layer{s + 1}")[j]
        prefix = f"backbone.body.layer{s + 1}.{j}."
        if g not in mapping:  # inserted block: identity residual branch
            nn.init.zeros_(getattr(blk, last_bn_name(cd["backbone"]["block"])).weight)
            continue
        ps_, pj = block_map[(s, j)]
        parent_has_ds = f"backbone.body.layer{ps_ + 1}.{pj}.downsample.0.weight" in parent_sd
        if blk.downsample is not None and not parent_has_ds:
            conv, bn = blk.downsample[0], blk.downsample[1]
            if conv.in_channels == conv.out_channels:
                with torch.no_grad():
                    conv.weight.copy_(torch.eye(conv.out_channels).view_as(conv.weight))
                    bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1)
                identity_init.add(prefix + "downsample.")

    child_sd = child.state_dict()
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    inherited, fresh, used = [], [], set()
    for name, tensor in child_sd.items():
        src = name
        mt = _BLOCK_KEY.match(name)
        if mt:
            key = (int(mt["stage"]) - 1, int(mt["idx"]))
            if key in block_map:
                ps_, pj = block_map[key]
                src = f"{mt['prefix']}layer{ps_ + 1}.{pj}.{mt['rest']}"
            else:
                src = None
        if src is not None and src in parent_sd and parent_sd[src].shape == tensor.shape:
            out[name] = parent_sd[src].detach().clone()
            inherited.append(name)
            used.add(src)
        else:
            out[name] = tensor.detach().clone()
            fresh.append(name)
    dropped = [k for k in parent_sd if k not in used]
    log.debug("inherit %s -> %s: %d inherited, %d fresh, %d dropped", pcode, ccode,
              len(inherited), len(fresh), len(dropped))
    return out, {"inherited": inherited, "fresh": fresh, "dropped": dropped}
