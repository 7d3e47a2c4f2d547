"""Shipping a model: the NAS pipeline's tail and the retraining pipeline's steps (no kfp here).

The NAS pipeline ends with :func:`export_record` (the run's result exported under
``<run>/export/``, its parity gate passed or the task fails) and :func:`register_export` (the
export registered in the MLflow Model Registry as the challenger, or as the champion when the
model has none). The retraining pipeline (``pipelines/retrain_pipeline.py``) runs
:func:`retrain_preflight`, stages the new data, :func:`fetch_champion`, trains the champion's
architecture from its weights on the new data (the full-train task), :func:`evaluate_record`
for the champion *and* the retrained challenger on the same new validation split,
:func:`decide`, and then either :func:`export_record` + :func:`promote_export` (register, write
the KServe InferenceService manifest, move the ``champion`` alias) or :func:`keep_champion`.

Every function takes URIs or paths and plain values and returns plain values, so the same
code runs in a KFP task, under kfp.local and in tests. The registry's address is the
``registry_uri`` argument, else the environment's ``MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config.types import RunConfig
from ..search.settings import quality_key
from ..storage import is_uri, local_path, upload
from ..utils.errors import PhaseError
from ..utils.fileio import atomic_write_json, read_json
from . import pods, steps
from .rounds import STATE_FILE

log = logging.getLogger(__name__)

#: Where a run keeps its exported model: ``<run>/export/`` (what a KServe storageUri points at).
EXPORT_DIR = "export"
#: Where a retraining run keeps the champion it started from: ``<run>/champion/model.pth``.
CHAMPION_DIR = "champion"
#: The retraining verdict, beside the run's other files: ``<run>/verdict.json``.
VERDICT_FILE = "verdict.json"


def _join(run_uri: str, *parts: str) -> str:
    return "/".join(p for p in (run_uri.rstrip("/"), *parts) if p)


def publish_folder(folder: str | os.PathLike, target: str) -> str:
    """Copy every file of ``folder`` to ``target`` (an ``s3://``/``minio://`` prefix or a local
    folder), relative paths kept; returns ``target``."""
    src = Path(folder)
    if is_uri(target):
        upload(src, target.rstrip("/") + "/")
    else:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, target, dirs_exist_ok=True)
    return target


def run_result(best: Mapping[str, Any], controls: Mapping[str, Any] | None, run_uri: str) -> dict[str, Any]:
    """The record of the run's result: the full-trained ``best``, or the final control when the
    run's ``control.json`` (written by the report) says the control won."""
    rec = pods.plain(dict(best))
    path = _join(run_uri, "control.json")
    if controls and controls.get("control"):
        try:
            summary = json.loads(Path(local_path(path)).read_text(encoding="utf-8"))
        except Exception as exc:
            raise PhaseError(f"{path}: the run's control summary cannot be read ({exc}); the report task writes it "
                             "before the export") from None
        if summary.get("winner") == "control":
            rec = pods.plain(dict(controls["control"]))
    return rec


def _control_summary(run_uri: str) -> dict[str, Any] | None:
    path = _join(run_uri, "control.json")
    try:
        return json.loads(Path(local_path(path)).read_text(encoding="utf-8"))
    except Exception:
        return None


def _parity_figures(program: Mapping[str, Any]) -> dict[str, Any]:
    """One program's gate figures for the export task's output and metrics: detections
    (``max_box_diff``, ``max_score_diff``, ``unmatched``, ``mAP_diff``; a Mask R-CNN's
    ``mask_mismatch``, ``min_mask_iou``, ``segm_mAP_diff`` too) or label maps (``disagree``,
    ``min_agreement``, ``mIoU_diff``)."""
    val = program.get("val") or {}
    if "disagree" in val:
        return {"disagree": val.get("disagree"), "min_agreement": val.get("min_agreement"),
                "mIoU_diff": program.get("mIoU_diff")}
    out = {"max_box_diff": val.get("max_box_diff"), "max_score_diff": val.get("max_score_diff"),
           "unmatched": val.get("unmatched"), "mAP_diff": program.get("mAP_diff")}
    if "mask_mismatch" in val:
        out.update(mask_mismatch=val["mask_mismatch"], min_mask_iou=val.get("min_mask_iou"),
                   segm_mAP_diff=program.get("segm_mAP_diff"))
    return out


