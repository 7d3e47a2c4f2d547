"""Parallel sub-networks (columns) and the ``ParallelFPN`` neck, as in the authors' SpNet.

Stage ``i`` with ``K_i > 0`` carries ``K_i`` columns. Column ``m`` (1..K_i) re-runs stage ``i``'s
own module (shared weights). Its input is column ``m``'s output at stage ``i-1`` when that stage
has a column ``m``, else the main path's input to stage ``i``; to that input it adds the
feedback of column ``m+1`` of the same stage (when it exists). A column's output goes through
connection module ``connections.<i>.<m-1>`` (1x1 conv from the stage's output to its input
channels + BN), is resized to the receiving input's spatial size and added to the input of
column ``m-1``; column 1's feedback is added to the main path's input, which then runs the stage
once more to give the stage output. Columns are computed from ``m = K_i`` down to 1, then the
main path, so parallel columns run across consecutive stages (CBNet-like) and fuse resolutions.

Every connection BN weight and bias starts at zero, so a new column's feedback is exactly zero.
The network's function is then unchanged when the next stage has no column of the new column's
number, or when the new column is its stage's first and the stage below has no first column
(its output then equals the main path's); otherwise the next stage's column of that number now
reads the new column's output instead of the main path's input, which changes the function
unless the parent's connections are still zero.

BatchNorm statistics: a stage runs ``K_i + 1`` times per forward, but its (shared) BNs update
their running statistics once per forward, on the main path's pass. In train mode the column
passes still normalise with their own batch statistics; they only leave the running statistics
and ``num_batches_tracked`` alone. Under frozen statistics (``norm_eval``, ``frozen_bn``) every
pass uses the running statistics.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .backbone import SerialBackbone, zero_init_norm_layer_for
from .encoding import parse_parallel


def connection_module(out_channels: int, in_channels: int, norm: str = "bn") -> nn.Sequential:
    """1x1 conv (stage output -> stage input channels) + BN whose weight and bias start at 0
    (trainable under every ``norm``: see :func:`~.backbone.zero_init_norm_layer_for`)."""
    bn = zero_init_norm_layer_for(norm)(in_channels)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    conv = nn.Conv2d(out_channels, in_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, bn)


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s BNs in train mode normalise with batch statistics but do
    not update their running statistics nor ``num_batches_tracked`` (restored on exit)."""
    bns = [m for m in module.modules()
           if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def _feedback(conn: nn.Module, out: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """A column's output through its connection, resized to ``size`` (every column's input,
    like the main path's, has the stage input's size)."""
    fb = conn(out)
    if fb.shape[-2:] != size:
        fb = F.interpolate(fb, size=size, mode="nearest")
    return fb


class ParallelFPN(nn.Module):
    """Backbone with parallel sub-networks + torchvision FPN; torchvision ``BackboneWithFPN``
    naming (``body.*``, ``fpn.*``) plus ``connections.<stage>.<column - 1>.{0,1}.*``.

    ``forward(x: [N, 3, H, W]) -> OrderedDict`` with keys ``'0'..'L-1'`` (stage ``s`` at stride
    ``4 * 2**s``) and ``'pool'`` (one more max-pooled level), each with ``out_channels``.
    """

    def __init__(self, body: SerialBackbone, code: Sequence[int] | str | None = None,
                 out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        self.code = parse_parallel(code, body.code.num_stages)
        self.out_channels = out_channels
        self.connections = nn.ModuleList(
            nn.ModuleList(connection_module(body.stage_channels[s], body.stage_in_channels[s], body.norm)
                          for _ in range(k))
            for s, k in enumerate(self.code))
        self.fpn = FeaturePyramidNetwork(body.stage_channels, out_channels, extra_blocks=LastLevelMaxPool())

    @property
    def featmap_names(self) -> list[str]:
        return [str(s) for s in range(len(self.code))]

    def stage_features(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Fused stage outputs (before the FPN): the main path of every stage, columns included
        (see the module docstring)."""
        x = self.body.stem(x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        below: list[torch.Tensor] = []  # column outputs of the previous stage, column m at m-1
        for s, stage in enumerate(self.body.stages):
            conns = self.connections[s]
            columns: list[torch.Tensor] = [x] * len(conns)
            fb: torch.Tensor | None = None
            with running_stats_kept(stage) if len(conns) else nullcontext():
                for m in range(len(conns), 0, -1):
                    inp = below[m - 1] if m <= len(below) else x
                    if fb is not None:
                        inp = inp + fb
                    columns[m - 1] = stage(inp)
                    fb = _feedback(conns[m - 1], columns[m - 1], x.shape[-2:])
            x = stage(x if fb is None else x + fb)
            feats[str(s)] = x
            below = columns
        return feats

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.stage_features(x))
