"""The export folder ``spnas serve`` serves, read and checked in one place (no kserve, no torch).

An export folder (written by ``spnas export``) holds:

* ``model.onnx``: the whole detector, one input ``images`` (float32 ``[3, H, W]``, RGB in
  [0, 1]) and three outputs ``boxes`` ``[N, 4]``, ``labels`` ``[N]`` (contiguous 1..K),
  ``scores`` ``[N]``; a Mask R-CNN's (``"task": "instance_segmentation"``) a fourth, ``masks``
  float32 ``[N, 1, H, W]`` (mask probabilities over the input's pixels); a SemanticFPN's
  (``"task": "semantic_segmentation"``) instead one output ``sem_seg`` int64 ``[H, W]``, the
  label of every input pixel (0 background);
* ``labels.json``: ``{"labels": [{"label": 1, "category_id": 3, "name": "circle"}, ...]}``,
  every contiguous label 1..K exactly once, mapped to a distinct COCO category id; a semantic
  export lists label 0 too, as ``{"label": 0, "category_id": 0, "name": "background"}``;
* ``export.json``: ``{"name": ..., "format_version": 1, "onnx": "model.onnx", "task": ..., ...}``
  (``name`` is the default served model name; ``onnx`` the model's file name in the folder;
  ``task`` ``detection`` (the default), ``instance_segmentation`` or ``semantic_segmentation``:
  :data:`SERVED_TASKS`);
* ``parity.json``: ``{"passed": true|false, ...}``, the parity gate's verdict.

:func:`load_export` raises :class:`~spnas.utils.errors.ServeError` naming the file at fault; a
folder whose gate did not pass (or never ran) is refused unless ``allow_unverified``.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.errors import ServeError, SpnasError, brief
from ..utils.fileio import read_json

log = logging.getLogger(__name__)

EXPORT_JSON = "export.json"
LABELS_JSON = "labels.json"
PARITY_JSON = "parity.json"
DEFAULT_ONNX = "model.onnx"
DEFAULT_MODEL_NAME = "spnas"
FORMAT_VERSION = 1
#: the server's default request limits (here, so that ``spnas serve --help`` imports no kserve)
DEFAULT_MAX_IMAGE_BYTES = 20_000_000   # 20 MB of encoded image
DEFAULT_MAX_PIXELS = 40_000_000        # 40 Mpx decoded

#: the ``export.json`` tasks spnas serve answers
SERVED_TASKS = ("detection", "instance_segmentation", "semantic_segmentation")
#: the task whose labels.json has label 0 (background) and whose model outputs a label map
SEMANTIC_TASK = "semantic_segmentation"

#: a served model's name: it is a path segment of every endpoint (``/v2/models/{name}/infer``)
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ExportBundle:
    """A checked export folder. ``categories`` maps each contiguous label to its category id,
    ``names`` to its category name; ``verified`` is the parity gate's verdict (False when the
    folder was accepted with ``allow_unverified``); ``task`` is ``export.json``'s (one of
    :data:`SERVED_TASKS`). A semantic export's ``categories`` include ``0 -> 0`` (background)."""

    root: Path
    onnx_path: Path
    name: str
    categories: dict[int, int]
    names: dict[int, str]
    verified: bool
    parity: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    task: str = "detection"

    @property
    def masks(self) -> bool:
        """The model outputs instance masks (a Mask R-CNN export)."""
        return self.task == "instance_segmentation"

    @property
    def semantic(self) -> bool:
        """The model outputs a label map (a SemanticFPN export)."""
        return self.task == SEMANTIC_TASK


