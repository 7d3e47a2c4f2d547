"""The exported programs of a detector: ONNX (run by ONNX Runtime) and TorchScript.

Both hold the whole torchvision detector: resize and normalisation, backbone, parallel
sub-networks, FPN, RPN, RoI heads and post-processing. One image in (``images``: float32
``[3, H, W]``, RGB in [0, 1], any size), three outputs out, in this order: ``boxes`` float32
``[N, 4]`` (x1, y1, x2, y2 in the input's pixels), ``labels`` int64 ``[N]`` (the contiguous
training labels; ``labels.json`` maps them to the data set's category ids) and ``scores`` float32
``[N]``. Both are traced (torchvision's ONNX path; TorchScript's scripting is deprecated in
torch 2.x), so what they compute is checked, not assumed: see :mod:`.parity`.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.errors import SpnasError
from ..utils.fileio import atomic_write

log = logging.getLogger(__name__)

#: The ONNX opset of every export (>= 17: LayerNormalization-era operators, Resize semantics).
OPSET = 17
INPUT = "images"
OUTPUTS = ("boxes", "labels", "scores")

#: ``(image [3, H, W]) -> {"boxes", "labels", "scores"}`` (CPU tensors).
Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class ExportError(SpnasError):
    """A program could not be exported or loaded."""


class SingleImage(nn.Module):
    """A torchvision detector as a function of one image returning ``(boxes, labels, scores)``
    (tensors, so it can be traced)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector([image])[0]
        return out["boxes"], out["labels"], out["scores"]


def export_onnx(detector: nn.Module, path: str | os.PathLike, sample: torch.Tensor, opset: int = OPSET) -> Path:
    """Write ``detector`` (eval mode, CPU) as ONNX to ``path`` (atomically), traced on
    ``sample`` (``[3, H, W]``) with dynamic height and width."""
    import io
    detector = detector.eval().cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's shape arithmetic
        try:
            torch.onnx.export(detector, ([sample],), buf, opset_version=opset, dynamo=False, input_names=[INPUT],
                              output_names=list(OUTPUTS), dynamic_axes={INPUT: {1: "height", 2: "width"}})
        except Exception as exc:  # an operator ONNX lacks, a tracing failure
            raise ExportError(f"ONNX export (opset {opset}) failed: {type(exc).__name__}: {exc}") from None
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode=0o644)


def export_torchscript(detector: nn.Module, path: str | os.PathLike, sample: torch.Tensor) -> Path:
    """Write ``detector`` as a traced TorchScript program of :class:`SingleImage` to ``path``."""
    import io
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.x; still the portable program
        try:
            traced = torch.jit.trace(SingleImage(detector.eval().cpu()), (sample,), check_trace=False)
        except Exception as exc:
            raise ExportError(f"TorchScript trace failed: {type(exc).__name__}: {exc}") from None
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode=0o644)


def _as_dict(boxes: Any, labels: Any, scores: Any) -> dict[str, torch.Tensor]:
    return {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "scores": torch.as_tensor(scores, dtype=torch.float32).reshape(-1)}


def onnx_runner(path: str | os.PathLike, threads: int | None = None) -> Runner:
    """A :data:`Runner` over an ONNX Runtime session of the file at ``path`` (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed (pip install 'spnas-kfp[export]')") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX model {str(path)!r} cannot be loaded: {type(exc).__name__}: {exc}") from None

    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        boxes, labels, scores = session.run(list(OUTPUTS), {INPUT: image.detach().cpu().numpy()})
        return _as_dict(boxes, labels, scores)
    return run


def torchscript_runner(path: str | os.PathLike) -> Runner:
    """A :data:`Runner` over the TorchScript program at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ExportError(f"TorchScript program {str(path)!r} cannot be loaded: {exc}") from None

    @torch.no_grad()
    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        return _as_dict(*program(image))
    return run


def eager_runner(detector: nn.Module) -> Runner:
    """A :data:`Runner` of the PyTorch detector itself (the reference of the parity gate)."""
    detector = detector.eval().cpu()

    @torch.no_grad()
    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = detector([image])[0]
        return _as_dict(out["boxes"], out["labels"], out["scores"])
    return run
