"""Which device a training or evaluation runs on."""
from __future__ import annotations

import torch

from ..utils.errors import SpnasError


def device_of(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SpnasError("device 'cuda' was asked for but no CUDA device is available")
    return d
