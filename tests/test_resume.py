"""Resume after a crash: ``spnas run`` killed with SIGKILL at several points (inside fine_tune,
mid-round, between phases, during a write), then ``--resume``d, ends with exactly the records of
an uninterrupted run with the same seed, and trains no finished candidate twice."""
import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import DEMO, ROOT, make_step, run_argv, tiny_overrides

from spnas.config import load_config
from spnas.utils.errors import ConfigError, SpnasError
from spnas.utils.faults import ENV

# (fail point, what the killed process must have done, what the resumed one must say)
KILLS = [
    ("train_iter:6", "fine_tune: iteration 6 of 8, last checkpoint at 4"),
    ("candidate:1", "serial round 0: candidate 1 finished, 2 pending"),
    ("phase:1", "the first phase this process runs (serial) finished"),
    ("write:25", "the 25th atomic write of the process, between temp file and rename"),
]


def _argv(data, workdir):
    return run_argv(data, workdir, workers=1)


def _spnas(argv, failpoint=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if failpoint:
        env[ENV] = failpoint
    return subprocess.run([sys.executable, "-m", "spnas", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _records(reports):
    """Every record of every phase, without timing and file locations."""
    out = {}
    for name, ph in reports["phases"].items():
        out[name] = [(r["id"], r.get("parent"), r["status"], r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"],
                      (r.get("metrics") or {}).get("mAP"), (r.get("metrics") or {}).get("AP50"), r.get("inherited"))
                     for r in ph["records"]]
    return out


@pytest.mark.slow
def test_killed_run_resumes_with_nothing_lost(tiny_data, tiny_run, tmp_path):
    """The shared tiny run is the uninterrupted reference (2 workers; the killed one runs on 1)."""
    data, reference = tiny_data, tiny_run[1]
    dir_ = tmp_path / "killed"
    out = dir_ / "output"

    logs = []
    for n, (point, _what) in enumerate(KILLS):
        argv = _argv(data, dir_) + (["--resume"] if n else [])
        p = _spnas(argv, point)
        logs.append(p.stderr)
        assert p.returncode == -signal.SIGKILL, (point, p.returncode, p.stderr[-3000:])
        assert f"{ENV}: killing pid" in p.stderr, point
        if point.startswith("train_iter"):
            assert (out / "fine_tune" / "train_0" / "last.pth").is_file()
            assert not (out / "fine_tune" / "phase.json").exists()
        if point.startswith("candidate"):
            assert (out / "serial" / "result_1.json").is_file() and not (out / "serial" / "result_2.json").exists()
        if point.startswith("phase"):
            assert (out / "serial" / "phase.json").is_file() and not (out / "reignition" / "phase.json").exists()
        if point.startswith("write"):
            tmp_files = list(out.rglob(".*.tmp"))
            assert len(tmp_files) == 1, tmp_files  # the half-written file, never under its real name
            target = tmp_files[0].parent / tmp_files[0].name[1:].rsplit(".", 2)[0]
            if target.suffix == ".json" and target.is_file():
                json.loads(target.read_text())  # the old version, complete

    p = _spnas(_argv(data, dir_) + ["--resume"])
    logs.append(p.stderr)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = json.loads((out / "reports.json").read_text())

    # the interrupted fine_tune continued from its checkpoint, not from scratch
    assert "resumed from" in logs[1] and "at iteration 4/8" in logs[1]
    # the candidate finished before the kill was not trained again
    assert "1 finished before the interruption; its result is reused" in logs[2]
    assert "serial: the round of candidates [1, 2] was interrupted; continuing it" in logs[2]
    assert "phase fine_tune (fine_tune): finished before the interruption" in logs[3]
    assert resumed["resumes"] == len(KILLS)

    assert _records(resumed) == _records(reference)
    for phase in ("serial", "parallel"):
        ids = [r["id"] for r in resumed["phases"][phase]["records"]]
        assert ids == sorted(set(ids)) == list(range(len(ids)))  # no duplicates, no gaps
        assert resumed["phases"][phase]["front"] == reference["phases"][phase]["front"]
    assert resumed["best"]["id"] == reference["best"]["id"]
    measured = lambda m: {k: v for k, v in m.items() if k != "backbone_latency"}  # noqa: E731 (wall-clock timing)
    assert measured(resumed["best"]["metrics"]) == measured(reference["best"]["metrics"])
    assert not list(out.rglob("train_*"))


_POD_FINE_TUNE = """
import json, logging, sys
from spnas.orchestration import pods
logging.basicConfig(level=logging.INFO)
config, data, run, model = sys.argv[1:5]
print(json.dumps(pods.fine_tune(open(config).read(), "fine_tune", data, run, model)))
"""


@pytest.mark.slow
def test_killed_training_pod_resumes_from_its_uploaded_checkpoint(tiny_data, tmp_path):
    """A training pod (fine_tune's pod function) SIGKILLed mid-training and run again with the
    same inputs, as Argo retries it, resumes from the checkpoint it copied under the run's prefix
    and returns the record an uninterrupted pod returns; the copies are gone afterwards."""
    import yaml

    from spnas.config import apply_overrides
    raw = apply_overrides(yaml.safe_load(DEMO.read_text()), tiny_overrides(tiny_data) + ["fine_tune.trainer.epochs=2"])
    config = tmp_path / "tiny.yml"
    config.write_text(yaml.safe_dump(raw))

    def pod(run, failpoint=None):
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if failpoint:
            env[ENV] = failpoint
        return subprocess.run([sys.executable, "-c", _POD_FINE_TUNE, str(config), str(tiny_data), str(run),
                               str(tmp_path / f"{run.name}-model.pth")], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    plain = pod(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    killed = pod(tmp_path / "retried", "train_iter:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    kept = tmp_path / "retried" / "fine_tune" / "checkpoints" / "0" / "train_0" / "last.pth"
    assert kept.is_file()  # copied at the end of epoch 1 (iteration 4 of 8)
    again = pod(tmp_path / "retried")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "restored the checkpoints of an earlier attempt" in again.stderr
    assert "at iteration 4/8" in again.stderr
    a, b = json.loads(plain.stdout.splitlines()[-1]), json.loads(again.stdout.splitlines()[-1])
    measured = lambda m: {k: v for k, v in m.items() if k != "backbone_latency"}  # noqa: E731 (wall-clock timing)
    assert measured(b["metrics"]) == measured(a["metrics"]) and b["iters"] == a["iters"] == 8
    assert b["images"] == a["images"] and b["lineage_iters"] == a["lineage_iters"]
    import torch
    wa, wb = (torch.load(tmp_path / f"{n}-model.pth", map_location="cpu") for n in ("plain", "retried"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / "retried" / "fine_tune" / "checkpoints").exists()


def test_workdir_with_a_run_needs_resume_and_the_same_config(tiny_data, tmp_path, monkeypatch):
    from spnas.orchestration import local as run_mod
    cfg = load_config(DEMO, workdir=tmp_path, overrides=tiny_overrides(tiny_data))
    calls = []
    monkeypatch.setattr(run_mod.Runner, "run", lambda self: calls.append(self.resume) or {})
    run_mod.run(cfg)  # claims the workdir
    with pytest.raises(SpnasError, match="already holds a run: pass --resume to continue it"):
        run_mod.run(cfg)
    run_mod.run(cfg, resume=True)
    assert json.loads((tmp_path / "output" / "run.json").read_text())["resumes"] == 1
    other = load_config(DEMO, workdir=tmp_path, overrides=tiny_overrides(tiny_data) + ["serial.search_algorithm.max_sample=3"])
    with pytest.raises(ConfigError, match=r"differs from the interrupted run's at steps\[1\]\.search\.max_sample: 2 then, 3 now"):
        run_mod.run(other, resume=True)
    # nothing to resume is not an error
    run_mod.run(load_config(DEMO, workdir=tmp_path / "new", overrides=tiny_overrides(tiny_data)), resume=True)
    assert calls == [False, True, True]


# ----------------------------------------------------------------------------- candidate faults

TINY = {"num_classes": 4, "backbone": {"code": "1-2-2-2", "block": "basic", "base_channels": 8},
        "neck": {"out_channels": 32}, "min_size": 96, "max_size": 96}


@pytest.fixture(scope="module")
def parent(tiny_data, tmp_path_factory):
    """A trained-for-0-iterations parent (converted and evaluated only): desc and weights."""
    from spnas.data.source import CocoSource
    from spnas.orchestration import phases
    out = tmp_path_factory.mktemp("parent")
    res = phases.fine_tune(make_step("fine_tune", TINY, epochs=0), CocoSource(str(tiny_data)), out)
    return {"desc": res["record"]["desc"], "weights": res["model"]}


def _candidate(parent, cid=1):
    child = json.loads(json.dumps(parent["desc"]))
    child["backbone"]["code"] = "1-2-2-21"  # add a block to the last stage (expand)
    return {"id": cid, "desc": child, "parent_desc": parent["desc"], "parent_weights": parent["weights"]}


@pytest.mark.parametrize("fault, error", [
    ("diverge", r"NonFiniteLossError: non-finite loss at step \d+: \{'loss_classifier'"),
    ("oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    ("raise", "ValueError: something else broke"),
    ("bad parent", "CheckpointError: weights file '.*nowhere.pth' does not exist"),
])
def test_a_failing_candidate_is_data_not_an_exception(parent, tiny_data, tmp_path, monkeypatch, fault, error):
    import re

    import torch

    from spnas.data.source import CocoSource
    from spnas.orchestration import phases
    trainer = {"epochs": 1, "batch_size": 4}
    cand = _candidate(parent)
    if fault == "diverge":
        trainer.update(lr=1e12, clip_grad_norm=0.0, warmup_iters=0)
    elif fault == "oom":
        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        monkeypatch.setattr(phases, "train_architecture", oom)
    elif fault == "raise":
        def broken(*a, **k):
            raise ValueError("something else broke")
        monkeypatch.setattr(phases, "train_architecture", broken)
    else:
        cand["parent_weights"] = str(tmp_path / "nowhere.pth")
    step, source = make_step("serial", **trainer), CocoSource(str(tiny_data))
    r = phases.train_candidate(cand, step, source, tmp_path)
    assert r["status"] == "failed" and r["weights"] is None and r["metrics"] is None
    assert re.match(error, r["error"]), r["error"]
    assert "Traceback" in r["traceback"]
    saved = json.loads((tmp_path / "result_1.json").read_text())
    assert saved["status"] == "failed" and saved["error"] == r["error"]
    # resuming reuses the recorded failure: the same record, nothing trained again
    monkeypatch.setattr(phases, "train_architecture", lambda *a, **k: pytest.fail("trained again"))
    assert phases.train_candidate(cand, step, source, tmp_path, resume=True) == saved
