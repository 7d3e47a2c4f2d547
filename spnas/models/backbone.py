"""Residual blocks, the :class:`SerialBackbone` and the reignition classifier.

Blocks are torchvision's own ``BasicBlock``/``Bottleneck`` classes and every module carries
torchvision's name (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``), so the
ResNet-50 code loads torchvision's ResNet-50 weights with ``strict=True``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from ..utils.errors import DescError
from .desc import normalize_norm
from .encoding import SerialCode, normalize_block, parse_serial


class FrozenStatsBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (running statistics fixed, in train and eval mode
    alike) whose affine ``weight`` and ``bias`` are trainable parameters.

    Same arithmetic and state-dict names as ``FrozenBatchNorm2d`` (``weight``, ``bias``,
    ``running_mean``, ``running_var``; a ``num_batches_tracked`` entry of a ``BatchNorm2d``
    checkpoint is dropped on load), so checkpoints of either kind load strictly. Used under
    ``norm: frozen_bn`` where a BN weight starts at zero and must learn: the last BN of every
    residual branch and the connection BNs.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps)
        weight, bias = self.weight, self.bias
        del self.weight, self.bias  # buffers in FrozenBatchNorm2d
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
    "syncbn": nn.BatchNorm2d,  # made SyncBatchNorm by a data-parallel training (spnas.training.distributed)
}
#: Norm layers whose weight may start at zero (last BN of a residual branch, connection BNs):
#: under ``frozen_bn`` their statistics stay frozen but weight and bias still train.
ZERO_INIT_NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "frozen_bn": FrozenStatsBatchNorm2d,
    "syncbn": nn.BatchNorm2d,
}


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    """``"bn"`` and ``"syncbn"`` -> ``BatchNorm2d``; ``"frozen_bn"`` -> torchvision's ``FrozenBatchNorm2d``."""
    return NORM_LAYERS[normalize_norm(norm)]


def zero_init_norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    """Norm layer for a BN whose weight may start at zero and must stay trainable:
    ``"bn"`` -> ``BatchNorm2d``; ``"frozen_bn"`` -> :class:`FrozenStatsBatchNorm2d`."""
    return ZERO_INIT_NORM_LAYERS[normalize_norm(norm)]


def block_class(block: str) -> type[nn.Module]:
    """torchvision block class for a block type (resnext is a grouped ``Bottleneck``)."""
    return BasicBlock if normalize_block(block) == "basic" else Bottleneck


def last_bn_name(block: str) -> str:
    """Name of the last BN of a block's residual branch (zeroed for an identity block)."""
    return "bn2" if normalize_block(block) == "basic" else "bn3"


class SerialBackbone(nn.Module):
    """Residual backbone described by a serial code.

    Stem: 7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2 (stride 4). Stage ``s`` is the
    module ``layer{s+1}``; its first block has stride 2 for ``s > 0``. Block ``i`` has
    ``base_channels * 2**(#'2' up to i)`` planes and ``planes * expansion`` output channels.
    Under ``norm="frozen_bn"`` the last BN of every residual branch is a
    :class:`FrozenStatsBatchNorm2d`, so a block inserted as an identity (that BN at zero) learns.

    ``forward(x: [N, 3, H, W]) -> list`` of stage outputs, stage ``s`` at stride ``4 * 2**s``.
    """

    def __init__(self, code: str | SerialCode = "111-2111-211111-211", block: str = "bottleneck",
                 base_channels: int = 64, norm: str = "bn") -> None:
        super().__init__()
        self.code = parse_serial(code)
        self.block = normalize_block(block)
        if isinstance(base_channels, bool) or not isinstance(base_channels, int) or base_channels < 1:
            raise DescError(f"backbone.base_channels must be a positive integer, got {base_channels!r}")
        if self.block == "resnext" and base_channels % 16:
            # torchvision's grouped width is int(planes * 4 / 64) * 32: planes below 16 give 0 channels
            raise DescError(f"backbone.base_channels must be a multiple of 16 for resnext blocks, got {base_channels}")
        self.base_channels = base_channels
        self.norm = norm
        norm_layer = norm_layer_for(norm)
        last_norm = zero_init_norm_layer_for(norm)
        last_bn = last_bn_name(self.block)
        cls = block_class(self.block)
        groups, width_per_group = (32, 4) if self.block == "resnext" else (1, 64)

        self.conv1 = nn.Conv2d(3, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        mults = self.code.width_multipliers()
        in_ch = base_channels
        self.stage_channels: list[int] = []
        self.stage_in_channels: list[int] = []
        i = 0
        for s, stage in enumerate(self.code.stages):
            self.stage_in_channels.append(in_ch)
            blocks = []
            for j in range(len(stage)):
                planes = base_channels * mults[i]
                out_ch = planes * cls.expansion
                stride = 2 if (s > 0 and j == 0) else 1
                downsample = None
                if stride != 1 or in_ch != out_ch:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                        norm_layer(out_ch))
                blk = cls(in_ch, planes, stride, downsample, groups=groups,
                          base_width=width_per_group, norm_layer=norm_layer)
                if last_norm is not norm_layer:  # same name and place: torchvision's tensor order is kept
                    setattr(blk, last_bn, last_norm(out_ch))
                blocks.append(blk)
                in_ch = out_ch
                i += 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(in_ch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's ResNet initialisation (Kaiming fan-out for convs, BN weight 1, bias 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(self.code.num_stages)]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class SerialClassifier(nn.Module):
    """Backbone + global average pool + linear head, for reignition.

    ``forward(x: [N, 3, H, W]) -> [N, num_classes]`` logits. The backbone's tensors are named
    ``body.*`` so they map 1:1 onto the detector's ``backbone.body.*``.
    """

    def __init__(self, body: SerialBackbone, num_classes: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise DescError(f"classifier num_classes must be an integer >= 2, got {num_classes!r}")
        self.body = body
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(body.stage_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.body(x)[-1]), 1))
