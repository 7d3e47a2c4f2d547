"""Weight inheritance between architectures (the morphisms of the search).

:func:`inherit_weights` builds a child's state dict from its parent's (expand, swap, add-stage
and parallel children) and reports which tensors were inherited and which are fresh. Blocks are
matched by their global index in the code, inserted blocks excluded (:func:`align_blocks`).
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..utils.errors import InheritanceError
from .backbone import last_bn_name
from .convert import unwrap_state_dict
from .desc import normalize_desc
from .detector import build_detector
from .encoding import SerialCode, parse_serial

log = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^(?P<prefix>(?:backbone\.)?body\.)layer(?P<stage>\d+)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def align_blocks(parent: str | SerialCode, child: str | SerialCode) -> dict[int, int]:
    """Map child block index -> parent block index (global indices).

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


def _zero_fresh_laterals(child: nn.Module, parent_sd: Mapping[str, torch.Tensor]) -> set[str]:
    """Zero the FPN laterals of ``child`` whose weight the parent lacks (a new level) or has
    in another shape (the stage's width changed); return their tensor names."""
    names: set[str] = set()
    for i, block in enumerate(child.backbone.fpn.inner_blocks):
        prefix = f"backbone.fpn.inner_blocks.{i}.0."
        conv = block[0]
        parent_w = parent_sd.get(prefix + "weight")
        if parent_w is None or parent_w.shape != conv.weight.shape:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            names.update((prefix + "weight", prefix + "bias"))
    return names


def inherit_weights(parent_desc: Mapping[str, Any], parent_state: Mapping[str, torch.Tensor],
                    child_desc: Mapping[str, Any], seed: int = 0
                    ) -> tuple[OrderedDict[str, torch.Tensor], dict[str, list[str]]]:
    """Child state dict from the parent's weights and a report.

    * matched blocks (by global index, inserted blocks excluded) keep every tensor;
    * an inserted (expand) block is fresh with its last residual BN at zero: an identity;
    * a block that now needs a projection shortcut its parent block lacked gets a fresh one that
      passes its input through (1x1 identity conv, identity BN);
    * new stages, FPN levels and connection modules are fresh (connections start at zero);
    * a fresh FPN lateral (``backbone.fpn.inner_blocks.<i>.0.weight`` and ``.bias``: the level
      of a new stage, or of a stage whose output width changed) starts at zero, so nothing new
      flows down the FPN's top-down path: after add-stage every old level computes exactly what
      the parent's did (eval mode);
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

    zeroed = _zero_fresh_laterals(child, parent_sd)

    child_sd = child.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
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
        if name not in zeroed and src is not None and src in parent_sd and parent_sd[src].shape == tensor.shape:
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
