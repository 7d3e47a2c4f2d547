"""Model size and cost: parameter counts and FLOPs for any description.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add)
on the meta device, so no memory is allocated and no arithmetic is done. ``gflops`` covers the
backbone, its parallel sub-networks and the FPN on one ``size x size`` image: the part the
search changes (the RPN and RoI heads cost the same for every candidate).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from .detector import build_backbone, build_detector, normalize_desc


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def params(desc: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Parameter counts: ``total`` (whole detector), ``backbone`` (serial body),
    ``parallel`` (connection modules), ``neck`` (FPN), ``heads`` (RPN + RoI heads)."""
    with torch.device("meta"):
        model = build_detector(desc)
    bb = model.backbone
    body, conn, fpn = _count(bb.body), _count(bb.connections), _count(bb.fpn)
    total = _count(model)
    return {"total": total, "backbone": body, "parallel": conn, "neck": fpn,
            "heads": total - body - conn - fpn}


def gflops(desc: Mapping[str, Any] | None = None, size: int = 800) -> float:
    """GFLOPs of backbone + parallel sub-networks + FPN on a ``1 x 3 x size x size`` input."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"input size must be an integer >= 32, got {size!r}")
    with torch.device("meta"):
        backbone = build_backbone(desc)
        x = torch.empty(1, 3, size, size)
    backbone.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone(x)
    return counter.get_total_flops() / 1e9


def stage_table(desc: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per stage: index, block code, number of blocks, input/output channels, stride, and the
    number of extra parallel passes."""
    d = normalize_desc(desc)
    with torch.device("meta"):
        bb = build_backbone(d)
    rows = []
    for s, stage in enumerate(bb.body.code.stages):
        rows.append({"stage": s, "code": stage, "blocks": len(stage),
                     "in_channels": bb.body.stage_in_channels[s],
                     "out_channels": bb.body.stage_channels[s],
                     "stride": 4 * 2 ** s, "parallel": d["neck"]["code"][s]})
    return rows


def describe(desc: Mapping[str, Any] | None = None, size: int = 800) -> dict[str, Any]:
    """Everything ``spnas describe`` prints, as a dict."""
    from .detector import arch_string
    d = normalize_desc(desc)
    return {"arch": arch_string(d), "desc": d, "stages": stage_table(d), "params": params(d),
            "gflops": gflops(d, size), "size": size}


def latency_ms(desc: Mapping[str, Any] | None = None, size: int = 800, device: "str | torch.device" = "cpu",
               repeats: int = 5) -> float:
    """Median wall time (ms) of one forward pass of backbone + parallel sub-networks + FPN on a
    ``1 x 3 x size x size`` input on ``device`` (eval mode, after two warm-up passes). Measured,
    so it varies a little between runs and machines: the search's ``latency`` objective."""
    import statistics
    import time
    dev = torch.device(device)
    model = build_backbone(desc).eval().to(dev)
    x = torch.randn(1, 3, size, size, device=dev)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= 2:
                times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)
