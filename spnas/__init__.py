"""spnas: SP-NAS (serial-to-parallel detection backbone search) on torchvision.

The package is layered (see ARCHITECTURE.md): ``utils`` < ``storage`` < ``models`` < ``data`` <
``search`` < ``training`` < ``config`` < ``orchestration`` < ``devtools`` < ``cli``. Importing
``spnas`` imports nothing else (PEP 562): the public names below load their module on first use,
so light tools (the storage commands, light Kubeflow components) never import torch.

Public contract::

    build_detector(desc) -> torch.nn.Module          # torchvision FasterRCNN (or MaskRCNN)
    convert_torchvision(state_dict) -> dict          # {faster,mask}rcnn_resnet50_fpn -> build_detector keys
    inherit_weights(parent_desc, parent_state, child_desc) -> (child_state, report)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "spnas.models.desc": ("DEFAULT_DESC", "arch_string", "normalize_desc"),
    "spnas.models.detector": ("build_backbone", "build_classifier", "build_detector"),
    "spnas.models.encoding": ("Bounds", "SerialCode", "check_bounds", "format_arch", "parse_arch", "parse_parallel",
                              "parse_serial"),
    "spnas.utils.errors": ("CodeError", "ConfigError", "ConversionError", "DescError", "InheritanceError",
                           "SpnasError"),
    "spnas.models.convert": ("convert_resnet", "convert_torchvision"),
    "spnas.models.inherit": ("align_blocks", "inherit_weights"),
    "spnas.models.cost": ("describe", "gflops", "params"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'spnas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
