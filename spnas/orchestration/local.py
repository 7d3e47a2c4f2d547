"""``spnas run``: every phase of a config on one machine.

Rounds of a search train up to ``workers`` candidates at once: one process per candidate, one
GPU each when GPUs exist, otherwise CPU threads shared out. The trainings of one model
(fine_tune, reignition, the full train, the equal-budget controls) run data-parallel over ``nproc``
processes (one per GPU; :mod:`spnas.training.distributed`). The same phase functions and the same
step-to-phase mapping (:mod:`.steps`) serve the Kubeflow pod functions (:mod:`.pods`).

Resume: ``output/run.json`` fingerprints the config; each finished phase leaves
``output/<step>/phase.json``; a search round is open while its candidates are pending in
``state.json``; each finished candidate leaves ``result_<id>.json``. ``resume=True`` skips what
finished, re-trains nothing that has a result and continues an interrupted training from its
last checkpoint, so the records equal those of an uninterrupted run with the same seed.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..config.types import RunConfig, StepConfig
from ..search import front, records
from ..search.settings import quality_key
from ..storage import is_uri, local_path, upload
from ..utils.errors import ConfigError, SpnasError
from ..utils.faults import failpoint
from ..utils.fileio import atomic_write_json, read_json
from . import phases, rounds, steps
from .reports import control_summary, phase_compute, run_compute

log = logging.getLogger(__name__)


def _q(metrics: dict[str, Any], objectives: Sequence[str] = ()) -> str:
    """``"mAP 61.25"`` (a semantic model's ``"mIoU 55.10"``; the run's quality by ``objectives``:
    :func:`quality_key`) of a metrics dict."""
    q = quality_key(metrics, objectives)
    return f"{q} {metrics[q]:.2f}"


def _say(msg: str) -> None:
    log.info(msg)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def _train_one(args: tuple) -> dict:
    candidate, step, data, out, kwargs = args
    return phases.train_candidate(candidate, step, data, out, **kwargs)


def _devices(config: RunConfig, workers: int) -> list[str | None]:
    if config.device == "cpu" or not torch.cuda.is_available():
        return [config.device or "cpu"] * workers
    n = torch.cuda.device_count()
    return [f"cuda:{i % n}" for i in range(workers)]


class Runner:
    """Runs the steps of ``config`` in order and keeps ``reports.json`` current."""

    def __init__(self, config: RunConfig, workers: int | None = None, progress: bool = True,
                 publish: str | None = None, resume: bool = False, nproc: int = 1) -> None:
        from ..training.distributed import check_devices, check_nproc, in_launch
        self.nproc = check_nproc(nproc)
        if in_launch():
            raise SpnasError("spnas run is not a rank of a torchrun launch: run it once, with --nproc N, and it "
                             "launches the data-parallel trainings itself")
        from ..training.device import device_of
        check_devices(nproc, device_of(config.device))
        config = _fetch_data(config)
        self.config = config
        self.objectives = steps.objective_keys(config)  # the run's quality is the first maximised one
        self.publish = publish
        self.resume = resume
        self.workers = workers or config.workers
        self.progress = progress
        self.out = Path(config.workdir) / "output"
        self.reports: dict[str, Any] = {"config": config.source, "workdir": config.workdir, "seed": config.seed,
                                        "phases": {}}
        self.timing: dict[str, float] = {}
        ft, serial = config.step("fine_tune"), config.step("serial")
        if ft is not None and serial is not None:  # a code the search cannot start from fails now, not hours in
            phases.check_seed_codes(serial, [steps.seed_desc(ft)])
        self._claim_workdir()

    def _claim_workdir(self) -> None:
        """Write ``run.json``; refuse a workdir that holds another run, or (resuming) a run
        made from another config, naming the first setting that differs."""
        run_file = self.out / "run.json"
        fp = fingerprint(self.config)
        if run_file.is_file() or (self.out / "reports.json").is_file():
            if not self.resume:
                raise SpnasError(f"{self.out} already holds a run: pass --resume to continue it, or choose "
                                 f"another --workdir (or delete {self.out})")
            if not run_file.is_file():
                raise SpnasError(f"{self.out} holds a run without run.json (made by an older spnas): it cannot be "
                                 "resumed; choose another --workdir")
            old = read_json(run_file, "run file")
            diff = _first_difference(old.get("fingerprint"), fp, "")
            if diff is not None:
                raise ConfigError(f"cannot resume {self.out}: the config differs from the interrupted run's "
                                  f"at {diff[0] or '<top>'}: {diff[1]!r} then, {diff[2]!r} now")
            self.reports["resumes"] = int(old.get("resumes", 0)) + 1
            atomic_write_json(run_file, {**old, "resumes": self.reports["resumes"]})
            _say(f"resuming the run in {self.out} (resume {self.reports['resumes']})")
            return
        if self.resume:
            _say(f"nothing to resume in {self.out}: starting a new run")
        atomic_write_json(run_file, {"fingerprint": fp, "resumes": 0})

    def _save_reports(self) -> None:
        atomic_write_json(self.out / "reports.json", self.reports)

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        last: list[dict] = []
        for step in self.config.steps:
            done_file = self.out / step.name / "phase.json"
            if self.resume and done_file.is_file():
                saved = read_json(done_file, "phase file")
                self.reports["phases"][step.name] = saved["report"]
                self.timing[step.name] = saved["report"].get("seconds", 0.0)
                last = saved["result"]
                _say(f"== phase {step.role} ({step.name}): finished before the interruption, "
                     f"{len(last)} record(s) carried on ==")
                continue
            _say(f"== phase {step.role} ({step.name}) ==")
            ts = time.perf_counter()
            last = getattr(self, f"_{step.role}")(step, last)
            self.timing[step.name] = round(time.perf_counter() - ts, 2)
            self.reports["phases"][step.name]["seconds"] = self.timing[step.name]
            atomic_write_json(done_file, {"report": self.reports["phases"][step.name], "result": last})
            self._save_reports()
            failpoint("phase", step.name)
        self.reports["best"] = steps.best_of(last, self.objectives)
        summary = self.reports.get("control")
        if summary and summary["winner"] == "control":
            self.reports["best"] = self.reports["phases"][self.config.steps[-1].name]["control"]
            _say(f"the equal-budget control wins ({summary['reason']}): it is the run's result")
        self.reports["seconds"] = round(time.perf_counter() - t0, 2)
        self.reports["compute"] = run_compute(self.reports["phases"], self.reports["seconds"])
        self._save_reports()
        if self.publish:
            keys = upload(self.out, self.publish)
            self.reports["published"] = {"uri": self.publish, "objects": len(keys)}
            _say(f"published {len(keys)} files of {self.out} to {self.publish}")
        return self.reports

    # -- phases -----------------------------------------------------------------------
    def _opts(self) -> dict[str, Any]:
        """The keywords of the trainings of one model (data-parallel over ``nproc``)."""
        return {"device": self.config.device, "progress": self.progress, "resume": self.resume, "nproc": self.nproc}

    def _fine_tune(self, step: StepConfig, _prev: list[dict]) -> list[dict]:
        res = phases.fine_tune(step, steps.data_source(step), self.out / step.name, **self._opts())
        rec = {**res["record"], "phase": step.name}
        self.reports["phases"][step.name] = {"role": step.role, "records": [rec]}
        _say(f"fine_tune: {_q(rec['metrics'], self.objectives)}, {rec['params']:,} params -> {res['model']}")
        return [rec]

    def _search(self, step: StepConfig, seeds: list[dict]) -> list[dict]:
        out = self.out / step.name
        if self.resume and (out / rounds.STATE_FILE).is_file():
            state_path = str(out / rounds.STATE_FILE)
            _say(f"{step.name}: continuing the search state {state_path}")
        else:
            state_path = phases.search_init(step, steps.search_seeds(seeds), out, data=steps.data_source(step),
                                            device=self.config.device)
        devices = _devices(self.config, self.workers)
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        data = steps.data_source(step)
        pool = None
        if self.workers > 1:
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(threads,))
        try:
            while True:
                candidates = rounds.search_pending(state_path)
                if candidates:
                    _say(f"{step.name}: the round of candidates {[c['id'] for c in candidates]} was interrupted; "
                         "continuing it")
                else:
                    if step.role == "serial" and rounds.search_plateau(state_path):  # checked here, so a resume redoes it
                        self._reignite_front(step, state_path, out)
                    candidates = rounds.search_propose(state_path)
                if not candidates:
                    break
                rnd = candidates[0]["round"]
                _say(f"{step.name} round {rnd}: training {len(candidates)} candidate(s) "
                     f"({', '.join(str(c['id']) for c in candidates)}) on {min(self.workers, len(candidates))} worker(s)")
                jobs = [(c, step, data, str(out), {"device": devices[i % len(devices)], "resume": self.resume,
                                                   "progress": self.progress and pool is None})
                        for i, c in enumerate(candidates)]
                results = list(pool.map(_train_one, jobs)) if pool else [_train_one(j) for j in jobs]
                for c, r in zip(candidates, results, strict=False):
                    if r["status"] == "ok":
                        _say(f"  candidate {c['id']} {c['desc']['backbone']['code']} {c['desc']['neck']['code']} "
                             f"(from {c['parent']}, {'+'.join(c['ops'])}): {_q(r['metrics'], self.objectives)}, "
                             f"{c['params']:,} params, inherited {r['inherited']}/{r['inherited'] + r['fresh']}, "
                             f"trained {r.get('trainable') or 0:,} parameters")
                    else:
                        _say(f"  candidate {c['id']} FAILED: {r['error']}")
                summary = rounds.search_update(state_path, step.name, results)
                _say(f"{step.name} round {rnd}: Pareto front {summary['front']}")
                if summary["done"]:
                    break
        finally:
            if pool:
                pool.shutdown()
        state = read_json(state_path)
        ctrl = self._phase_control(step, records(state), data, out) if self.config.control else None
        paths = rounds.search_report(state_path, out, f"{step.name} ({step.search['algorithm']})", control=ctrl)
        n_codes = max(1, len(steps.seed_codes(step)[1]))
        origins = [{"seed": i, "from": f"{s.get('phase', 'previous step')}/{s['id']}"}
                   for i, s in enumerate(x for x in seeds for _ in range(n_codes))]
        recs = records(state)
        self.reports["phases"][step.name] = {"role": step.role, "records": recs, "seeds": origins,
                                             "front": [r["id"] for r in front(state)], **paths,
                                             "control": ctrl, "compute": phase_compute(recs, ctrl)}
        _say(f"{step.name}: {len(recs) - len(origins)} candidates; front {self.reports['phases'][step.name]['front']}; "
             f"plot {paths['plot']}")
        return [{**r, "phase": step.name} for r in front(state)]

    _serial = _search
    _parallel = _search

    def _reignition(self, step: StepConfig, front: list[dict]) -> list[dict]:
        chosen = steps.reignition_choice(step, front, self.objectives)
        if chosen is None:
            _say("reignition disabled (top_k 0): passing the serial front on")
            self.reports["phases"][step.name] = {"role": step.role, "records": []}
            return front
        done = phases.reignition(chosen, step, self.out / step.name,
                                 detection=steps.detection_source(self.config, step), seed=self.config.seed,
                                 objectives=self.objectives, **self._opts())
        done = [{**r, "phase": step.name} for r in done]
        self.reports["phases"][step.name] = {"role": step.role, "records": done}
        for r in done:
            _say(f"reignition of {r['id']}: top-1 {r['reignition']['top1_train']:.1f}% on {r['reignition']['source']}, "
                 f"model {_q(r['metrics'], self.objectives)}")
        return done

    def _full_train(self, step: StepConfig, front: list[dict]) -> list[dict]:
        data = steps.data_source(step)
        done = phases.full_train(steps.full_train_choice(step, front, self.objectives), step, data, self.out / step.name,
                                 **self._opts())
        self.reports["phases"][step.name] = {"role": step.role, "records": done}
        final, ft = steps.best_of(done, self.objectives), self.reports["phases"].get(self.config.steps[0].name)
        if self.config.control and final is not None and ft and ft["role"] == "fine_tune":
            seed = ft["records"][0]
            _say(f"{step.name}: equal-budget control: the seed {seed['desc']['backbone']['code']} trained "
                 f"{final['lineage_iters']} iterations (the final model's lineage since fine_tune)")
            ctrl = phases.control("control", steps.seed_architecture(seed), seed["weights"],
                                  [steps.final_control_trainer(step, final["lineage_iters"])], data, self.out / step.name,
                                  **self._opts())
            size, batch = int(final["desc"].get("max_size", 800)), step.trainer.batch_size
            final, ctrl = (phases.measure_costs(r, size, batch, self.config.device) for r in (final, ctrl))
            phase_ctrls = {name: ph["control"] for name, ph in self.reports["phases"].items() if ph.get("control")}
            summary = control_summary(final, ctrl, phase_ctrls, self.objectives,
                                      {name: ph["records"] for name, ph in self.reports["phases"].items()})
            atomic_write_json(self.out / "control.json", summary)
            self.reports["phases"][step.name].update(control=ctrl, compute=phase_compute(done, ctrl))
            self.reports["control"] = summary
            q = summary["quality"]
            _say(f"searched {summary['searched'][q]:.2f} {q} vs control {summary['control'][q]:.2f} "
                 f"(delta {summary['delta_' + q]:+.2f}): {summary['winner']} wins, {summary['reason']}")
        return done

    def _reignite_front(self, step: StepConfig, state_path: str, out: Path) -> None:
        """The paper's trigger: the serial front stopped improving, so its backbones are
        reignited (the config's reignition step's settings) and rejoin the search."""
        state = read_json(state_path, "search state")
        k = state["plateau"]["reignitions"]
        rstep = steps.inner_reignition_step(self.config, step)
        chosen = steps.reignition_choice(rstep, front(state), self.objectives) or front(state)
        _say(f"{step.name}: the front's best quality has not improved for {state['plateau']['stale_rounds']} round(s): "
             f"reignition {k + 1} of at most {state['settings']['max_reignitions']} ({[r['id'] for r in chosen]})")
        done = phases.reignition(chosen, rstep, out / f"reignition_{k}", detection=steps.detection_source(self.config, step),
                                 seed=self.config.seed, objectives=self.objectives, **self._opts())
        rounds.search_add_reignited(state_path, done)

    def _phase_control(self, step: StepConfig, recs: list[dict], data: Any, out: Path) -> dict | None:
        """The search phase's equal-budget control (see :func:`steps.phase_control_plan`)."""
        plan = steps.phase_control_plan(recs, self.objectives)
        if plan is None:
            return None
        seed, best = plan["seed"], plan["best"]
        _say(f"{step.name}: equal-budget control: seed {seed['id']} trained {plan['generations']} more time(s) with "
             f"the step's schedule, as best candidate {best['id']} was ({plan['iters']} iterations)")
        ctrl = phases.control("control", seed["desc"], seed["weights"], [step.trainer] * plan["generations"], data, out,
                              base_lineage=seed.get("lineage_iters") or 0, **self._opts())
        ctrl.update(best=best["id"], seed=seed["id"], planned_iters=plan["iters"])
        q = quality_key(best["metrics"], self.objectives)
        _say(f"{step.name}: best candidate {best['id']} {q} {best['metrics'][q]:.2f} vs control "
             f"{ctrl['metrics'][q]:.2f} (delta {best['metrics'][q] - ctrl['metrics'][q]:+.2f})")
        return ctrl


