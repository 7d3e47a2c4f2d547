"""The search state machine of SpNasS (serial) and SpNasP (parallel): propose, update, front.

The search is a set of pure functions over a JSON-serialisable *state* dict, so that one round
can be proposed in one process (or pod) and its results recorded in another::

    state = new_state(SearchSettings("SpNasS", max_sample=20), seeds)
    while not is_done(state):
        state, cands = propose(state)            # children of Pareto-front parents
        state = update(state, [evaluate(c) for c in cands])
    best = front(state)

State layout (plain JSON types only; ``json.loads(json.dumps(state))`` is an equal state)::

    {"format": "spnas.search/1", "settings": {...SearchSettings fields...},
     "rng": [version, [625 ints], gauss_next],   # random.Random.getstate() as lists
     "next_id": int, "round": int, "proposed": int, "records": [record, ...]}

A record is a seed (``round`` -1, ``status`` "ok", ``parent`` None) or a candidate
(``status`` "pending" until :func:`update` makes it "ok" or "failed")::

    {"id", "round", "status", "desc", "parent", "parent_desc", "parent_weights", "ops",
     "params", "gflops", "memory", "latency", "metrics", "error", "weights", "inherited", "fresh",
     "trainable", "iters", "images", "seconds", "lineage_iters"}

``iters``/``images``/``seconds`` are what training the record cost; ``lineage_iters`` counts
the training iterations along its whole lineage since fine_tune (a seed brings its own), the
budget its equal-budget control gets.

Objectives: ``mAP`` (``segm_*``, a semantic model's ``mIoU``) comes from a record's metrics and is
maximised; ``params`` (total detector parameters), ``gflops`` (backbone + parallel + FPN at
``flops_size``) and, when an objective or budget needs them, ``memory`` (estimated training MiB) and
``latency`` (end-to-end ms, measured once per record, in isolation, when it is proposed) are
measured by this module for every record, seeds included, and are minimised. Measured values are
used (not reported ones) so that every record is compared in the same units.

Seeds at equal training (``refresh_seeds``): a seed arrives at the end of its own schedule,
while every candidate restarts the step's schedule from inherited weights, so a seed's figure is
not comparable with its children's (on the hard demo scenes a converged seed lost 0.5 mAP to 60
more iterations, its children 3-21, and the front never left the seed). With ``refresh_seeds``
the first candidates of the search are the seeds themselves, unchanged (``ops``
``["refresh"]``, parent the seed), trained like any child; once a seed's refresh is ok the seed
record leaves the front (:func:`superseded`) and the refresh stands for it. The refreshes count
towards ``max_sample`` and fill round slots like other candidates (a compiled pipeline's
fan-out is fixed).

All randomness comes from one ``random.Random`` seeded with ``settings.seed`` whose state is
carried in the search state: the same settings, seeds and results give the same proposals,
also across a JSON round trip of the state.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..models.desc import normalize_desc
from ..models.encoding import check_bounds, parse_serial
from ..utils.errors import CodeError, SearchError
from .operators import Rejected, mutate_parallel, mutate_serial
from .pareto import objective_values, pareto_front
from .records import CANDIDATE_KEYS, RESULT_KEYS
from .settings import MEASURED, SearchSettings, quality

log = logging.getLogger(__name__)

STATE_FORMAT = "spnas.search/1"
#: Description keys that concern the seed's own weights and are not passed to children.
_SEED_ONLY_KEYS = ("convert_pretrained", "pretrained_model_file", "weight_file")


def measure(desc: Mapping[str, Any], size: int) -> tuple[int, float]:
    """``(total detector params, GFLOPs at size x size)`` of a description, measured on the meta
    device (torch is imported here, on first use: tasks that only record results never need it)."""
    from ..models.cost import measure as _measure
    return _measure(desc, size)


def costs(desc: Mapping[str, Any], settings: SearchSettings) -> dict[str, Any]:
    """What the search measures of a description when it proposes it: ``params`` and ``gflops``
    always; ``memory`` (estimated training MiB) and ``latency`` (end-to-end ms, measured in
    isolation, on this machine) when an objective or a budget needs them, else None."""
    from ..models import cost
    n_params, n_gflops = cost.measure(desc, settings.flops_size)
    memory = cost.train_memory_mb(desc, settings.flops_size, settings.memory_batch) if settings.needs_memory else None
    latency = cost.detector_latency_ms(desc, settings.flops_size, seed=settings.seed) if settings.needs_latency else None
    return {"params": n_params, "gflops": n_gflops, "memory": memory, "latency": latency}


def _over_budget(key: str, c: Mapping[str, Any], settings: SearchSettings) -> Rejected | None:
    """The rejection of a child whose measured costs break a budget, or None."""
    for name, limit, unit in (("params", settings.max_params, "params"), ("gflops", settings.max_gflops, "GFLOPs"),
                              ("memory", settings.max_memory_mb, "MiB"), ("latency", settings.max_latency_ms, "ms")):
        if limit is not None and c[name] > limit:
            budget = {"params": "max_params", "gflops": "max_gflops", "memory": "max_memory_mb",
                      "latency": "max_latency_ms"}[name]
            return Rejected(f"over {budget}", f"{key}: {c[name]:g} {unit} > {budget} {limit:g}")
    return None


def _copy(state: Mapping[str, Any]) -> dict:
    """Deep copy through JSON: the copy has exactly the types a reloaded state has."""
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError) as exc:
        raise SearchError(f"search state is not JSON-serialisable: {exc}") from exc


def _load(state: Mapping[str, Any]) -> tuple[dict, SearchSettings]:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise SearchError(f"not a search state (expected format {STATE_FORMAT!r}); make one with new_state()")
    st = _copy(state)
    return st, SearchSettings.from_dict(st["settings"])


def _rng_from(st: Mapping[str, Any]) -> random.Random:
    rng = random.Random()
    version, internal, gauss = st["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return rng


def _rng_to_json(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _dedup_key(desc: Mapping[str, Any], algorithm: str) -> str:
    serial = desc["backbone"]["code"]
    if algorithm == "SpNasS":
        return serial
    return f"{serial}|{'-'.join(str(k) for k in desc['neck']['code'])}"


def _objective_metrics(metrics: Any, settings: SearchSettings, where: str) -> dict[str, Any]:
    if not isinstance(metrics, Mapping):
        raise SearchError(f"{where}: metrics must be a mapping with {list(_metric_keys(settings))}, got {metrics!r}")
    out = dict(metrics)
    for k in _metric_keys(settings):
        if k not in out and k.lower() in out:
            out[k] = out[k.lower()]
        if k not in out:
            raise SearchError(f"{where}: metrics {sorted(out)} lack the objective {k!r}")
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SearchError(f"{where}: metric {k!r} must be a number, got {v!r}")
        out[k] = float(v)
    return out


def _metric_keys(settings: SearchSettings) -> list[str]:
    return [k for k in settings.objective_keys if k not in MEASURED]


def new_state(settings: SearchSettings, seeds: Sequence[Mapping[str, Any]]) -> dict:
    """Start a search. ``seeds``: parents with known results, each
    ``{"desc": model desc, "metrics": {"mAP": ...}, "weights": uri or None}`` (other keys, e.g.
    of records of an earlier phase, are ignored). Seeds become ok records with ids
    ``0..len(seeds)-1``, round -1 and no parent; candidate ids continue after them."""
    if not isinstance(settings, SearchSettings):
        raise SearchError(f"settings must be a SearchSettings, got {type(settings).__name__}")
    if not seeds:
        raise SearchError("a search needs at least one seed (the fine-tuned or reignited network with its metrics)")
    recs = []
    for i, seed in enumerate(seeds):
        if not isinstance(seed, Mapping) or "desc" not in seed:
            raise SearchError(f"seed {i} must be a mapping with 'desc', 'metrics' and 'weights', got {seed!r}")
        desc = normalize_desc(seed["desc"])
        metrics = _objective_metrics(seed.get("metrics"), settings, f"seed {i}")
        for k in _metric_keys(settings):
            if not math.isfinite(metrics[k]):
                raise SearchError(f"seed {i}: metric {k!r} is {metrics[k]}, not a finite number")
        weights = seed.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise SearchError(f"seed {i}: weights must be a path/URI string or None, got {weights!r}")
        try:
            check_bounds(desc["backbone"]["code"], desc["neck"]["code"], settings.bounds)
        except CodeError as exc:
            log.warning("seed %d lies outside the search bounds (%s); its children must not", i, exc)
        c = costs(desc, settings)
        recs.append({"id": i, "round": -1, "status": "ok", "desc": desc, "parent": None, "parent_desc": None,
                     "parent_weights": None, "ops": [], **c,
                     "metrics": metrics, "error": None, "weights": weights, "inherited": None, "fresh": None,
                     "trainable": None, "iters": None, "images": None, "seconds": None,
                     "lineage_iters": _opt_int(seed.get("lineage_iters", 0), f"seed {i}: lineage_iters") or 0})
    state = {"format": STATE_FORMAT, "settings": settings.to_dict(),
             "rng": _rng_to_json(random.Random(settings.seed)),
             "next_id": len(recs), "round": 0, "proposed": 0, "records": recs,
             "plateau": {"best_mAP": _best_map(recs, settings), "stale_rounds": 0, "reignitions": 0}}
    log.info("%s search: %d seed(s), max_sample %d, objectives %s", settings.algorithm, len(recs),
             settings.max_sample, list(settings.objective_keys))
    return _copy(state)


REFRESH_OPS = ["refresh"]


def superseded(records: Sequence[Mapping[str, Any]]) -> set[Any]:
    """Ids of the seeds whose refresh (an ok record with ``ops`` ``["refresh"]`` and that seed as
    parent) has been recorded: they no longer stand for themselves on the front."""
    seeds = {r.get("id") for r in records if r.get("round") == -1}
    return {r.get("parent") for r in records
            if r.get("ops") == REFRESH_OPS and r.get("status") == "ok" and r.get("parent") in seeds}


def _front_records(st: Mapping[str, Any], settings: SearchSettings) -> list[dict]:
    gone = superseded(st["records"])
    ok = [r for r in st["records"] if r["status"] == "ok" and r["id"] not in gone]
    points = [objective_values(r, settings.objective_keys) for r in ok]
    return [ok[i] for i in pareto_front(points, settings.objective_keys)]


def _child_desc(parent_desc: Mapping[str, Any], serial: str, parallel: Sequence[int]) -> dict:
    d = copy.deepcopy(dict(parent_desc))
    for key in _SEED_ONLY_KEYS:
        d.pop(key, None)
    d["backbone"]["code"] = serial
    d["neck"]["code"] = list(parallel)
    return normalize_desc(d)


def _draw_child(rng: random.Random, parents: Sequence[Mapping[str, Any]], settings: SearchSettings,
                seen: set[str]) -> tuple[dict, Mapping[str, Any], list[str], dict[str, Any]]:
    parent = rng.choice(parents)
    pdesc = parent["desc"]
    if settings.algorithm == "SpNasS":
        serial, ops = mutate_serial(pdesc["backbone"]["code"], rng, settings)
        parallel = [0] * parse_serial(serial).num_stages
    else:
        serial = pdesc["backbone"]["code"]
        parallel, ops = mutate_parallel(pdesc, rng, settings)
    try:
        check_bounds(serial, parallel, settings.bounds)
    except CodeError as exc:
        raise Rejected("out of bounds", str(exc)) from None
    child = _child_desc(pdesc, serial, parallel)
    key = _dedup_key(child, settings.algorithm)
    if key in seen:
        raise Rejected("duplicate", f"code {key} was already proposed")
    c = costs(child, settings)
    rejected = _over_budget(key, c, settings)
    if rejected is not None:
        raise rejected
    return child, parent, ops, c


def propose(state: Mapping[str, Any], k: int | None = None) -> tuple[dict, list[dict]]:
    """Propose up to ``k`` (default ``candidates_per_round``) new candidates, never more than
    ``max_sample`` in total. Returns ``(new state, candidates)``; ``state`` is not mutated.

    Each candidate ``{"id", "round", "desc", "parent", "parent_desc", "parent_weights", "ops",
    "params", "gflops"}`` is a child of a parent drawn uniformly from the current Pareto front,
    within every bound and budget, and new to the whole search; it is recorded as pending.
    Raises :class:`SearchError` when ``max_redraws`` draws give no valid child."""
    st, settings = _load(state)
    if k is None:
        k = settings.candidates_per_round
    if isinstance(k, float) and k.is_integer():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise SearchError(f"propose: k must be a non-negative integer, got {k!r}")
    count = min(k, settings.max_sample - st["proposed"])
    if count <= 0:
        return st, []
    rng = _rng_from(st)
    parents = sorted(_front_records(st, settings), key=lambda r: r["id"])
    seen = {_dedup_key(r["desc"], settings.algorithm) for r in st["records"]}
    round_no = st["round"]
    cands = []
    refreshed = {r.get("parent") for r in st["records"] if r.get("ops") == REFRESH_OPS}
    to_refresh = [r for r in sorted(st["records"], key=lambda r: r["id"])
                  if settings.refresh_seeds and r["round"] == -1 and r["status"] == "ok" and r["id"] not in refreshed]
    for _ in range(count):
        if to_refresh:  # a seed retrained unchanged, like a child (see the module docstring)
            seed = to_refresh.pop(0)
            child = _child_desc(seed["desc"], seed["desc"]["backbone"]["code"], seed["desc"]["neck"]["code"])
            cands.append(_pending(st, {"id": st["next_id"], "round": round_no, "desc": child, "parent": seed["id"],
                                       "parent_desc": copy.deepcopy(seed["desc"]), "parent_weights": seed["weights"],
                                       "ops": list(REFRESH_OPS), **costs(child, settings)}))
            continue
        reasons: Counter = Counter()
        last = ""
        for _attempt in range(settings.max_redraws):
            try:
                child, parent, ops, c = _draw_child(rng, parents, settings, seen)
                break
            except Rejected as rej:
                reasons[rej.reason] += 1
                last = rej.detail
                log.debug("rejected child: %s", rej.detail)
        else:
            why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            raise SearchError(
                f"could not find a valid new child after {settings.max_redraws} draws: {why} "
                f"(last: {last}); {len(parents)} parent(s) on the front, {st['proposed'] + len(cands)} "
                f"candidate(s) proposed. Widen the bounds or budgets, or lower max_sample")
        seen.add(_dedup_key(child, settings.algorithm))
        cands.append(_pending(st, {"id": st["next_id"], "round": round_no, "desc": child, "parent": parent["id"],
                                   "parent_desc": copy.deepcopy(parent["desc"]), "parent_weights": parent["weights"],
                                   "ops": ops, **c}))
    st["proposed"] += len(cands)
    st["round"] = round_no + 1
    st["rng"] = _rng_to_json(rng)
    log.info("%s round %d: proposed %s (%d/%d)", settings.algorithm, round_no,
             [(c["id"], _dedup_key(c["desc"], settings.algorithm), c["ops"]) for c in cands],
             st["proposed"], settings.max_sample)
    return _copy(st), _copy(cands)


def _pending(st: dict, cand: dict) -> dict:
    """Record ``cand`` in ``st`` as pending (the next id taken) and return it."""
    st["next_id"] += 1
    st["records"].append({**copy.deepcopy(cand), "status": "pending", "metrics": None, "error": None,
                          "weights": None, "inherited": None, "fresh": None, "trainable": None, "iters": None, "images": None,
                          "seconds": None, "lineage_iters": None})
    return cand


def _opt_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SearchError(f"{where} must be a non-negative integer or None, got {value!r}")
    return value


def update(state: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict:
    """Record evaluation results of pending candidates; returns a new state.

    ``results``: ``[{"id", "status": "ok"|"failed", "metrics", "error", "weights", "inherited",
    "fresh", "trainable"}]``. An ok result needs finite objective metrics; one whose metric is not finite
    (NaN from a diverged run) is recorded as failed. Failed candidates stay in the state (and
    count towards ``max_sample``) but never reach the front. Raises :class:`SearchError` for an
    unknown or non-pending id, an unknown key or a bad value."""
    st, settings = _load(state)
    by_id = {r["id"]: r for r in st["records"]}
    for res in results:
        if not isinstance(res, Mapping):
            raise SearchError(f"a result must be a mapping, got {res!r}")
        unknown = sorted(set(res) - set(RESULT_KEYS) - set(CANDIDATE_KEYS))
        if unknown:
            raise SearchError(f"result {res.get('id')!r} has unknown key(s) {unknown}; known: {sorted(RESULT_KEYS)}")
        rid = res.get("id")
        if isinstance(rid, float) and rid.is_integer():
            rid = int(rid)
        if rid not in by_id:
            raise SearchError(f"result for unknown candidate id {res.get('id')!r}")
        rec = by_id[rid]
        if rec["status"] != "pending":
            raise SearchError(f"candidate {rid} is not pending (status {rec['status']!r}); "
                              "a result can be recorded once")
        status = res.get("status")
        where = f"result of candidate {rid}"
        weights = res.get("weights")
        if weights is not None and not isinstance(weights, str):
            raise SearchError(f"{where}: weights must be a path/URI string or None, got {weights!r}")
        error = res.get("error")
        if status == "ok":
            metrics = _objective_metrics(res.get("metrics"), settings, where)
            bad = [k for k in _metric_keys(settings) if not math.isfinite(metrics[k])]
            if bad:
                status = "failed"
                error = f"non-finite metric(s) {', '.join(f'{k}={metrics[k]}' for k in bad)}"
                log.warning("candidate %d: %s; recorded as failed", rid, error)
        elif status == "failed":
            metrics = dict(res["metrics"]) if isinstance(res.get("metrics"), Mapping) else None
            error = str(error) if error is not None else "failed (no error message given)"
            log.info("candidate %d failed: %s", rid, error)
        else:
            raise SearchError(f"{where}: status must be 'ok' or 'failed', got {status!r}")
        iters = _opt_int(res.get("iters"), f"{where}: iters")
        parent_lineage = by_id[rec["parent"]].get("lineage_iters") if rec.get("parent") in by_id else None
        rec.update(status=status, metrics=metrics, error=error if status == "failed" else None, weights=weights,
                   inherited=_opt_int(res.get("inherited"), f"{where}: inherited"),
                   fresh=_opt_int(res.get("fresh"), f"{where}: fresh"), iters=iters,
                   trainable=_opt_int(res.get("trainable"), f"{where}: trainable"),
                   images=_opt_int(res.get("images"), f"{where}: images"),
                   seconds=float(res["seconds"]) if isinstance(res.get("seconds"), (int, float)) else None,
                   # iterations trained along the lineage since fine_tune: the parent's plus this one's
                   lineage_iters=(parent_lineage or 0) + iters if status == "ok" and iters is not None else None)
    if results and not any(r["status"] == "pending" for r in st["records"]):  # a round is complete
        _note_round(st, settings)
    return _copy(st)


def _best_map(recs: Sequence[Mapping[str, Any]], settings: SearchSettings) -> float | None:
    """The best quality (the search's first maximised objective: :func:`quality`) of ok ``recs``."""
    maps = [quality(r.get("metrics"), settings.objective_keys) for r in recs if r["status"] == "ok"]
    maps = [v for v in maps if v is not None]
    return max(maps) if maps else None


def _note_round(st: dict, settings: SearchSettings) -> None:
    """After a complete round: did the front's best quality (the search's first maximised
    objective, e.g. mIoU or segm_mAP: :func:`quality`; kept under ``best_mAP``) improve? (the
    reignition trigger's count)"""
    p = st.setdefault("plateau", {"best_mAP": None, "stale_rounds": 0, "reignitions": 0})
    best = _best_map(_front_records(st, settings), settings)
    if best is not None and (p["best_mAP"] is None or best > p["best_mAP"]):
        p["best_mAP"], p["stale_rounds"] = best, 0
    else:
        p["stale_rounds"] += 1


def plateau(state: Mapping[str, Any]) -> bool:
    """True when the search should reignite now: ``reignition_patience`` is set, the front's best
    mAP has not improved for that many complete rounds, fewer than ``max_reignitions``
    reignitions happened, and the search is not done."""
    st, settings = _load(state)
    p = st.get("plateau") or {}
    return (settings.reignition_patience is not None and not is_done(st)
            and p.get("stale_rounds", 0) >= settings.reignition_patience
            and p.get("reignitions", 0) < settings.max_reignitions)


def add_reignited(state: Mapping[str, Any], reignited: Sequence[Mapping[str, Any]]) -> dict:
    """Record the front's reignited models (records ``{"id": original id, "desc", "metrics",
    "weights", ...}``) as new ok records, children of their originals (ops ``["reignite"]``),
    so they compete on the front from now on; the plateau count restarts. Returns a new state."""
    st, settings = _load(state)
    by_id = {r["id"]: r for r in st["records"]}
    for rr in reignited:
        orig = by_id.get(rr.get("id"))
        if orig is None or orig["status"] != "ok":
            raise SearchError(f"reignited model {rr.get('id')!r} is not an ok record of this search")
        metrics = _objective_metrics(rr.get("metrics"), settings, f"reignited model {orig['id']}")
        st["records"].append({**copy.deepcopy(orig), "id": st["next_id"], "round": st["round"], "parent": orig["id"],
                              "parent_desc": copy.deepcopy(orig["desc"]), "parent_weights": orig["weights"],
                              "ops": ["reignite"], "metrics": metrics, "weights": rr["weights"], "error": None,
                              "inherited": None, "fresh": None, "iters": None, "images": None, "seconds": None,
                              "lineage_iters": orig.get("lineage_iters"), "reignition": rr.get("reignition")})
        st["next_id"] += 1
    p = st.setdefault("plateau", {"best_mAP": None, "stale_rounds": 0, "reignitions": 0})
    p["reignitions"] += 1
    p["stale_rounds"] = 0
    best = _best_map(_front_records(st, settings), settings)
    p["best_mAP"] = best if p["best_mAP"] is None or (best is not None and best > p["best_mAP"]) else p["best_mAP"]
    log.info("%s: %d reignited model(s) joined the search (reignition %d of at most %d)", settings.algorithm,
             len(reignited), p["reignitions"], settings.max_reignitions)
    return _copy(st)


def records(state: Mapping[str, Any]) -> list[dict]:
    """Every record (seeds, pending, ok and failed candidates) in id order; a copy."""
    st, _ = _load(state)
    return sorted(st["records"], key=lambda r: r["id"])


def front(state: Mapping[str, Any]) -> list[dict]:
    """The ok records (seeds included) on the current Pareto front, in id order; a copy."""
    st, settings = _load(state)
    return sorted(_front_records(st, settings), key=lambda r: r["id"])


def pending(state: Mapping[str, Any]) -> list[dict]:
    """The proposed candidates still waiting for a result."""
    return [r for r in records(state) if r["status"] == "pending"]


def is_done(state: Mapping[str, Any]) -> bool:
    """True once ``max_sample`` candidates have been proposed and none is pending."""
    st, settings = _load(state)
    return st["proposed"] >= settings.max_sample and not any(r["status"] == "pending" for r in st["records"])
