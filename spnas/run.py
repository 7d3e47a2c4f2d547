"""``spnas run``: every phase of a config on one machine.

Rounds of a search train up to ``workers`` candidates at once: one process per candidate, one
GPU each when GPUs exist, otherwise CPU threads shared out. The same phase functions serve the
Kubeflow components (:mod:`spnas.phases`).

Resume: ``output/run.json`` fingerprints the config; each finished phase leaves
``output/<step>/phase.json``; a search round is open while its candidates are pending in
``state.json``; each finished candidate leaves ``result_<id>.json``. ``resume=True`` skips what
finished, re-trains nothing that has a result and continues an interrupted training from its
last checkpoint, so the records equal those of an uninterrupted run with the same seed.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from . import phases
from .config import RunConfig, StepConfig
from .errors import ConfigError, SpnasError
from .faults import failpoint
from .io import atomic_write_json, read_json

log = logging.getLogger(__name__)


def _say(msg: str) -> None:
    log.info(msg)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def _train_one(args: tuple) -> dict:
    candidate, kwargs = args
    return phases.train_candidate(candidate, **kwargs)


def _devices(config: RunConfig, workers: int) -> list[Optional[str]]:
    if config.device == "cpu" or not torch.cuda.is_available():
        return [config.device or "cpu"] * workers
    n = torch.cuda.device_count()
    return [f"cuda:{i % n}" for i in range(workers)]


class Runner:
    """Runs the steps of ``config`` in order and keeps ``reports.json`` current."""

    def __init__(self, config: RunConfig, workers: Optional[int] = None, progress: bool = True,
                 publish: Optional[str] = None, resume: bool = False) -> None:
        config = _fetch_data(config)
        self.config = config
        self.publish = publish
        self.resume = resume
        self.workers = workers or config.workers
        self.progress = progress
        self.out = Path(config.workdir) / "output"
        self.reports: dict[str, Any] = {"config": config.source, "workdir": config.workdir, "seed": config.seed,
                                        "phases": {}}
        self.timing: dict[str, float] = {}
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
        best = max((r for r in last if r.get("status") == "ok"), key=lambda r: r["metrics"]["mAP"] or 0, default=None)
        self.reports["best"] = best
        self.reports["seconds"] = round(time.perf_counter() - t0, 2)
        self._save_reports()
        if self.publish:
            from .storage import upload
            keys = upload(self.out, self.publish)
            self.reports["published"] = {"uri": self.publish, "objects": len(keys)}
            _say(f"published {len(keys)} files of {self.out} to {self.publish}")
        return self.reports

    # -- phases -----------------------------------------------------------------------
    def _data(self, step: StepConfig) -> dict[str, Any]:
        if not step.dataset.data_root:
            raise SpnasError(f"step {step.name}: dataset.common.data_root is not set")
        return {"img_prefix": step.dataset.img_prefix, "ann_prefix": step.dataset.ann_prefix}

    def _fine_tune(self, step: StepConfig, _prev: list[dict]) -> list[dict]:
        desc = dict(step.model_desc)
        if step.codes:
            desc.setdefault("backbone", {})
            desc["backbone"] = {**desc["backbone"], "code": step.codes[0]}
        res = phases.fine_tune(step.dataset.data_root, self.out / step.name, desc, step.trainer,
                               pretrained=step.pretrained_model_file, convert_pretrained=step.convert_pretrained,
                               device=self.config.device, progress=self.progress, resume=self.resume,
                               **self._data(step))
        rec = {**res["record"], "phase": step.name}
        self.reports["phases"][step.name] = {"role": step.role, "records": [rec]}
        _say(f"fine_tune: mAP {rec['metrics']['mAP']:.2f}, {rec['params']:,} params -> {res['model']}")
        return [rec]

    def _search(self, step: StepConfig, seeds: list[dict]) -> list[dict]:
        out = self.out / step.name
        settings = dict(step.search)
        if self.resume and (out / "state.json").is_file():
            state_path = str(out / "state.json")
            _say(f"{step.name}: continuing the search state {state_path}")
        else:
            state_path = phases.search_init(out, settings, [{"desc": s["desc"], "metrics": s["metrics"],
                                                             "weights": s["weights"]} for s in seeds],
                                            codes=step.codes if step.role == "parallel" else ())
        if step.role == "parallel" and step.codes:
            log.info("parallel search starts from the neck codes of the search space: %s", list(step.codes))
        devices = _devices(self.config, self.workers)
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        kwargs = {"data_root": step.dataset.data_root, "out_dir": str(out), "trainer": phases.trainer_dict(step.trainer),
                  "freeze_swap_keys": step.freeze_swap_keys, "resume": self.resume, **self._data(step)}
        pool = None
        if self.workers > 1:
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(threads,))
        try:
            while True:
                candidates = phases.search_pending(state_path)
                if candidates:
                    _say(f"{step.name}: the round of candidates {[c['id'] for c in candidates]} was interrupted; "
                         "continuing it")
                else:
                    candidates = phases.search_propose(state_path)
                if not candidates:
                    break
                rnd = candidates[0]["round"]
                _say(f"{step.name} round {rnd}: training {len(candidates)} candidate(s) "
                     f"({', '.join(str(c['id']) for c in candidates)}) on {min(self.workers, len(candidates))} worker(s)")
                jobs = [(c, {**kwargs, "device": devices[i % len(devices)], "progress": self.progress and pool is None})
                        for i, c in enumerate(candidates)]
                results = list(pool.map(_train_one, jobs)) if pool else [_train_one(j) for j in jobs]
                for c, r in zip(candidates, results):
                    if r["status"] == "ok":
                        _say(f"  candidate {c['id']} {c['desc']['backbone']['code']} {c['desc']['neck']['code']} "
                             f"(from {c['parent']}, {'+'.join(c['ops'])}): mAP {r['metrics']['mAP']:.2f}, "
                             f"{c['params']:,} params, inherited {r['inherited']}/{r['inherited'] + r['fresh']}")
                    else:
                        _say(f"  candidate {c['id']} FAILED: {r['error']}")
                phases.check_round(step.name, rnd, results)
                summary = phases.search_update(state_path, results)
                _say(f"{step.name} round {rnd}: Pareto front {summary['front']}")
                if summary["done"]:
                    break
        finally:
            if pool:
                pool.shutdown()
        paths = phases.search_report(state_path, out, f"{step.name} ({step.search['algorithm']})")
        from .search import front, records
        state = read_json(state_path)
        n_codes = max(1, len(step.codes)) if step.role == "parallel" else 1
        origins = [{"seed": i, "from": f"{s.get('phase', 'previous step')}/{s['id']}"}
                   for i, s in enumerate(x for x in seeds for _ in range(n_codes))]
        self.reports["phases"][step.name] = {"role": step.role, "records": records(state), "seeds": origins,
                                             "front": [r["id"] for r in front(state)], **paths}
        _say(f"{step.name}: {len(records(state)) - len(seeds)} candidates; front {self.reports['phases'][step.name]['front']}; "
             f"plot {paths['plot']}")
        return [{**r, "phase": step.name} for r in front(state)]

    _serial = _search
    _parallel = _search

    def _reignition(self, step: StepConfig, front: list[dict]) -> list[dict]:
        chosen = sorted(front, key=lambda r: -(r["metrics"]["mAP"] or 0))
        if step.top_k:
            chosen = chosen[:step.top_k]
        if step.top_k == 0:
            _say("reignition disabled (top_k 0): passing the serial front on")
            self.reports["phases"][step.name] = {"role": step.role, "records": []}
            return front
        det_root = self.config.step("fine_tune").dataset.data_root if self.config.step("fine_tune") else None
        det_root = det_root or step.dataset.data_root
        data = step.dataset.data_root if step.dataset.kind == "imagenet" else None
        done = phases.reignition(chosen, self.out / step.name, det_root, data=data, epochs=step.trainer.epochs,
                                 batch_size=max(step.trainer.batch_size, 16), lr=step.trainer.lr,
                                 image_size=step.image_size, seed=self.config.seed, device=self.config.device,
                                 progress=self.progress, resume=self.resume)
        done = [{**r, "phase": step.name} for r in done]
        self.reports["phases"][step.name] = {"role": step.role, "records": done}
        for r in done:
            _say(f"reignition of {r['id']}: top-1 {r['reignition']['top1_train']:.1f}% on {r['reignition']['source']}, "
                 f"detector mAP {r['metrics']['mAP']:.2f}")
        return done

    def _full_train(self, step: StepConfig, front: list[dict]) -> list[dict]:
        chosen = sorted(front, key=lambda r: -(r["metrics"]["mAP"] or 0))[:step.top_k or 1]
        done = phases.full_train(chosen, step.dataset.data_root, self.out / step.name, step.trainer,
                                 device=self.config.device, progress=self.progress, resume=self.resume,
                                 **self._data(step))
        self.reports["phases"][step.name] = {"role": step.role, "records": done}
        return done


def fingerprint(config: RunConfig) -> dict[str, Any]:
    """What must not change between an interrupted run and its resume: the seed and every step
    setting (not the workdir, the worker count or the device), as plain JSON."""
    import dataclasses
    import json
    return json.loads(json.dumps({"seed": config.seed, "steps": [dataclasses.asdict(s) for s in config.steps]},
                                 default=str))


def _first_difference(old: Any, new: Any, path: str) -> Optional[tuple[str, Any, Any]]:
    """``(key path, old, new)`` of the first difference of two JSON values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            d = _first_difference(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            d = _first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if old == new else (path, old, new)


def _fetch_data(config: RunConfig) -> RunConfig:
    """Data sets named by ``s3://``/``minio://`` URIs are fetched into the local cache (once:
    the cache is keyed by ETag) and the steps point at the local copies."""
    import dataclasses
    from .storage import is_uri, local_path
    steps = []
    for s in config.steps:
        if s.dataset.data_root and is_uri(s.dataset.data_root):
            local = str(local_path(s.dataset.data_root))
            log.info("%s: data %s -> %s", s.name, s.dataset.data_root, local)
            s = dataclasses.replace(s, dataset=dataclasses.replace(s.dataset, data_root=local))
        steps.append(s)
    return dataclasses.replace(config, steps=tuple(steps))


def run(config: RunConfig, workers: Optional[int] = None, progress: bool = True,
        publish: Optional[str] = None, resume: bool = False) -> dict[str, Any]:
    """Run every step of ``config``; returns the reports (also in ``output/reports.json``).
    ``publish``: an ``s3://``/``minio://`` prefix that receives the whole output folder.
    ``resume``: continue the interrupted run in the workdir (see the module docstring); without
    it a workdir that already holds a run is refused."""
    return Runner(config, workers, progress, publish, resume).run()