def fingerprint(config: RunConfig) -> dict[str, Any]:
    """What must not change between an interrupted run and its resume: the seed and every step
    setting (not the workdir, the worker count or the device), as plain JSON."""
    return json.loads(json.dumps({"seed": config.seed, "steps": [dataclasses.asdict(s) for s in config.steps]},
                                 default=str))


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    """``(key path, old, new)`` of the first difference of two JSON values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            d = _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            d = _first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if old == new else (path, old, new)


def _fetch_data(config: RunConfig) -> RunConfig:
    """Data sets named by ``s3://``/``minio://`` URIs are fetched into the local cache (once:
    the cache is keyed by ETag) and the steps point at the local copies."""
    fetched = []
    for s in config.steps:
        if s.dataset.data_root and is_uri(s.dataset.data_root):
            local = str(local_path(s.dataset.data_root))
            log.info("%s: data %s -> %s", s.name, s.dataset.data_root, local)
            s = dataclasses.replace(s, dataset=dataclasses.replace(s.dataset, data_root=local))
        fetched.append(s)
    return dataclasses.replace(config, steps=tuple(fetched))


def run(config: RunConfig, workers: int | None = None, progress: bool = True,
        publish: str | None = None, resume: bool = False, nproc: int = 1) -> dict[str, Any]:
    """Run every step of ``config``; returns the reports (also in ``output/reports.json``).
    ``publish``: an ``s3://``/``minio://`` prefix that receives the whole output folder.
    ``resume``: continue the interrupted run in the workdir (see the module docstring); without
    it a workdir that already holds a run is refused. ``nproc``: processes of each training of
    one model (fine_tune, reignition, full train, controls), data-parallel; candidates train one
    per worker."""
    return Runner(config, workers, progress, publish, resume, nproc).run()