def run_lineage(cfg: RunConfig, run_uri: str, step_name: str, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The lineage of ``record`` (a record of ``cfg``'s step ``step_name``) from what the run published
    under ``run_uri``: each search step's ``state.json``, each other step's ``output.csv``
    (:func:`spnas.export.bundle.lineage`). A step whose files are missing is left out (the
    retraining pipeline has no search)."""
    import csv

    from ..export.bundle import lineage
    from ..search import records as search_records
    phases: dict[str, dict[str, Any]] = {}
    for step in cfg.steps:
        base = _join(run_uri, step.name)
        try:
            if step.role in ("serial", "parallel"):
                recs = search_records(json.loads(Path(local_path(_join(base, STATE_FILE))).read_text()))
            else:
                rows = csv.DictReader(Path(local_path(_join(base, "output.csv"))).read_text().splitlines())
                recs = [{"id": int(r["worker_id"]), "metrics": json.loads(r["performance"]), "desc": json.loads(r["desc"])}
                        for r in rows]
        except Exception as exc:  # noqa: BLE001  (a step that did not run or publish: left out)
            log.debug("lineage: %s of %s not read (%s)", step.name, run_uri, exc)
            continue
        phases[step.name] = {"role": step.role, "records": recs}
    return lineage({"phases": phases}, {**pods.plain(dict(record)), "phase": step_name})


def export_record(config_text: str, step_name: str, record: Mapping[str, Any], weights: str, data_uri: str,
                  run_uri: str, name: str, overrides: Sequence[str] | str = (), *, control: bool = True,
                  max_images: int | None = None) -> dict[str, Any]:
    """Export ``record``'s model (its ``desc``; ``weights`` a URI or path, default the record's)
    with :func:`spnas.export.bundle.export_model`, gated on the validation split of the data set
    at ``data_uri`` (read as step ``step_name`` reads it), and publish the folder to
    ``<run>/export/``. ``control``: put the run's ``control.json`` into the model card.

    Returns ``{"export_uri", "weights", "passed", "mAP", "params", "gflops", "latency_ms",
    "parity": {program: {max_box_diff, max_score_diff, mAP_diff, unmatched}}, "data_version"}``;
    raises :class:`~spnas.export.bundle.ExportRefused` after publishing when the gate failed
    (its ``parity.json`` is there to read), so nothing downstream registers it."""
    from ..export.bundle import check_publishable, export_model
    cfg, step = pods.load_step(config_text, step_name, overrides)
    rec = pods.plain(dict(record))
    weights = weights or str(rec.get("weights") or "")
    if not weights:
        raise PhaseError(f"record {rec.get('id')!r} has no weights to export")
    target = _join(run_uri, EXPORT_DIR)
    with tempfile.TemporaryDirectory(prefix="spnas-export-") as tmp:
        out = Path(tmp) / EXPORT_DIR
        info = export_model(rec["desc"], local_path(weights), steps.data_source(step, data_uri), out, name=name,
                            control=_control_summary(run_uri) if control else None, max_images=max_images,
                            lineage_=run_lineage(cfg, run_uri, step_name, rec))
        report = read_json(out / "parity.json", "parity report")
        publish_folder(out, target)
        programs = {k: _parity_figures(p) for k, p in (report.get("programs") or {}).items()}
        summary = {"export_uri": target, "weights": weights, "passed": bool(info["parity"]["passed"]),
                   "task": info.get("task", "detection"),
                   **{q: info["metrics"].get(q) for q in ("mAP", "segm_mAP", "mIoU") if q == "mAP" or q in info["metrics"]},
                   "params": info["costs"]["params"],
                   "gflops": info["costs"]["gflops"], "latency_ms": info["costs"]["latency_ms"],
                   "parity": programs, "data_version": info["data"]["version"], "name": name}
        log.info("exported %s to %s: parity gate %s", weights, target, "passed" if summary["passed"] else "FAILED")
        check_publishable(out)  # ExportRefused, naming parity.json's figures
    return summary


def _registry(registry_uri: str):
    from ..registry.client import Registry
    return Registry(registry_uri or None)


def _registered(reg: Any, model_name: str, export_uri: str) -> Any:
    """The version of ``model_name`` registered from ``export_uri`` (its ``export_uri`` tag), or
    None (also when the model does not exist yet)."""
    from ..utils.errors import RegistryError
    try:
        found = [v for v in reg.versions(model_name) if v.tags.get("export_uri") == export_uri]
    except RegistryError:
        reg.check()  # a registry gone down fails here; else the model does not exist yet
        return None
    return found[-1] if found else None


def registry_configured(registry_uri: str) -> bool:
    return bool(registry_uri.strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip())


def _local_export(export_uri: str) -> Path:
    return Path(local_path(export_uri.rstrip("/") + "/" if is_uri(export_uri) else export_uri))


def register_export(export_uri: str, weights: str, model_name: str, registry_uri: str = "", *,
                    required: bool = False, extra_tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Register the export folder at ``export_uri`` (with the PyTorch ``weights`` it came from)
    as a new version of ``model_name``: aliased ``champion`` when the model has none, else
    ``challenger``. Without a registry (no ``registry_uri``, no ``MLFLOW_TRACKING_URI``) nothing
    is registered and ``{"registered": False, "why": ...}`` comes back, unless ``required``
    (then :class:`~spnas.utils.errors.RegistryError`)."""
    if not registry_configured(registry_uri) and not required:
        why = "no model registry configured (pipeline parameter registry_uri or MLFLOW_TRACKING_URI)"
        log.warning("not registering %s: %s", export_uri, why)
        return {"registered": False, "why": why, "name": model_name}
    reg = _registry(registry_uri)
    reg.check()
    found = _registered(reg, model_name, export_uri)  # a retried task: its earlier attempt registered it
    if found is not None:
        if not found.aliases:  # the earlier attempt stopped between registering and aliasing
            if reg.alias(model_name, "champion") is None:
                reg.promote(model_name, found.version, reason="the model's first version")
            else:
                reg.set_challenger(model_name, found.version)
        info = reg.get(model_name, str(found.version))
        alias = "champion" if "champion" in info.aliases else "challenger"
    else:
        info, alias = reg.register_candidate(_local_export(export_uri), model_name, weights=local_path(weights),
                                             storage_uri=export_uri if is_uri(export_uri) else None,
                                             extra_tags={**dict(extra_tags or {}), "export_uri": export_uri})
    log.info("registered %s as %s version %d (%s)", export_uri, model_name, info.version, alias)
    return {"registered": True, "name": model_name, "version": info.version, "alias": alias,
            "registry": reg.shown_uri, "tags": dict(info.tags)}


# ----------------------------------------------------------------------------- retraining

def retrain_preflight(config_text: str, overrides: Sequence[str] | str, data_uri: str, run_uri: str, expected: str,
                      model_name: str, registry_uri: str = "") -> dict[str, Any]:
    """Refuse a retraining that cannot succeed, before anything trains: :func:`pods.preflight`
    (package version, config shape, data set layout, results prefix writable), then the
    registry: reachable, and ``model_name`` has a ``champion``. Returns pods.preflight's dict
    plus ``champion`` (its version)."""
    from ..utils.errors import RegistryError
    out = pods.preflight(config_text, overrides, data_uri, run_uri, expected)
    reg = _registry(registry_uri)
    reg.check()
    champ = reg.alias(model_name, "champion")
    if champ is None:
        raise RegistryError(f"model {model_name!r} in the registry at {reg.shown_uri} has no 'champion' alias: retraining "
                            "starts from the champion (run the NAS pipeline, or `spnas registry promote`)")
    return pods.struct({**out, "champion": champ.version, "registry": reg.shown_uri})


def fetch_champion(model_name: str, run_uri: str, overrides: str = "[]", registry_uri: str = "") -> dict[str, Any]:
    """Download the champion of ``model_name`` and publish its weights to
    ``<run>/champion/model.pth``. Returns a record a full-train task takes as its item
    (``{"id": "champion-v<version>", "desc", "weights", "version", "metrics", "data_version", "run_uri",
    "overrides"}``)."""
    reg = _registry(registry_uri)
    champ = reg.alias(model_name, "champion")
    if champ is None:
        from ..utils.errors import RegistryError
        raise RegistryError(f"model {model_name!r} in the registry at {reg.shown_uri} has no 'champion' alias")
    with tempfile.TemporaryDirectory(prefix="spnas-champion-") as tmp:
        got = reg.download(model_name, str(champ.version), Path(tmp) / "v")
        info = read_json(got / "export" / "export.json", "the champion's export description")
        weights = got / "pytorch" / "model.pth"
        if not weights.is_file():
            raise PhaseError(f"version {champ.version} of {model_name!r} holds no pytorch/model.pth: it cannot be "
                             "retrained (register exports with their weights)")
        uri = pods.publish(weights, run_uri, CHAMPION_DIR, "model.pth")
    log.info("champion of %s: version %d (%s)", model_name, champ.version, info["desc"]["backbone"]["code"])
    return pods.struct({"id": f"champion-v{champ.version}", "desc": info["desc"], "weights": uri,
                        "version": champ.version, "metrics": dict(info.get("metrics") or {}),
                        "data_version": (info.get("data") or {}).get("version", ""), "run_uri": run_uri,
                        "overrides": overrides if isinstance(overrides, str) else json.dumps(list(overrides))})


def evaluate_record(config_text: str, step_name: str, record: Mapping[str, Any], data_uri: str, role: str,
                    overrides: Sequence[str] | str = ()) -> dict[str, Any]:
    """COCO metrics of ``record``'s weights on the validation split of ``data_uri`` (read as step
    ``step_name`` reads it): ``{"role", "id", "weights", "desc", "metrics"}``. The champion and
    the challenger both go through this one function, on the same split. ``quality`` names the
    figure they are compared by: the run's quality (the first maximised of the config's
    objectives: segm_mAP for a Mask R-CNN searched by mask AP; else box mAP, a semantic model's
    mIoU)."""
    from ..training.architecture import evaluate_architecture
    cfg, step = pods.load_step(config_text, step_name, overrides)
    rec = pods.plain(dict(record))
    if rec.get("status", "ok") != "ok" or not rec.get("weights"):
        raise PhaseError(f"the {role} ({rec.get('id')!r}) has no trained weights to evaluate: "
                         f"{rec.get('error') or rec.get('status')}")
    metrics = evaluate_architecture(rec["desc"], local_path(rec["weights"]), steps.data_source(step, data_uri),
                                    device=cfg.device)
    key = quality_key(metrics, steps.objective_keys(cfg))
    log.info("%s %s on %s: %s %.2f", role, rec.get("id"), data_uri, key, metrics.get(key) or 0.0)
    return {"role": role, "id": rec.get("id"), "version": rec.get("version"), "weights": rec["weights"],
            "desc": rec["desc"], "quality": key,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def decide(champion: Mapping[str, Any], challenger: Mapping[str, Any], margin: float, run_uri: str,
           data_version: str = "", champion_version: Any = None) -> dict[str, Any]:
    """``"promote"`` when the challenger's quality (its ``quality`` key from
    :func:`evaluate_record`: the run's first maximised objective; without it
    :func:`~spnas.search.settings.quality_key`: box mAP, a semantic model's mIoU) beats the
    champion's by at least ``margin`` points on the same split, else ``"keep"``. The verdict
    (the key, both figures, the delta, the margin, the data version) is written to
    ``<run>/verdict.json`` and returned. :class:`PhaseError` when either model's metrics lack
    the key (a champion of another task than the challenger)."""
    key = challenger.get("quality") or quality_key(challenger.get("metrics"))
    figures = []
    for who, rec in (("champion", champion), ("challenger", challenger)):
        value = (rec.get("metrics") or {}).get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PhaseError(f"retraining decision: the {who}'s metrics have no {key!r} (got "
                             f"{sorted(rec.get('metrics') or {})}); champion and challenger must be the same task")
        figures.append(float(value))
    a, b = figures
    delta = round(b - a, 4)
    verdict = {"decision": "promote" if delta >= float(margin) else "keep", "key": key,
               "champion_version": champion_version,
               "champion": round(a, 4), "challenger": round(b, 4), "delta": delta, "margin": float(margin),
               "data_version": data_version, "champion_metrics": dict(champion.get("metrics") or {}),
               "challenger_metrics": dict(challenger.get("metrics") or {})}
    with tempfile.TemporaryDirectory(prefix="spnas-verdict-") as tmp:
        pods.publish(atomic_write_json(Path(tmp) / VERDICT_FILE, verdict), run_uri, "")
    log.info("retraining verdict: challenger %.2f vs champion %.2f %s (delta %+.2f, margin %.2f): %s", b, a, key,
             delta, float(margin), verdict["decision"])
    return verdict


def verdict_markdown(verdict: Mapping[str, Any], outcome: str) -> str:
    """The retraining run's verdict as the KFP UI shows it."""
    rows = [f"| champion (version {verdict.get('champion_version', '?')}) | {verdict['champion']:.2f} |",
            f"| challenger (retrained on the new data) | {verdict['challenger']:.2f} |"]
    return "\n".join([f"# Retraining: {outcome}", "",
                      f"Both models evaluated on the same validation split (data version "
                      f"`{verdict.get('data_version') or '?'}`).", "",
                      f"| model | {verdict['key']} |", "|---|---|", *rows, "",
                      f"Delta {verdict['delta']:+.2f} against a required margin of {verdict['margin']:.2f}: "
                      f"**{verdict['decision']}**.", ""])


def promote_export(export_uri: str, weights: str, model_name: str, verdict: Mapping[str, Any], image: str,
                   registry_uri: str = "", manifest_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The winning challenger's release: write the KServe InferenceService manifest into the
    export folder (published with it), register the folder (with ``weights``) as a new version
    of ``model_name`` tagged with the verdict, and move the ``champion`` alias to it. The
    registry is checked before anything is written to it and the alias moves in one call, so a
    registry that is down leaves it as it was. Returns ``{"name", "version", "previous",
    "manifest"}``."""
    from ..serve.manifest import write_manifest
    reg = _registry(registry_uri)
    reg.check()
    previous = reg.alias(model_name, "champion")
    folder = _local_export(export_uri)
    with tempfile.TemporaryDirectory(prefix="spnas-release-") as tmp:
        work = Path(tmp) / EXPORT_DIR
        shutil.copytree(folder, work)
        opts = dict(manifest_options or {})
        manifest = write_manifest(work, export_uri, image, name=opts.pop("name", None), **opts)
        publish_folder(work, export_uri)  # the manifest beside the model it serves
        tags = {"retrain_delta": str(verdict.get("delta")), "retrain_margin": str(verdict.get("margin")),
                "retrain_champion_mAP": str(verdict.get("champion")),
                "retrained_from": str(previous.version) if previous else ""}
        # a retried task finds the version its earlier attempt registered (tagged with the export's URI)
        info = _registered(reg, model_name, export_uri) or \
            reg.register(work, model_name, weights=local_path(weights),
                         storage_uri=export_uri if is_uri(export_uri) else None,
                         extra_tags={**tags, "export_uri": export_uri})
    reg.set_challenger(model_name, info.version)
    promoted = reg.promote(model_name, info.version,
                           reason=f"retrained: {verdict.get('challenger')} vs {verdict.get('champion')} mAP on data "
                                  f"version {verdict.get('data_version') or '?'} (margin {verdict.get('margin')})")
    log.info("promoted %s version %d to champion (was %s)", model_name, promoted.version,
             previous.version if previous else "none")
    return {"name": model_name, "version": promoted.version, "previous": previous.version if previous else None,
            "manifest": _join(export_uri, Path(manifest).name)}


def keep_champion(verdict: Mapping[str, Any], model_name: str, registry_uri: str = "") -> dict[str, Any]:
    """The champion stays: nothing in the registry changes; returns the champion's version and
    the verdict's figures."""
    champ = _registry(registry_uri).alias(model_name, "champion")
    return {"name": model_name, "champion": champ.version if champ else None, "decision": "keep",
            "champion_mAP": verdict.get("champion"), "challenger_mAP": verdict.get("challenger"),
            "delta": verdict.get("delta"), "margin": verdict.get("margin")}


# ----------------------------------------------------------------------------- component bodies
# (artifacts duck-typed: ``.path``, ``.metadata``, ``.log_metric``; no kfp here)

def _log_metrics(metrics: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(f"{prefix}{key}", float(value))


def export_task(config_text: str, step_name: str, record: Mapping[str, Any], controls: Mapping[str, Any] | None,
                weights: str, dataset: Any, workspace: str, run_uri: str, name: str, overrides: str, gate_images: int,
                parity_metrics: Any) -> dict[str, Any]:
    """The export component: :func:`export_record` of the run's result (:func:`run_result` of
    ``record`` and ``controls``) on the run's staged data set (the gate on its first
    ``gate_images`` val images, 0: all); the parity figures (``passed`` 1/0, per program max
    box/score difference, mAP difference) on a Metrics artifact."""
    root, _ = pods.dataset_of(dataset)
    result = run_result(record, controls, run_uri)
    with pods.data_cache(workspace):
        try:
            out = export_record(config_text, step_name, result, weights, root, run_uri, name, overrides,
                                control=bool(controls), max_images=int(gate_images) or None)
        except Exception:
            parity_metrics.log_metric("passed", 0.0)
            raise
    parity_metrics.log_metric("passed", 1.0)
    _log_metrics(parity_metrics, {**{q: out[q] for q in ("mAP", "segm_mAP", "mIoU") if out.get(q) is not None},
                                  "params": out["params"], "gflops": out["gflops"]})
    for prog, figures in out["parity"].items():
        _log_metrics(parity_metrics, figures, f"{prog}_")
    _log_metrics(parity_metrics, {k: v for k, v in out["latency_ms"].items() if k.endswith("_cpu")}, "latency_ms_")
    return pods.struct(out)


def register_task(export: Mapping[str, Any], model_name: str, registry_uri: str, note: Any) -> dict[str, Any]:
    """The NAS pipeline's register component: :func:`register_export` of the export, a Markdown
    note saying which version and alias it got (or why nothing was registered)."""
    out = register_export(str(export["export_uri"]), str(export["weights"]), model_name, registry_uri)
    if out["registered"]:
        text = (f"# Registered\n\n`{model_name}` version **{out['version']}**, alias **{out['alias']}**, in the "
                f"registry at {out['registry']} (export {export['export_uri']}, "
                + ", ".join(f"{q} {export[q]}" for q in ("mAP", "segm_mAP", "mIoU") if export.get(q) is not None)
                + ").\n")
    else:
        text = f"# Not registered\n\n{out['why']}. The export is at {export['export_uri']}.\n"
    Path(note.path).parent.mkdir(parents=True, exist_ok=True)
    Path(note.path).write_text(text, encoding="utf-8")
    return pods.struct(out)


def evaluate_task(config_text: str, step_name: str, record: Mapping[str, Any], dataset: Any, workspace: str,
                  role: str, overrides: str, metrics: Any) -> dict[str, Any]:
    """The evaluate component: :func:`evaluate_record` on the run's staged data set; the
    metrics on a Metrics artifact."""
    root, version = pods.dataset_of(dataset)
    with pods.data_cache(workspace):
        out = evaluate_record(config_text, step_name, record, root, role, overrides)
    _log_metrics(metrics, out["metrics"])
    metrics.metadata.update({"role": role, "weights": out["weights"], "data_version": version})
    return pods.struct({**out, "data_version": version})


def decide_task(champion: Mapping[str, Any], challenger: Mapping[str, Any], margin: float, run_uri: str,
                verdict_md: Any) -> str:
    """The decision component: :func:`decide`; the verdict as Markdown; returns ``"promote"``
    or ``"keep"``."""
    verdict = decide(champion, challenger, margin, run_uri, str(challenger.get("data_version") or ""),
                     champion_version=champion.get("version"))
    outcome = "the challenger wins" if verdict["decision"] == "promote" else "the champion stays"
    Path(verdict_md.path).parent.mkdir(parents=True, exist_ok=True)
    Path(verdict_md.path).write_text(verdict_markdown(verdict, outcome), encoding="utf-8")
    return str(verdict["decision"])


def read_verdict(run_uri: str) -> dict[str, Any]:
    """The verdict :func:`decide` wrote under ``run_uri``."""
    return read_json(local_path(_join(run_uri, VERDICT_FILE)), "retraining verdict")


def promote_task(export: Mapping[str, Any], model_name: str, run_uri: str, image: str, registry_uri: str,
                 release: Any) -> dict[str, Any]:
    """The promote component: :func:`promote_export` with the run's verdict; a Markdown release
    note (version, previous champion, both figures, the manifest)."""
    verdict = read_verdict(run_uri)
    out = promote_export(str(export["export_uri"]), str(export["weights"]), model_name, verdict, image, registry_uri)
    text = (verdict_markdown(verdict, "the challenger wins") +
            f"\n`{model_name}` version **{out['version']}** is the champion now (was {out['previous']}); "
            f"InferenceService manifest: {out['manifest']}.\n")
    Path(release.path).parent.mkdir(parents=True, exist_ok=True)
    Path(release.path).write_text(text, encoding="utf-8")
    return pods.struct(out)


def keep_task(model_name: str, run_uri: str, registry_uri: str, note: Any) -> dict[str, Any]:
    """The keep component: :func:`keep_champion`; a Markdown note with both figures."""
    verdict = read_verdict(run_uri)
    out = keep_champion(verdict, model_name, registry_uri)
    Path(note.path).parent.mkdir(parents=True, exist_ok=True)
    Path(note.path).write_text(verdict_markdown(verdict, "the champion stays") +
                               f"\n`{model_name}` version {out['champion']} stays the champion; nothing was "
                               "registered.\n", encoding="utf-8")
    return pods.struct(out)
