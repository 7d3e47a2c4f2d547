"""Exported detectors in an MLflow model registry (tracking server with a database backend and
proxied artifacts).

What one registered version is:

* an MLflow run in experiment ``spnas/<name>`` whose artifacts are the export folder under
  ``export/`` and, when given, the PyTorch weights it came from as ``pytorch/model.pth``;
* a version of registered model ``<name>`` whose ``source`` is the run's ``export`` artifact URI
  and whose tags describe it (:func:`version_tags`: codes, data version, mAP, control, costs,
  parity verdict, ``storage_uri``);
* the aliases ``champion`` (what is served) and ``challenger`` (the candidate that may replace
  it); :meth:`Registry.promote` moves ``champion`` in one server call.

Contracts: only an export whose ``parity.json`` says ``"passed": true`` is registered (checked
before anything is written); every failure is a :class:`~spnas.utils.errors.RegistryError`
naming the registry URI (credentials hidden) and the model, version or alias; a registry that
does not answer fails within about ``timeout_s`` seconds (MLflow's HTTP timeout and retry
variables, set only while this client's calls run). No torch here, and ``mlflow`` is imported
when a :class:`Registry` is made, with a one-line hint when the ``registry`` extra is missing.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils.errors import RegistryError, SpnasError, brief
from ..utils.fileio import read_json

log = logging.getLogger(__name__)

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
HINT = "pip install 'spnas[registry]'"
CHAMPION, CHALLENGER = "champion", "challenger"
EXPORT_PATH = "export"          # the export folder's artifact path in the run
PYTORCH_PATH = "pytorch"        # the weights' artifact folder in the run
WEIGHTS_FILE = "model.pth"      # the weights' file name there
EXPERIMENT_PREFIX = "spnas/"
PARITY_JSON, EXPORT_JSON = "parity.json", "export.json"
READY_TIMEOUT_S = 300.0         # the longest wait for a new version to become READY
#: a registered model name (also the last part of its experiment's name)
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: the figures a run may compare its searched model and control by (control.json's ``quality``):
#: spnas.search.settings.MAXIMISED, spelled out because that package imports torch
RUN_QUALITIES = ("mAP", "segm_mAP", "segm_AP50", "mIoU")
#: the version tags :func:`version_tags` computes (``extra_tags`` may not reuse them)
COMPUTED_TAGS = ("serial_code", "parallel_code", "block", "data_version", *RUN_QUALITIES,
                 *(f"control_{k}" for k in RUN_QUALITIES), "control_delta",
                 "params", "gflops", "latency_ms_pytorch_cpu", "latency_ms_onnxruntime_cpu", "parity", "storage_uri")
PROMOTION_TAGS = ("promoted_at", "previous_champion", "promotion_reason")

# MLflow reads its HTTP settings from the environment at each request: a Registry sets them for
# the duration of its own calls only, one call at a time in this process
_ENV_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------
# values


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``; :class:`RegistryError` when neither is set."""
    value = (uri or "").strip() or os.environ.get(ENV_TRACKING_URI, "").strip()
    if not value:
        raise RegistryError(f"no model registry given: pass --registry-uri URI or set {ENV_TRACKING_URI} "
                            "(the MLflow tracking server, e.g. http://mlflow.kubeflow.svc:5000)")
    return value


