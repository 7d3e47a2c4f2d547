"""spnas: SP-NAS (serial-to-parallel detection backbone search) on torchvision.

Public contract::

    build_detector(desc) -> torch.nn.Module          # torchvision FasterRCNN
    convert_torchvision(state_dict) -> dict          # fasterrcnn_resnet50_fpn -> build_detector keys
    inherit_weights(parent_desc, parent_state, child_desc) -> (child_state, report)
"""
from __future__ import annotations

from .detector import DEFAULT_DESC, arch_string, build_backbone, build_classifier, build_detector, normalize_desc
from .encoding import Bounds, SerialCode, check_bounds, format_arch, parse_arch, parse_parallel, parse_serial
from .errors import CodeError, ConversionError, DescError, InheritanceError, SpnasError
from .inherit import align_blocks, convert_resnet, convert_torchvision, inherit_weights
from .measure import describe, gflops, params

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DESC", "arch_string", "build_backbone", "build_classifier", "build_detector", "normalize_desc",
    "Bounds", "SerialCode", "check_bounds", "format_arch", "parse_arch", "parse_parallel", "parse_serial",
    "CodeError", "ConversionError", "DescError", "InheritanceError", "SpnasError",
    "align_blocks", "convert_resnet", "convert_torchvision", "inherit_weights",
    "describe", "gflops", "params", "__version__",
]
