"""Checkpoints: safe loading (``weights_only=True``), atomic saving, fit checks, and loading
weights of any accepted kind into a built model.

Checkpoints are untrusted input and are only ever read with ``torch.load(...,
weights_only=True)``; anything else is refused with :class:`CheckpointError`.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.errors import CheckpointError, SpnasError
from ..utils.fileio import atomic_write
from .convert import convert_resnet, unwrap_state_dict

log = logging.getLogger(__name__)
_PREDICTOR = "roi_heads.box_predictor."


def save_checkpoint(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` written atomically (temp file, fsync, rename)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``; anything that is not a
    plain tensor checkpoint is refused with :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zips, unsafe globals...
        raise CheckpointError(
            f"weights file {str(path)!r} is not a safe PyTorch checkpoint (loaded with weights_only=True): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def check_state_fits(model: torch.nn.Module, state: dict, source: str) -> None:
    """Raise :class:`CheckpointError` naming the first tensor of ``state`` that does not fit
    ``model`` (missing, unexpected or of another shape)."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            if name.endswith("num_batches_tracked"):
                continue
            raise CheckpointError(f"{source} belongs to another architecture: tensor {name!r} is missing")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source} belongs to another architecture: tensor {name!r} has shape "
                f"{tuple(state[name].shape)}, the model expects {tuple(tensor.shape)}")
    for name in state:
        if name not in expected:
            raise CheckpointError(f"{source} belongs to another architecture: unexpected tensor {name!r}")


def load_weights(model: nn.Module, desc: Mapping[str, Any], source: str | os.PathLike | Mapping) -> dict[str, int]:
    """Load a checkpoint into ``model`` (built from ``desc``) and say what was loaded.

    Accepts this project's detector weights, a torchvision ``fasterrcnn_*_fpn`` checkpoint
    (same tensor names) and a torchvision ``resnet*`` classification checkpoint (backbone only,
    the rest stays fresh). BN ``num_batches_tracked`` counters are filled in or dropped as the
    model's norm layers need (BatchNorm2d or FrozenBatchNorm2d checkpoints, either ``norm``).
    When the class count differs, the box predictor stays fresh (replace the predictor for a new
    class count). Anything else raises :class:`CheckpointError` naming the first misfit tensor.
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    raw = load_checkpoint(source) if not isinstance(source, Mapping) else source
    try:
        state = unwrap_state_dict(raw)
    except SpnasError as exc:
        raise CheckpointError(f"weights file {name!r}: {exc}") from None
    if "fc.weight" in state and "conv1.weight" in state and not any(k.startswith("backbone.") for k in state):
        body = convert_resnet(state, desc, prefix="backbone.body.")
        model.load_state_dict(body, strict=False)
        log.info("loaded %d backbone tensors from classification checkpoint %s", len(body), name)
        return {"loaded": len(body), "fresh": len(model.state_dict()) - len(body)}
    expected = model.state_dict()
    state = OrderedDict(state)
    for k, v in expected.items():  # FrozenBatchNorm2d checkpoints have no num_batches_tracked
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v.clone()
    for k in [k for k in state if k.endswith("num_batches_tracked") and k not in expected]:
        if k.removesuffix("num_batches_tracked") + "running_mean" in expected:
            del state[k]  # a BatchNorm2d checkpoint into a frozen_bn model: the counter has no use there
    fresh = 0
    pred = [k for k in expected if k.startswith(_PREDICTOR)]
    if all(k in state for k in pred) and any(state[k].shape != expected[k].shape for k in pred):
        log.info("checkpoint %s has %d classes, the dataset %d: the box predictor starts fresh", name,
                 state[_PREDICTOR + "cls_score.weight"].shape[0], expected[_PREDICTOR + "cls_score.weight"].shape[0])
        for k in pred:
            state[k] = expected[k]
        fresh = len(pred)
    check_state_fits(model, state, f"weights file {name!r}")
    model.load_state_dict(state, strict=True)
    return {"loaded": len(expected) - fresh, "fresh": fresh}
