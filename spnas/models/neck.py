"""Parallel sub-networks and the ``ParallelFPN`` neck.

A stage with ``K_i > 0`` extra passes re-runs its own stage module (shared weights) ``K_i``
more times. Pass ``k``'s output goes through connection module ``connections.i.k`` (1x1 conv
from the stage's output to its input channels + BN), is resized to the stage input's spatial
size and added to the stage input of the next pass; the last pass is the stage output. Every
connection BN starts at zero, so adding sub-networks leaves the function unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

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


class ParallelFPN(nn.Module):
    """Backbone with parallel sub-networks + torchvision FPN; torchvision ``BackboneWithFPN``
    naming (``body.*``, ``fpn.*``) plus ``connections.<stage>.<pass>.{0,1}.*``.

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
        """Fused stage outputs (before the FPN)."""
        x = self.body.stem(x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for s, stage in enumerate(self.body.stages):
            inp = x
            x = stage(inp)
            for conn in self.connections[s]:
                fb = conn(x)
                if fb.shape[-2:] != inp.shape[-2:]:
                    fb = F.interpolate(fb, size=inp.shape[-2:], mode="nearest")
                x = stage(inp + fb)
            feats[str(s)] = x
        return feats

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.stage_features(x))
