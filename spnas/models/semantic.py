"""Semantic segmentation on the searched backbone: ``SemanticFPN`` (model_desc ``type: SemanticFPN``).

A Panoptic-FPN-style semantic head (Kirillov et al., 2019) over every FPN level of the
:class:`~spnas.models.neck.ParallelFPN` (serial backbone + parallel columns + FPN, the same
module and tensor names as the detectors' ``backbone.*``), so every serial and parallel code,
morphism and weight-inheritance rule applies unchanged. Level ``i`` (stride ``4 * 2**i``) goes
through ``max(i, 1)`` blocks of 3x3 conv + GroupNorm + ReLU, each block but level 0's followed by
a bilinear upsampling to the next finer level's size, so every level arrives at stride 4; the
levels are summed, a 1x1 conv gives one logit map per class, upsampled to the input size.

Images go through torchvision's ``GeneralizedRCNNTransform`` (the detectors' normalisation,
``min_size``/``max_size`` resize and padding to ``size_divisible``), so one description's
``min_size``, ``image_mean``... mean the same for every task.

``forward(images: list[Tensor [3, H, W]], targets=None)``:

* training: ``targets[i]["sem_seg"]`` is an ``int64 [H, W]`` label map (0 background, ``1..K``
  the classes, :data:`IGNORE_INDEX` ignored); returns ``{"loss_sem_seg": cross-entropy}`` over
  the labelled pixels (label maps resized with the images, nearest neighbour);
* eval: returns per image ``{"sem_seg": int64 [H, W]}`` (the argmax class of every pixel, at the
  image's own size); :meth:`SemanticFPN.logits` gives the scores behind it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from .neck import ParallelFPN

#: Label value of pixels that count neither in training nor in the metrics (COCO-Stuff's 255).
IGNORE_INDEX = 255
#: Width of the semantic head's conv blocks when the description sets none (Panoptic FPN: 128).
DEFAULT_HEAD_CHANNELS = 128


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 (Panoptic FPN's) when they divide ``channels``, else the largest divisor <= 32."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class _ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.GroupNorm(_groups(out_channels), out_channels), nn.ReLU(inplace=True))


class SemanticHead(nn.Module):
    """The semantic head: ``branches.<level>.<block>`` conv blocks and ``predictor`` (1x1 conv).

    ``forward(features: dict '0'..'L-1' -> [N, C, h_i, w_i]) -> [N, num_classes, h_0, w_0]`` logits
    at the finest level's resolution (stride 4)."""

    def __init__(self, in_channels: int, num_levels: int, num_classes: int,
                 channels: int = DEFAULT_HEAD_CHANNELS) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.branches = nn.ModuleList(
            nn.ModuleList(_ConvBlock(in_channels if b == 0 else channels, channels) for b in range(max(i, 1)))
            for i in range(num_levels))
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for m in self.branches.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.predictor.weight, std=0.01)  # near-uniform class scores at the start
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        sizes = [features[str(i)].shape[-2:] for i in range(self.num_levels)]
        total: torch.Tensor | None = None
        for i, blocks in enumerate(self.branches):
            x = features[str(i)]
            for b, block in enumerate(blocks):
                x = block(x)
                if i > 0:  # up one level per block: level i arrives at level 0's size after i blocks
                    x = F.interpolate(x, size=sizes[i - 1 - b], mode="bilinear", align_corners=False)
            total = x if total is None else total + x
        assert total is not None
        return self.predictor(total)


class SemanticFPN(nn.Module):
    """Semantic segmentation model: ``transform`` + ``backbone`` (:class:`ParallelFPN`) +
    ``sem_head`` (:class:`SemanticHead`). See the module docstring for the forward contract."""

    def __init__(self, backbone: ParallelFPN, num_classes: int, head_channels: int = DEFAULT_HEAD_CHANNELS,
                 min_size: int = 800, max_size: int = 1333, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, size_divisible: int = 32,
                 fixed_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, image_mean if image_mean is not None else [0.485, 0.456, 0.406],
            image_std if image_std is not None else [0.229, 0.224, 0.225], size_divisible=size_divisible,
            fixed_size=fixed_size)
        self.backbone = backbone
        self.sem_head = SemanticHead(backbone.out_channels, len(backbone.featmap_names), num_classes, head_channels)

    def logits(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Logits ``[N, C, H_pad, W_pad]`` of the transformed, padded batch and each image's
        resized size inside it."""
        batch, _ = self.transform(images)
        out = self.sem_head(self.backbone(batch.tensors))
        out = F.interpolate(out, size=batch.tensors.shape[-2:], mode="bilinear", align_corners=False)
        return out, [tuple(s) for s in batch.image_sizes]

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]] | None = None) -> Any:
        logits, sizes = self.logits(images)
        if self.training:
            if targets is None:
                raise ValueError("SemanticFPN in training mode needs targets with 'sem_seg' label maps")
            labels = torch.full(logits.shape[:1] + logits.shape[2:], IGNORE_INDEX, dtype=torch.int64,
                                device=logits.device)
            for i, (t, (h, w)) in enumerate(zip(targets, sizes, strict=True)):
                lab = t["sem_seg"]
                if tuple(lab.shape[-2:]) != (h, w):
                    lab = F.interpolate(lab[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
                labels[i, :h, :w] = lab
            if not bool((labels != IGNORE_INDEX).any()):  # nothing labelled: a zero loss that keeps the graph
                return {"loss_sem_seg": logits.sum() * 0.0}
            return {"loss_sem_seg": F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)}
        out = []
        for i, (img, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            # always resized (the identity at the same size), so a traced program resizes every input
            lg = F.interpolate(logits[i:i + 1, :, :h, :w], size=img.shape[-2:], mode="bilinear", align_corners=False)
            out.append({"sem_seg": lg[0].argmax(0)})
        return out