def shown_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` replaced by ``***@`` (for messages and logs)."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def check_name(name: Any) -> str:
    """``name`` if it is a valid registered model name (1-128 letters, digits, ``.``, ``_``,
    ``-``, starting with a letter or digit), else :class:`RegistryError`."""
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise RegistryError(f"model name {brief(name)}: must be 1-128 letters, digits, '.', '_' or '-' starting "
                            "with a letter or digit")
    return name


def version_number(ref: Any) -> int | None:
    """The version number of ``ref`` (an int, or a string of digits), None for an alias name."""
    if isinstance(ref, bool):
        raise RegistryError(f"version {brief(ref)} is neither a version number nor an alias name")
    if isinstance(ref, int):
        number = ref
    elif isinstance(ref, str) and ref.strip().isascii() and ref.strip().isdigit():
        number = int(ref.strip())
    elif isinstance(ref, str) and ref.strip():
        return None
    else:
        raise RegistryError(f"version {brief(ref)} is neither a version number nor an alias name")
    if number < 1:
        raise RegistryError(f"version {brief(ref)}: version numbers start at 1")
    return number


@dataclass(frozen=True)
class VersionInfo:
    """One version of a registered model: its number, aliases (sorted), tags, ``source`` (the
    export folder's artifact URI), the run that holds its artifacts, creation time (ms)."""

    name: str
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    source: str
    run_id: str | None
    created_ms: int

    @classmethod
    def of(cls, mv: Any, aliases: tuple[str, ...] | None = None) -> VersionInfo:
        """From an ``mlflow.entities.model_registry.ModelVersion``."""
        return cls(name=str(mv.name), version=int(mv.version),
                   aliases=tuple(sorted(mv.aliases or ())) if aliases is None else tuple(sorted(aliases)),
                   tags={str(k): str(v) for k, v in (mv.tags or {}).items()}, source=str(mv.source or ""),
                   run_id=mv.run_id or None, created_ms=int(mv.creation_timestamp or 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, ``aliases`` as a list."""
        return {"name": self.name, "version": self.version, "aliases": list(self.aliases), "tags": dict(self.tags),
                "source": self.source, "run_id": self.run_id, "created_ms": self.created_ms}


@dataclass(frozen=True)
class ModelInfo:
    """One registered model: its name, aliases (alias -> version number), tags, creation time (ms)."""

    name: str
    aliases: dict[str, int]
    tags: dict[str, str]
    created_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "aliases": dict(self.aliases), "tags": dict(self.tags),
                "created_ms": self.created_ms}


# --------------------------------------------------------------------------------------------
# the export folder


def _read(path: Path, what: str) -> Any:
    try:
        return read_json(path, what)
    except SpnasError as exc:
        raise RegistryError(str(exc)) from None


def read_export(export_dir: str | os.PathLike) -> dict[str, Any]:
    """``export.json`` of an export folder that may be registered: its ``parity.json`` says
    ``"passed": true`` (and ``export.json`` does not say otherwise). :class:`RegistryError`
    naming the folder or file otherwise. Reads JSON only (no torch)."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise RegistryError(f"export folder {str(folder)!r} does not exist")
    parity = folder / PARITY_JSON
    if not parity.is_file():
        raise RegistryError(f"{parity} does not exist: an export without a parity gate cannot be registered")
    report = _read(parity, "parity report")
    if not isinstance(report, dict) or report.get("passed") is not True:
        verdict = report.get("passed") if isinstance(report, dict) else report
        raise RegistryError(f"{parity}: the parity gate did not pass (passed: {brief(verdict, 60)}): the exported "
                            "programs do not compute what PyTorch computed; this export is refused for the registry")
    info = _read(folder / EXPORT_JSON, "export description")
    if not isinstance(info, dict):
        raise RegistryError(f"{folder / EXPORT_JSON} must be a JSON object, got {brief(info, 60)}")
    stated = info.get("parity")
    if isinstance(stated, Mapping) and stated.get("passed") is not True:
        raise RegistryError(f"{folder / EXPORT_JSON}: parity.passed is {brief(stated.get('passed'), 60)} but "
                            f"{parity} says true; this export is refused for the registry")
    return info


def _key(info: Mapping[str, Any], path: str, where: str) -> Any:
    cur: Any = info
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise RegistryError(f"{where}: key {path!r} is missing (an export written by `spnas export` has it)")
        cur = cur[part]
    return cur


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any, key: str, where: str) -> str:
    """A finite number as a tag: ints in decimal, floats as Python's shortest round-trip text."""
    if not _is_number(value):
        raise RegistryError(f"{where}: {key} must be a finite number, got {brief(value, 60)}")
    return str(value) if isinstance(value, int) else repr(float(value))


def version_tags(info: Mapping[str, Any], *, storage_uri: str | None = None,
                 extra_tags: Mapping[str, str] | None = None, where: str = EXPORT_JSON) -> dict[str, str]:
    """The tags of a version registered from an export whose ``export.json`` is ``info``:
    ``serial_code``, ``parallel_code`` (e.g. ``"0-1-0-0"``), ``block``, ``data_version``,
    ``mAP`` (a semantic model: ``mIoU``, and ``control_mIoU`` below), ``params``, ``gflops``,
    ``latency_ms_pytorch_cpu``, ``latency_ms_onnxruntime_cpu``,
    ``parity`` (``"passed"``); ``control_mAP`` when the export's control has the control's mAP
    and ``control_delta`` (searched - control, in-run mAPs, rounded to 6 decimals; else the
    control's ``delta_mAP``) when it can be computed. The control tags are of the run's quality
    (``control.quality``): a Mask R-CNN searched by mask AP gets ``segm_mAP``,
    ``control_segm_mAP`` and a ``control_delta`` of mask AP (beside its box ``mAP``).
    ``storage_uri`` when given; then ``extra_tags`` (which may not reuse these keys). Numbers are written as
    :func:`repr`/:func:`str` write them, so ``float(tag)`` gives the value back exactly."""
    parallel = _key(info, "desc.neck.code", where)
    if (not isinstance(parallel, (list, tuple)) or not parallel
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in parallel)):
        raise RegistryError(f"{where}: desc.neck.code must be a list of non-negative integers, got {brief(parallel, 60)}")
    tags = {"serial_code": str(_key(info, "desc.backbone.code", where)),
            "parallel_code": "-".join(str(v) for v in parallel),
            "block": str(_key(info, "desc.backbone.block", where)),
            "data_version": str(_key(info, "data.version", where))}
    q = "mIoU" if info.get("task") == "semantic_segmentation" else "mAP"  # a semantic model's quality is its mIoU
    tags[q] = _number(_key(info, f"metrics.{q}", where), f"metrics.{q}", where)
    control = info.get("control")
    if isinstance(control, Mapping) and control.get("quality") in RUN_QUALITIES and control["quality"] != q:
        q = control["quality"]  # the run compared another figure (a Mask R-CNN's mask AP): tag it too
        tags[q] = _number(_key(info, f"metrics.{q}", where), f"metrics.{q}", where)
    if isinstance(control, Mapping):
        searched = control.get("searched") if isinstance(control.get("searched"), Mapping) else {}
        ctrl = control.get("control") if isinstance(control.get("control"), Mapping) else {}
        if _is_number(ctrl.get(q)):
            tags[f"control_{q}"] = _number(ctrl[q], f"control.control.{q}", where)
            if _is_number(searched.get(q)):
                tags["control_delta"] = repr(round(float(searched[q]) - float(ctrl[q]), 6))
        if "control_delta" not in tags and _is_number(control.get(f"delta_{q}")):
            tags["control_delta"] = _number(control[f"delta_{q}"], f"control.delta_{q}", where)
    tags["params"] = _number(_key(info, "costs.params", where), "costs.params", where)
    tags["gflops"] = _number(_key(info, "costs.gflops", where), "costs.gflops", where)
    for runtime in ("pytorch_cpu", "onnxruntime_cpu"):
        key = f"costs.latency_ms.{runtime}"
        tags[f"latency_ms_{runtime}"] = _number(_key(info, key, where), key, where)
    tags["parity"] = "passed"
    if storage_uri is not None:
        if not isinstance(storage_uri, str) or not storage_uri.strip():
            raise RegistryError(f"storage_uri {brief(storage_uri, 60)} must be a non-empty URI (where the cluster "
                                "reads the export folder, e.g. s3://bucket/exports/name)")
        tags["storage_uri"] = storage_uri.strip()
    for key, value in (extra_tags or {}).items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise RegistryError(f"extra tag {brief(key, 60)}: keys and values must be strings, got {brief(value, 60)}")
        if key in COMPUTED_TAGS or key in PROMOTION_TAGS:
            raise RegistryError(f"extra tag {key!r} is one the registry sets itself; choose another key")
        tags[key] = value
    return tags


def _run_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    """The run's metrics (for comparing runs in the MLflow UI): the numeric version tags."""
    keys = (*RUN_QUALITIES, *(f"control_{k}" for k in RUN_QUALITIES), "control_delta", "params", "gflops",
            "latency_ms_pytorch_cpu", "latency_ms_onnxruntime_cpu")
    return {k: float(tags[k]) for k in keys if k in tags}


# --------------------------------------------------------------------------------------------
# MLflow plumbing


def _client_class() -> Any:
    """``mlflow.MlflowClient``, or :class:`RegistryError` naming the extra to install."""
    try:
        from mlflow import MlflowClient
    except ImportError as exc:
        raise RegistryError(f"the model registry needs the 'registry' extra (mlflow-skinny): {HINT} ({exc})") from None
    return MlflowClient


def http_env(timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP settings for requests that together end within about ``timeout_s``
    seconds: ``retries + 1`` tries of ``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds each (a timeout
    per connect and per read) and the back-off sleeps between them (2 retries and 2 s of sleep
    from 10 s on, none below), no jitter, no ``Retry-After`` waits; no run URL on stdout, no
    progress bars."""
    retries = 2 if timeout_s >= 10 else 0
    backoff = 1 if retries else 0
    sleeps = backoff * (2 ** retries - 2) if retries >= 2 else 0   # urllib3: 0, 2b, 4b, ...
    per_try = max(1, int((timeout_s - sleeps) // (retries + 1)))
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(per_try), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff), "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
            "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_UNREACHABLE = (("Connection refused", "connection refused"), ("timed out", "no answer in time"),
                ("Read timed out", "no answer in time"), ("NameResolutionError", "host name not resolved"),
                ("Name or service not known", "host name not resolved"),
                ("RemoteDisconnected", "connection closed without an answer"),
                ("Connection aborted", "connection closed without an answer"),
                ("Max retries exceeded", "no answer after retries"), ("Failed to establish", "no connection"))


def _unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` means the registry did not answer (a short reason), else None."""
    import requests
    chain, cur = [], exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain)
    if "error responses" in text:  # urllib3 gave up on repeated 429/5xx answers: it answers, badly
        return None
    for needle, reason in _UNREACHABLE:
        if needle in text:
            return reason
    if any(isinstance(e, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                          requests.exceptions.Timeout)) for e in chain):
        return type(exc).__name__
    return None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------------------
# the registry


class Registry:
    """An MLflow model registry at ``uri`` (default ``$MLFLOW_TRACKING_URI``). Metadata calls
    end within about ``timeout_s`` seconds each; artifact uploads and downloads get
    ``transfer_timeout_s`` per request. Thread-safe, one call at a time (see :func:`http_env`)."""

    def __init__(self, uri: str | None = None, *, timeout_s: float = 30.0, transfer_timeout_s: float = 600.0) -> None:
        self.uri = tracking_uri(uri)
        for label, value in (("timeout_s", timeout_s), ("transfer_timeout_s", transfer_timeout_s)):
            if not _is_number(value) or value <= 0:
                raise RegistryError(f"registry {label} must be a positive number of seconds, got {brief(value, 60)}")
        self.timeout_s = float(timeout_s)
        self._env = http_env(self.timeout_s)
        # uploads and downloads: the same tries, a longer wait per request (a large file)
        self._transfer_env = {**self._env, "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(transfer_timeout_s)))}
        self._client = _client_class()(tracking_uri=self.uri, registry_uri=self.uri)

    def __repr__(self) -> str:
        return f"Registry({self.shown_uri!r})"

    @property
    def shown_uri(self) -> str:
        """The URI as messages show it (credentials hidden)."""
        return shown_uri(self.uri)

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calls(self, what: str, *, missing: str | None = None, transfer: bool = False) -> Iterator[None]:
        """Run MLflow calls with this client's HTTP settings; any failure becomes a
        :class:`RegistryError` naming the URI and ``what``. ``missing``: the message's object
        when the server answers RESOURCE_DOES_NOT_EXIST."""
        import requests
        from mlflow.exceptions import MlflowException
        with _environ(self._transfer_env if transfer else self._env):
            try:
                yield
            except RegistryError:
                raise
            except (MlflowException, requests.exceptions.RequestException, OSError) as exc:
                if missing and getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                    raise RegistryError(f"the model registry at {self.shown_uri} has no {missing}") from None
                reason = _unreachable(exc)
                if reason:
                    raise RegistryError(f"the model registry at {self.shown_uri} is unreachable ({reason}) while "
                                        f"{what}") from exc
                raise RegistryError(f"the model registry at {self.shown_uri}: {what} failed: {_first_line(exc)}") from exc

    def _model(self, name: str) -> Any:
        """The ``RegisteredModel`` ``name``; RegistryError when it does not exist."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"model name {brief(name, 60)} must be a non-empty string")
        with self._calls(f"reading model {name!r}", missing=f"model {name!r}"):
            return self._client.get_registered_model(name)

    def _version(self, name: str, number: int) -> Any:
        with self._calls(f"reading version {number} of model {name!r}", missing=f"version {number} of model {name!r}"):
            return self._client.get_model_version(name, str(number))

    def _resolve(self, name: str, ref: int | str) -> tuple[Any, Any]:
        """``(RegisteredModel, ModelVersion)`` of ``ref`` (a version number or an alias)."""
        number = version_number(ref)
        model = self._model(name)
        if number is None:
            alias = str(ref).strip()
            aliases = dict(model.aliases or {})
            if alias not in aliases:
                known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
                raise RegistryError(f"the model registry at {self.shown_uri}: model {name!r} has no alias {alias!r} "
                                    f"(its aliases: {known})")
            number = int(aliases[alias])
        return model, self._version(name, number)

    # -- reading -------------------------------------------------------------------------------

    def check(self) -> None:
        """Return when the registry answers; :class:`RegistryError` naming the URI otherwise."""
        with self._calls("checking that it answers"):
            self._client.search_registered_models(max_results=1)

    def models(self) -> list[ModelInfo]:
        """Every registered model, by name."""
        out: list[ModelInfo] = []
        token = None
        with self._calls("listing the registered models"):
            while True:
                page = self._client.search_registered_models(max_results=1000, page_token=token)
                out += [ModelInfo(name=str(m.name), aliases={str(a): int(v) for a, v in (m.aliases or {}).items()},
                                  tags={str(k): str(v) for k, v in (m.tags or {}).items()},
                                  created_ms=int(m.creation_timestamp or 0)) for m in page]
                token = page.token
                if not token:
                    break
        return sorted(out, key=lambda m: m.name)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of model ``name``, ascending; RegistryError when the model does not exist."""
        model = self._model(name)
        if "'" in name or "\\" in name:
            raise RegistryError(f"model name {name!r}: quotes and backslashes cannot be searched for")
        by_version: dict[int, list[str]] = {}
        for alias, v in (model.aliases or {}).items():
            by_version.setdefault(int(v), []).append(str(alias))
        found: list[VersionInfo] = []
        token = None
        with self._calls(f"listing the versions of model {name!r}"):
            while True:
                page = self._client.search_model_versions(filter_string=f"name='{name}'", max_results=1000,
                                                          page_token=token)
                found += [VersionInfo.of(mv, tuple(by_version.get(int(mv.version), ()))) for mv in page]
                token = page.token
                if not token:
                    break
        return sorted(found, key=lambda v: v.version)

    def get(self, name: str, ref: int | str) -> VersionInfo:
        """Version ``ref`` of model ``name``: a version number (int or digits) or an alias name."""
        _, mv = self._resolve(name, ref)
        return VersionInfo.of(mv)

    def alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version alias ``alias`` of model ``name`` points at, None when the alias is unset;
        RegistryError when the model does not exist."""
        model = self._model(name)
        target = (model.aliases or {}).get(alias)
        return None if target is None else VersionInfo.of(self._version(name, int(target)))

    # -- writing -------------------------------------------------------------------------------

    def _experiment_id(self, name: str) -> str:
        exp_name = EXPERIMENT_PREFIX + name
        from mlflow.exceptions import MlflowException
        with self._calls(f"finding or creating experiment {exp_name!r}"):
            exp = self._client.get_experiment_by_name(exp_name)
            if exp is None:
                try:
                    return str(self._client.create_experiment(exp_name))
                except MlflowException as exc:  # made meanwhile by another client
                    if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self._client.get_experiment_by_name(exp_name)
            if exp is None or exp.lifecycle_stage == "deleted":
                raise RegistryError(f"the model registry at {self.shown_uri}: experiment {exp_name!r} is deleted; "
                                    "restore it (mlflow experiments restore) or remove it for good (mlflow gc)")
            return str(exp.experiment_id)

    def _ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException
        with self._calls(f"creating model {name!r}"):
            try:
                self._client.get_registered_model(name)
                return
            except MlflowException as exc:
                if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
            try:
                self._client.create_registered_model(name, tags={"spnas": "detector"},
                                                     description="SP-NAS detector exports (spnas registry)")
                log.info("created registered model %s at %s", name, self.shown_uri)
            except MlflowException as exc:  # made meanwhile by another client
                if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise

    def _wait_ready(self, name: str, mv: Any) -> Any:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while str(mv.status) != "READY":
            if str(mv.status) == "FAILED_REGISTRATION":
                raise RegistryError(f"the model registry at {self.shown_uri}: version {mv.version} of model {name!r} "
                                    f"failed to register: {mv.status_message or 'no reason given'}")
            if time.monotonic() > deadline:
                raise RegistryError(f"the model registry at {self.shown_uri}: version {mv.version} of model {name!r} "
                                    f"is still {mv.status} after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.5)
            mv = self._version(name, int(mv.version))
        return mv

    def register(self, export_dir: str | os.PathLike, name: str, *, weights: str | os.PathLike | None = None,
                 storage_uri: str | None = None, extra_tags: Mapping[str, str] | None = None) -> VersionInfo:
        """Register the export folder ``export_dir`` as a new version of model ``name`` (created
        when missing) and return it, READY. Refused before anything is written when the parity
        gate did not pass, a key the tags need is missing, ``weights`` is not a file or the
        registry does not answer. The run (experiment ``spnas/<name>``) holds ``export/`` and,
        with ``weights``, ``pytorch/model.pth``; tags: :func:`version_tags`. No alias is set."""
        check_name(name)
        folder = Path(export_dir)
        info = read_export(folder)
        tags = version_tags(info, storage_uri=storage_uri, extra_tags=extra_tags, where=str(folder / EXPORT_JSON))
        weights_path = None
        if weights is not None:
            weights_path = Path(weights)
            if not weights_path.is_file():
                raise RegistryError(f"weights file {str(weights_path)!r} does not exist (the PyTorch weights the export "
                                    "came from)")
        self.check()
        exp_id = self._experiment_id(name)
        with self._calls(f"creating a run in experiment {EXPERIMENT_PREFIX + name!r}"):
            run = self._client.create_run(exp_id, run_name=f"{name}-export",
                                          tags={"spnas.model": name, "spnas.export_dir": str(folder.resolve())})
        run_id = run.info.run_id
        finished = False
        try:
            with self._calls(f"uploading {str(folder)!r} to run {run_id} of model {name!r}", transfer=True):
                self._client.log_artifacts(run_id, str(folder), EXPORT_PATH)
                if weights_path is not None:
                    with tempfile.TemporaryDirectory(prefix="spnas-registry-") as tmp:
                        link = Path(tmp) / WEIGHTS_FILE   # the artifact takes the file's name
                        try:
                            link.symlink_to(weights_path.resolve())
                        except OSError:
                            shutil.copyfile(weights_path, link)
                        self._client.log_artifact(run_id, str(link), PYTORCH_PATH)
            with self._calls(f"logging the metrics of run {run_id} of model {name!r}"):
                from mlflow.entities import Metric
                stamp = int(time.time() * 1000)
                self._client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in _run_metrics(tags).items()])
            finished = True
        finally:
            with contextlib.suppress(Exception), _environ(self._env):  # keep the first error
                self._client.set_terminated(run_id, "FINISHED" if finished else "FAILED")
        self._ensure_model(name)
        source = f"{run.info.artifact_uri.rstrip('/')}/{EXPORT_PATH}"
        with self._calls(f"creating a version of model {name!r} from run {run_id}"):
            mv = self._client.create_model_version(name, source, run_id=run_id, tags=tags, await_creation_for=0)
        mv = self._wait_ready(name, mv)
        log.info("registered %s as version %s of model %s at %s (run %s)", folder, mv.version, name, self.shown_uri,
                 run_id)
        return VersionInfo.of(mv)

    def set_alias(self, name: str, alias: str, version: int | str) -> VersionInfo:
        """Point ``alias`` of model ``name`` at ``version`` (which must exist); returns that version."""
        number = version_number(version)
        if number is None:
            raise RegistryError(f"version {brief(version, 60)} must be a version number")
        self._model(name)
        self._version(name, number)
        with self._calls(f"setting alias {alias!r} of model {name!r} to version {number}"):
            self._client.set_registered_model_alias(name, alias, str(number))
        log.info("model %s: %s -> version %d", name, alias, number)
        return VersionInfo.of(self._version(name, number))

    def set_challenger(self, name: str, version: int | str) -> VersionInfo:
        """Alias ``challenger`` -> ``version``; returns that version."""
        return self.set_alias(name, CHALLENGER, version)

    def register_candidate(self, export_dir: str | os.PathLike, name: str, **register_kwargs: Any) -> tuple[VersionInfo, str]:
        """:meth:`register`, then make the new version ``champion`` (through :meth:`promote`)
        when the model has no champion, else ``challenger``. Returns ``(version, alias set)``."""
        info = self.register(export_dir, name, **register_kwargs)
        if self.alias(name, CHAMPION) is None:
            return self.promote(name, info.version, reason="first candidate: the model had no champion"), CHAMPION
        return self.set_challenger(name, info.version), CHALLENGER

    def promote(self, name: str, version: int | str, *, reason: str = "") -> VersionInfo:
        """Make ``version`` the ``champion`` of model ``name`` in one server call, after checking
        that the registry answers, the version exists and its parity tag says ``passed``; then
        remove ``challenger`` when it pointed at this version and tag the version ``promoted_at``
        (UTC, ISO 8601), ``previous_champion`` (the former champion's number, "" when none) and
        ``promotion_reason``. Promoting the champion again only clears such a ``challenger``."""
        number = version_number(version)
        if number is None:
            raise RegistryError(f"version {brief(version, 60)} must be a version number")
        if not isinstance(reason, str):
            raise RegistryError(f"promotion reason must be a string, got {brief(reason, 60)}")
        self.check()
        model, mv = self._resolve(name, number)
        if (mv.tags or {}).get("parity") != "passed":
            raise RegistryError(f"the model registry at {self.shown_uri}: version {number} of model {name!r} has no "
                                "tag parity=passed: only a version whose export passed the parity gate can be champion")
        aliases = {str(a): int(v) for a, v in (model.aliases or {}).items()}
        previous = aliases.get(CHAMPION)
        if previous != number:
            with self._calls(f"setting alias 'champion' of model {name!r} to version {number}"):
                self._client.set_registered_model_alias(name, CHAMPION, str(number))
            log.info("model %s: champion -> version %d (was %s)", name, number, previous)
        what = f"finishing the promotion of version {number} of model {name!r} (it is champion now)"
        with self._calls(what):
            if aliases.get(CHALLENGER) == number:
                self._client.delete_registered_model_alias(name, CHALLENGER)
            if previous != number:
                stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                tags = {"promoted_at": stamp, "previous_champion": "" if previous is None else str(previous),
                        "promotion_reason": reason}
                for key, value in tags.items():
                    self._client.set_model_version_tag(name, str(number), key, value)
        return VersionInfo.of(self._version(name, number))

    def download(self, name: str, ref: int | str, dst: str | os.PathLike) -> Path:
        """Download the run artifacts of version ``ref`` (number or alias) of model ``name`` into
        ``dst``: ``dst/export/...`` and, when registered with weights, ``dst/pytorch/model.pth``.
        Each folder is downloaded beside ``dst`` first and then moved in place, replacing what
        ``dst`` held under those names. Returns ``dst``."""
        info = self.get(name, ref)
        if not info.run_id:
            raise RegistryError(f"the model registry at {self.shown_uri}: version {info.version} of model {name!r} has "
                                "no run: it was not registered by spnas")
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        what = f"downloading version {info.version} of model {name!r} (run {info.run_id})"
        tmp = Path(tempfile.mkdtemp(prefix=".registry-download-", dir=dst))
        try:
            with self._calls(what):
                present = {Path(f.path).name for f in self._client.list_artifacts(info.run_id)}
            if EXPORT_PATH not in present:
                raise RegistryError(f"the model registry at {self.shown_uri}: run {info.run_id} of version "
                                    f"{info.version} of model {name!r} has no {EXPORT_PATH}/ artifacts")
            parts = [p for p in (EXPORT_PATH, PYTORCH_PATH) if p in present]
            with self._calls(what, transfer=True):
                for part in parts:
                    self._client.download_artifacts(info.run_id, part, str(tmp))
            for part in (EXPORT_PATH, PYTORCH_PATH):
                target = dst / part
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                if part in parts:
                    os.replace(tmp / part, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded version %d of model %s to %s", info.version, name, dst)
        return dst