def check_model_name(name: Any, where: str = "model name") -> str:
    """``name`` if it is a valid served model name (letters, digits, ``.``, ``_``, ``-``, at most
    128 characters, starting with a letter or digit), else :class:`ServeError`."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ServeError(f"{where}: must be 1-128 letters, digits, '.', '_' or '-' starting with a letter or "
                         f"digit, got {brief(name)}")
    return name


def _read(path: Path, what: str) -> Any:
    try:
        return read_json(path, what)
    except SpnasError as exc:
        raise ServeError(str(exc)) from None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _labels(path: Path, background: bool = False) -> tuple[dict[int, int], dict[int, str]]:
    """labels.json's ``label -> category id`` and ``label -> name``: labels 1..K, and with
    ``background`` (a semantic export) label 0 mapped to category id 0 as well."""
    doc = _read(path, LABELS_JSON)
    where = f"{LABELS_JSON} {str(path)!r}"
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list) or not doc["labels"]:
        raise ServeError(f"{where}: must be an object with a non-empty list 'labels', got {brief(doc)}")
    categories: dict[int, int] = {}
    names: dict[int, str] = {}
    for i, entry in enumerate(doc["labels"]):
        at = f"{where}: labels[{i}]"
        if not isinstance(entry, dict):
            raise ServeError(f"{at}: must be an object with label, category_id and name, got {brief(entry)}")
        label, cat, name = entry.get("label"), entry.get("category_id"), entry.get("name")
        if not _int(label) or label < (0 if background else 1):
            raise ServeError(f"{at}.label: must be an integer >= {0 if background else 1}, got {brief(label)}")
        if not _int(cat):
            raise ServeError(f"{at}.category_id: must be an integer, got {brief(cat)}")
        if not isinstance(name, str):
            raise ServeError(f"{at}.name: must be a string, got {brief(name)}")
        if label in categories:
            raise ServeError(f"{at}.label: label {label} is listed twice")
        if cat in categories.values():
            raise ServeError(f"{at}.category_id: category id {cat} is listed twice")
        if background and (label == 0) != (cat == 0):
            raise ServeError(f"{at}: label 0 (background) and category id 0 go together in a semantic export's "
                             f"labels, got label {label} -> category id {cat}")
        categories[label], names[label] = cat, name
    if background and 0 not in categories:
        raise ServeError(f"{where}: a semantic export's labels must include label 0 (background, category id 0), "
                         f"has labels {sorted(categories)}")
    first = 0 if background else 1
    expected = set(range(first, first + len(categories)))
    if set(categories) != expected:
        missing = sorted(expected - set(categories))
        what = "0 (background) and the model's contiguous labels" if background else "the model's contiguous labels"
        raise ServeError(f"{where}: the labels must be {first}..{first + len(categories) - 1} ({what}), "
                         f"missing {missing}")
    return categories, names


def _onnx_name(doc: dict[str, Any], where: str) -> str:
    name = doc.get("onnx", DEFAULT_ONNX)
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..")
            or "\x00" in name):
        raise ServeError(f"{where}: 'onnx' must be a file name in the export folder, got {brief(name)}")
    return name


def _parity(root: Path, allow_unverified: bool) -> tuple[bool, dict[str, Any]]:
    """The parity verdict; refused (unless ``allow_unverified``) when missing, malformed or failed."""
    path = root / PARITY_JSON
    hint = "serve it anyway with --allow-unverified"
    if not path.is_file():
        problem = f"{PARITY_JSON} is missing in {str(root)!r}: the export never passed the parity gate"
        doc: Any = {}
    else:
        try:
            doc = _read(path, PARITY_JSON)
        except ServeError as exc:
            problem, doc = str(exc), {}
        else:
            passed = doc.get("passed") if isinstance(doc, dict) else None
            if passed is True:
                return True, doc
            if passed is False:
                problem = f"{PARITY_JSON} {str(path)!r} says the export failed the parity gate (passed: false)"
            else:
                problem = f"{PARITY_JSON} {str(path)!r}: 'passed' must be true or false, got {brief(passed)}"
                doc = doc if isinstance(doc, dict) else {}
    if not allow_unverified:
        raise ServeError(f"{problem}; {hint}")
    log.warning("serving an unverified export (--allow-unverified): %s", problem)
    return False, doc


def load_export(path: str | os.PathLike, *, allow_unverified: bool = False) -> ExportBundle:
    """Check the export folder ``path`` and return its :class:`ExportBundle`.

    Raises :class:`ServeError` naming the file at fault: the folder or a file missing,
    ``export.json`` or ``labels.json`` malformed, ``format_version`` other than 1, a ``task`` not in
    :data:`SERVED_TASKS`, or (unless
    ``allow_unverified``) ``parity.json`` missing, malformed or saying ``"passed": false``.
    """
    root = Path(path)
    if not root.is_dir():
        raise ServeError(f"export folder {str(root)!r} does not exist or is not a folder")
    export_path = root / EXPORT_JSON
    doc = _read(export_path, EXPORT_JSON)
    where = f"{EXPORT_JSON} {str(export_path)!r}"
    if not isinstance(doc, dict):
        raise ServeError(f"{where}: must be a JSON object, got {brief(doc)}")
    version = doc.get("format_version", FORMAT_VERSION)
    if not _int(version) or version != FORMAT_VERSION:
        raise ServeError(f"{where}: format_version {brief(version)} is not supported (this spnas reads "
                         f"format_version {FORMAT_VERSION})")
    task = doc.get("task", "detection")
    if not isinstance(task, str) or task not in SERVED_TASKS:
        raise ServeError(f"{where}: task {brief(task)} is not one spnas serve answers (tasks {list(SERVED_TASKS)})")
    name = doc.get("name", DEFAULT_MODEL_NAME)
    if not isinstance(name, str):  # checked as a URL segment where it is used, since --name may replace it
        raise ServeError(f"{where}: name must be a string, got {brief(name)}")
    onnx_path = root / _onnx_name(doc, where)
    if not onnx_path.is_file():
        raise ServeError(f"the ONNX model {str(onnx_path)!r} (named by {EXPORT_JSON}) does not exist")
    if onnx_path.stat().st_size == 0:
        raise ServeError(f"the ONNX model {str(onnx_path)!r} is empty")
    categories, names = _labels(root / LABELS_JSON, background=task == SEMANTIC_TASK)
    verified, parity = _parity(root, allow_unverified)
    return ExportBundle(root=root, onnx_path=onnx_path, name=name, categories=categories, names=names,
                        verified=verified, parity=parity, export=doc, task=task)
