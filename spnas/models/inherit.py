"""Weight inheritance between architectures (the morphisms of the search).

:func:`inherit_weights` builds a child's state dict from its parent's (expand, swap, width,
add-stage and parallel children) and reports which tensors were inherited and which are fresh.
Blocks are matched by their global index in the code, inserted blocks excluded
(:func:`align_blocks`). :func:`swap_trainable` says which of the child's parameters train under
``freeze_swap_keys``.
"""
from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
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

    The parent's blocks appear in the child in order; a matched pair has the same character
    (expand, swap, add-stage) or ``1`` <-> ``2`` (a width move shifted a ``2``); the other child
    blocks are inserted ``1`` blocks (expand) or blocks after the last matched one (add-stage).
    Among valid alignments the one with most same-character pairs wins, then the one keeping
    most stage starts on stage starts, then the earliest. Raises :class:`InheritanceError` when
    the child is not derivable from the parent: it drops blocks, or its blocks matched to the
    parent's hold more ``2`` s than the parent (a doubling no operator adds), or it has fewer
    ``2`` s in all than the parent (a doubling no operator removes).
    """
    p, c = parse_serial(parent), parse_serial(child)
    pb, cb = p.blocks, c.blocks
    ps, cs = set(p.stage_starts()), set(c.stage_starts())
    n, m = len(pb), len(cb)
    same = n + 1          # one same-character pair outweighs every stage-start agreement together
    neg = -10 ** 9
    # best[i][j]: best score aligning pb[i:] into cb[j:]; moves: pair (i, j), or insert cb[j] ('1' only)
    best = [[neg] * (m + 1) for _ in range(n + 1)]
    for j in range(m + 1):
        best[n][j] = 0

    def pair(i: int, j: int) -> int:
        return same * (cb[j] == pb[i]) + ((i in ps) == (j in cs))

    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            v = best[i + 1][j + 1] + pair(i, j) if best[i + 1][j + 1] > neg else neg
            if cb[j] == "1" and best[i][j + 1] > v:
                v = best[i][j + 1]
            best[i][j] = v
    if best[0][0] <= neg // 2:
        raise InheritanceError(
            f"child code '{c}' is not derivable from parent code '{p}' by expand, swap, width or add-stage: "
            f"it has {m} blocks, fewer than the parent's {n}")
    mapping, i, j = {}, 0, 0
    while i < n:
        if best[i + 1][j + 1] > neg and best[i + 1][j + 1] + pair(i, j) == best[i][j]:
            mapping[j] = i
            i += 1
        j += 1
    matched_twos = cb[:j].count("2")
    if matched_twos > pb.count("2") or cb.count("2") < pb.count("2"):
        raise InheritanceError(
            f"child code '{c}' is not derivable from parent code '{p}' by expand, swap, width or add-stage: "
            f"the parent doubles the width {pb.count('2')} time(s), the child {matched_twos} time(s) over "
            f"the parent's blocks and {cb.count('2')} in all")
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
    * a block paired with a parent block of the other character (a width move) keeps the tensors
      whose shape still fits; the others are fresh;
    * a block that now needs a projection shortcut its parent block lacked (or had in another
      shape) gets a fresh one that passes its input through (1x1 identity conv, identity BN)
      when its input and output widths agree;
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
    for g, (s, j) in enumerate(cpos):
        blk = getattr(body, f"layer{s + 1}")[j]
        parent_ds = None
        if g not in mapping:  # inserted block: identity residual branch
            nn.init.zeros_(getattr(blk, last_bn_name(cd["backbone"]["block"])).weight)
        else:
            ps_, pj = block_map[(s, j)]
            parent_ds = parent_sd.get(f"backbone.body.layer{ps_ + 1}.{pj}.downsample.0.weight")
        if blk.downsample is not None and (parent_ds is None or parent_ds.shape != blk.downsample[0].weight.shape):
            conv, bn = blk.downsample[0], blk.downsample[1]
            if conv.in_channels == conv.out_channels:
                with torch.no_grad():
                    conv.weight.copy_(torch.eye(conv.out_channels).view_as(conv.weight))
                    bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1)

    zeroed = _zero_fresh_laterals(child, parent_sd)

    child_sd = child.state_dict()
    sources: dict[str, str | None] = {}
    for name, tensor in child_sd.items():
        src: str | None = name
        mt = _BLOCK_KEY.match(name)
        if mt:
            key = (int(mt["stage"]) - 1, int(mt["idx"]))
            if key in block_map:
                ps_, pj = block_map[key]
                src = f"{mt['prefix']}layer{ps_ + 1}.{pj}.{mt['rest']}"
            else:
                src = None
        fits = name not in zeroed and src is not None and src in parent_sd and parent_sd[src].shape == tensor.shape
        sources[name] = src if fits else None
    for name in child_sd:  # a BN's step counter goes with its BN: fresh when the BN's weight is
        owner = name[:-len("num_batches_tracked")] + "weight"
        if name.endswith(".num_batches_tracked") and owner in sources and sources[owner] is None:
            sources[name] = None
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    inherited, fresh, used = [], [], set()
    for name, tensor in child_sd.items():
        src = sources[name]
        if src is not None:
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


#: Parameters outside this prefix (FPN, parallel connections, RPN and RoI heads) always train
#: under ``freeze_swap_keys``.
_FROZEN_PREFIX = "backbone.body."


def swap_trainable(parent_desc: Mapping[str, Any], child_desc: Mapping[str, Any],
                   report: Mapping[str, Sequence[str]]) -> frozenset[str]:
    """Names of the child's parameters that train under ``freeze_swap_keys`` ("freeze what the
    mutation did not touch"), given the :func:`inherit_weights` ``report`` of this pair.

    Trainable: every parameter outside the serial backbone (FPN, parallel connections, heads);
    every block whose stage changed (its matched parent block sat in another stage) or whose
    stride changed; every fresh tensor. Frozen: the rest of the serial backbone, stem included.
    When that leaves nothing to train, every parameter trains (logged as a warning).
    """
    pd, cd = normalize_desc(parent_desc), normalize_desc(child_desc)
    pcode, ccode = parse_serial(pd["backbone"]["code"]), parse_serial(cd["backbone"]["code"])
    ppos, cpos = pcode.block_positions(), ccode.block_positions()
    moved = []
    for cj, pj in align_blocks(pcode, ccode).items():
        (cs, ci), (ps_, pi) = cpos[cj], ppos[pj]
        if cs != ps_ or (cs > 0 and ci == 0) != (ps_ > 0 and pi == 0):  # stage or stride changed
            moved.append(f"{_FROZEN_PREFIX}layer{cs + 1}.{ci}.")
    fresh = set(report["fresh"])
    with torch.device("meta"):
        names = [n for n, _ in build_detector(cd).named_parameters()]
    keep = frozenset(n for n in names if not n.startswith(_FROZEN_PREFIX) or n in fresh
                     or n.startswith(tuple(moved)))
    if not keep:
        log.warning("freeze_swap_keys: nothing of %s -> %s is left to train; every parameter trains",
                    pcode, ccode)
        return frozenset(names)
    log.info("freeze_swap_keys %s -> %s: %d of %d parameter tensors train (%d moved block(s))",
             pcode, ccode, len(keep), len(names), len(moved))
    return keep
