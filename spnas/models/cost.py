"""Model size and cost: parameter counts, FLOPs and forward latency.

The measures take a built module, so a caller builds a model once and measures it as it is:
``count_params(detector)``, ``count_gflops(detector.backbone, size)``, ``latency_ms(...)``. FLOPs
are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add); on a
module built on the meta device (:func:`measure`) no memory is allocated and no arithmetic is
done. ``gflops`` covers the backbone, its parallel sub-networks and the FPN on one
``size x size`` image: the part the search changes (the RPN and RoI heads cost the same for
every candidate).
"""
from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..utils import checks
from .desc import arch_string, normalize_desc
from .detector import build_backbone, build_detector


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"input size must be an integer >= 32, got {size!r}")
    return size


def count_params(detector: nn.Module) -> dict[str, int]:
    """Parameter counts of a built detector: ``total``, ``backbone`` (serial body), ``parallel``
    (connection modules), ``neck`` (FPN), ``heads`` (RPN + RoI heads)."""
    bb = detector.backbone
    body, conn, fpn = _count(bb.body), _count(bb.connections), _count(bb.fpn)
    total = _count(detector)
    return {"total": total, "backbone": body, "parallel": conn, "neck": fpn, "heads": total - body - conn - fpn}


def count_gflops(backbone: nn.Module, size: int = 800) -> float:
    """GFLOPs of a built backbone + parallel sub-networks + FPN (a ``ParallelFPN``) on one
    ``1 x 3 x size x size`` input, on the module's own device (free on the meta device)."""
    _check_size(size)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            backbone(torch.zeros(1, 3, size, size, device=device))
    finally:
        backbone.train(was_training)
    return counter.get_total_flops() / 1e9


@functools.lru_cache(maxsize=4096)
def _measure_cached(desc_json: str, size: int) -> tuple[int, float]:
    with torch.device("meta"):
        model = build_detector(json.loads(desc_json))
    return count_params(model)["total"], count_gflops(model.backbone, size)


def measure(desc: Mapping[str, Any], size: int = 800) -> tuple[int, float]:
    """``(total detector params, GFLOPs at size x size)`` of a description: one detector built on
    the meta device (cached by description)."""
    return _measure_cached(json.dumps(normalize_desc(desc), sort_keys=True), _check_size(size))


def params(desc: Mapping[str, Any] | None = None) -> dict[str, int]:
    """:func:`count_params` of the description's detector (built on the meta device)."""
    with torch.device("meta"):
        return count_params(build_detector(desc))


def gflops(desc: Mapping[str, Any] | None = None, size: int = 800) -> float:
    """GFLOPs of the description's backbone + parallel sub-networks + FPN (see :func:`measure`)."""
    return measure(desc or {}, size)[1]


