"""The exported programs of a model: ONNX (run by ONNX Runtime) and TorchScript.

Both hold the whole model: resize and normalisation, backbone, parallel sub-networks, FPN, the
heads and post-processing. One image in (``images``: float32 ``[3, H, W]``, RGB in [0, 1], any
size); the outputs, in this order (:func:`output_names`):

* a detector (``FasterRCNN``): ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2 in the input's
  pixels), ``labels`` int64 ``[N]`` (the contiguous training labels; ``labels.json`` maps them to
  the data set's category ids) and ``scores`` float32 ``[N]``;
* a ``MaskRCNN``: the same and ``masks`` float32 ``[N, 1, H, W]`` (each detection's mask
  probability pasted into the input's pixels; a pixel belongs to the mask above 0.5);
* a ``SemanticFPN``: ``sem_seg`` int64 ``[H, W]``, the label of every input pixel (0
  background; ``labels.json`` maps labels to category ids).

Both are traced (torchvision's ONNX path; TorchScript's scripting is deprecated in
torch 2.x), so what they compute is checked, not assumed: see :mod:`.parity`.

Traced as torchvision traces it, the resize computes its output size in float32 where eager
PyTorch computes it in Python floats (doubles): ``floor(200 * 0.8)`` is 160 eagerly and 159 in the
traced program, so an image of another aspect ratio than the tracing sample is resized one pixel
short and every detection moves. :func:`_exact_resize` gives the traced programs eager PyTorch's
arithmetic (float64), so the programs equal PyTorch on any image size.
"""
from __future__ import annotations

import contextlib
import logging
import os
import types
import warnings
from collections.abc import Callable, Iterator
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
#: The detector's outputs (a Faster R-CNN's; see :func:`output_names` for the others).
OUTPUTS = ("boxes", "labels", "scores")
MASK_OUTPUTS = (*OUTPUTS, "masks")
SEMANTIC_OUTPUTS = ("sem_seg",)

#: ``(image [3, H, W]) -> {output name: tensor}`` (CPU tensors).
Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class ExportError(SpnasError):
    """A program could not be exported or loaded."""


def output_names(desc_type: str) -> tuple[str, ...]:
    """The program outputs of a model type (``FasterRCNN``, ``MaskRCNN``, ``SemanticFPN``)."""
    return {"MaskRCNN": MASK_OUTPUTS, "SemanticFPN": SEMANTIC_OUTPUTS}.get(desc_type, OUTPUTS)


def _model_outputs(model: nn.Module) -> tuple[str, ...]:
    from ..models.semantic import SemanticFPN
    if isinstance(model, SemanticFPN):
        return SEMANTIC_OUTPUTS
    heads = getattr(model, "roi_heads", None)
    return MASK_OUTPUTS if heads is not None and heads.has_mask() else OUTPUTS


class SingleImage(nn.Module):
    """A model as a function of one image returning the tensors of :func:`output_names` (so it
    can be traced)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.names = _model_outputs(detector)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.detector([image])[0]
        return tuple(out[n] for n in self.names)


def _resize_in_doubles(self: Any, image: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, Any]:
    """``GeneralizedRCNNTransform.resize`` (eval, no fixed size) with eager PyTorch's output
    size, ``floor(side * min(min_size / short, max_size / long))`` in float64, as tensor
    operations the tracer records (the sides stay dynamic)."""
    if self.training or self.fixed_size is not None or target is not None:
        return type(self).resize(self, image, target)
    sides = torch._shape_as_tensor(image)[-2:].to(torch.float64)
    # 1-D tensors throughout: the ONNX exporter computes 0-dim operands in float32 (the
    # scalar-promotion rule), which gives 159 where eager PyTorch gives 160
    goals = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
    scale = torch.amin(goals / torch.sort(sides).values, dim=0, keepdim=True)  # min(goal/short, goal/long)
    size = torch.floor(sides * scale).to(torch.int64)
    resized = torch.nn.functional.interpolate(image[None], size=(size[0], size[1]), mode="bilinear",
                                              align_corners=False)[0]
    return resized, target


@contextlib.contextmanager
def _exact_resize(detector: nn.Module) -> Iterator[nn.Module]:
    """While tracing: ``detector.transform.resize`` computes its output size as eager PyTorch
    does (see the module docstring); the detector is restored afterwards."""
    transform = detector.transform
    transform.resize = types.MethodType(_resize_in_doubles, transform)
    try:
        yield detector
    finally:
        del transform.resize


def export_onnx(detector: nn.Module, path: str | os.PathLike, sample: torch.Tensor, opset: int = OPSET) -> Path:
    """Write ``detector`` (eval mode, CPU) as ONNX to ``path`` (atomically), traced on
    ``sample`` (``[3, H, W]``) with dynamic height and width."""
    import io
    detector = detector.eval().cpu()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's shape arithmetic
        try:
            with _exact_resize(detector):  # the model itself: the ONNX tensors keep its state-dict names
                torch.onnx.export(detector, ([sample],), buf, opset_version=opset, dynamo=False, input_names=[INPUT],
                                  output_names=list(_model_outputs(detector)),
                                  dynamic_axes={INPUT: {1: "height", 2: "width"}})
        except Exception as exc:  # an operator ONNX lacks, a tracing failure
            raise ExportError(f"ONNX export (opset {opset}) failed: {type(exc).__name__}: {exc}") from None
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode=0o644)


def export_torchscript(detector: nn.Module, path: str | os.PathLike, sample: torch.Tensor) -> Path:
    """Write ``detector`` as a traced TorchScript program of :class:`SingleImage` to ``path``."""
    import io
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch 2.x; still the portable program
        try:
            with _exact_resize(detector.eval().cpu()):
                traced = torch.jit.trace(SingleImage(detector), (sample,), check_trace=False)
        except Exception as exc:
            raise ExportError(f"TorchScript trace failed: {type(exc).__name__}: {exc}") from None
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return atomic_write(path, lambda fh: fh.write(buf.getvalue()), mode=0o644)


_DTYPES = {"boxes": torch.float32, "labels": torch.int64, "scores": torch.float32, "masks": torch.float32,
           "sem_seg": torch.int64}


def _as_dict(names: tuple[str, ...], values: Any) -> dict[str, torch.Tensor]:
    out = {n: torch.as_tensor(v, dtype=_DTYPES[n]) for n, v in zip(names, values, strict=True)}
    if "boxes" in out:
        out["boxes"] = out["boxes"].reshape(-1, 4)
        out["labels"], out["scores"] = out["labels"].reshape(-1), out["scores"].reshape(-1)
    return out


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

    names = tuple(o.name for o in session.get_outputs())

    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        return _as_dict(names, session.run(list(names), {INPUT: image.detach().cpu().numpy()}))
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
        values = program(image)
        names = {1: SEMANTIC_OUTPUTS, 3: OUTPUTS, 4: MASK_OUTPUTS}[len(values)]
        return _as_dict(names, values)
    return run


def eager_runner(detector: nn.Module) -> Runner:
    """A :data:`Runner` of the PyTorch model itself (the reference of the parity gate)."""
    detector = detector.eval().cpu()
    names = _model_outputs(detector)

    @torch.no_grad()
    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = detector([image])[0]
        return _as_dict(names, [out[n] for n in names])
    return run