def stage_table(desc: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per stage: index, block code, number of blocks, input/output channels, stride, and the
    number of parallel columns."""
    d = normalize_desc(desc)
    with torch.device("meta"):
        bb = build_backbone(d)
    return [{"stage": s, "code": stage, "blocks": len(stage), "in_channels": bb.body.stage_in_channels[s],
             "out_channels": bb.body.stage_channels[s], "stride": 4 * 2 ** s, "parallel": d["neck"]["code"][s]}
            for s, stage in enumerate(bb.body.code.stages)]


def describe(desc: Mapping[str, Any] | None = None, size: int = 800) -> dict[str, Any]:
    """Everything ``spnas describe`` prints, as a dict."""
    d = normalize_desc(desc)
    return {"arch": arch_string(d), "desc": d, "stages": stage_table(d), "params": params(d),
            "gflops": gflops(d, size), "size": size}


def forward_cost(module: nn.Module, size: int = 800, device: str | torch.device = "cpu",
                 repeats: int = 5) -> tuple[float, float]:
    """``(GFLOPs, latency ms)`` of a built ``module`` (e.g. a detector's backbone) on one
    ``1 x 3 x size x size`` input on ``device`` (the module is moved there, eval mode). The first
    of two warm-up passes counts the FLOPs; the latency is the median wall time of ``repeats``
    further passes. Measured, so the latency varies a little between runs and machines."""
    dev = torch.device(device)
    was_training = module.training
    module.eval().to(dev)
    x = torch.randn(1, 3, _check_size(size), size, device=dev)
    counter = FlopCounterMode(display=False)
    times = []
    try:
        with torch.inference_mode():
            for i in range(repeats + 2):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                if i == 0:
                    with counter:
                        module(x)
                else:
                    module(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= 2:
                    times.append((time.perf_counter() - t) * 1000)
    finally:
        module.train(was_training)
    return counter.get_total_flops() / 1e9, round(statistics.median(times), 3)


@functools.lru_cache(maxsize=1024)
def _stage_pass_cached(code: str, block: str, base_channels: int, norm: str, size: int) -> tuple[float, ...]:
    from .encoding import parse_serial
    desc = {"backbone": {"code": code, "block": block, "base_channels": base_channels, "norm": norm},
            "neck": {"code": [1] * parse_serial(code).num_stages}}
    with torch.device("meta"):
        bb = build_backbone(desc)
        x = torch.empty(1, 3, size, size)
    bb.eval()
    costs = []
    with torch.no_grad():
        x = bb.body.stem(x)
        for s, stage in enumerate(bb.body.stages):
            counter = FlopCounterMode(display=False)
            with counter:
                y = stage(x)
                bb.connections[s][0](y)
            costs.append(counter.get_total_flops() / 1e9)
            x = y
    return tuple(costs)


def stage_pass_gflops(desc: Mapping[str, Any], size: int) -> list[float]:
    """GFLOPs of one more parallel column of every stage at ``size x size`` input: the stage
    module on its input shape plus its connection module (a column's input has the stage
    input's shape whichever column or path it comes from; cached per backbone)."""
    bb = normalize_desc(desc)["backbone"]
    return list(_stage_pass_cached(bb["code"], bb["block"], bb["base_channels"], bb["norm"], _check_size(size)))


@functools.lru_cache(maxsize=4096)
def _memory_cached(desc_json: str, size: int, batch: int) -> float:
    from torch.autograd.graph import saved_tensors_hooks
    with torch.device("meta"):
        model = build_detector(json.loads(desc_json))
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    backbone = model.backbone.train()
    with saved_tensors_hooks(pack, lambda t: t):
        backbone(torch.empty(batch, 3, size, size, device="meta"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (saved[0] + 3 * weights) / 2**20


def train_memory_mb(desc: Mapping[str, Any], size: int = 800, batch: int = 4) -> float:
    """Deterministic estimate of a training step's memory (MiB) at ``batch`` images of
    ``size x size``: the activations autograd saves in a train-mode forward of backbone +
    parallel sub-networks + FPN (each saved tensor counted once per save), plus weights,
    gradients and SGD momentum of the whole detector (3 x parameter bytes). Measured on the meta
    device: no memory, no arithmetic. The RPN and RoI heads' activations are left out (they cost
    about the same for every candidate), so use it to compare candidates, not to size a GPU."""
    b = checks.integer(batch, "memory batch", 1)
    return round(_memory_cached(json.dumps(normalize_desc(desc), sort_keys=True), _check_size(size), b), 3)


def detector_latency_ms(desc: Mapping[str, Any], size: int = 800, device: str | torch.device = "cpu",
                        repeats: int = 3, seed: int = 0) -> float:
    """Median wall time (ms) of one end-to-end inference of the description's detector: the
    transform, backbone, parallel sub-networks, FPN, RPN, RoI heads and NMS, on one
    ``size x size`` image on ``device`` (eval mode, weights drawn from ``seed``, after one
    warm-up pass). Measured, so it varies a little between runs and machines."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_detector(desc).eval().to(dev)
        image = torch.rand(3, _check_size(size), size, device=dev)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            model([image])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= 1:
                times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)
