"""Shared test helpers. In CI (CI=true) a skipped test fails the run: nothing is skipped silently."""
from __future__ import annotations

import os
import tempfile

import pytest
from helpers import randomize_norms
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

# one torch thread in every test process and in every process it starts (kfp.local tasks,
# killed and resumed runs, `spnas run` workers), with or without pytest-xdist: runs compared with
# each other reduce their sums in the same order (on some CPUs oneDNN's kernels give different
# low bits at 1 and 2 threads, enough to move a tiny run's mAP in the 4th digit); `make test`'s
# two workers on two cores are not oversubscribed either
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

# no example database, and hypothesis' own caches in a temporary folder: tests write nothing
# into the source tree (and CI is reproducible)
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="spnas-hypothesis-"))
settings.register_profile("spnas", database=None)
settings.load_profile("spnas")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """16 train + 6 val demo scenes of 96 px: the data of every tiny run."""
    from helpers import demo
    return demo(tmp_path_factory.mktemp("tiny-data"), train=16, val=6, size=96)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """One ``spnas run`` of the shared tiny config on 2 workers, made once for the whole test run
    (under pytest-xdist the first worker makes it in the folder the workers share, the others
    wait for it): the reference that the run, pipeline and resume tests compare against.
    Returns ``(workdir, reports)``."""
    import json

    from filelock import FileLock
    from helpers import run_argv

    from spnas.cli.main import main
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    workdir, data = shared / "tiny-run", shared / "tiny-run-data"
    with FileLock(str(shared / "tiny-run.lock")):
        if not (workdir / "output" / "reports.json").is_file():
            from helpers import demo
            demo(data, train=16, val=6, size=96)  # the run's own copy: same scenes as tiny_data
            assert main(run_argv(data, workdir, workers=2)) == 0
    return workdir, json.loads((workdir / "output" / "reports.json").read_text())


@pytest.fixture(scope="session")
def mask_export(tiny_data, tmp_path_factory):
    """``(export folder, export.json, the PyTorch model)`` of a random-weight Mask R-CNN
    (:data:`helpers.MASK_RCNN`: class scores and mask logits spread so that it detects on the tiny
    data set's val scenes with masks of 3-94 % of their boxes, BN statistics randomised),
    exported behind the gate as ``masks``: shared by the export and serving tests of masks."""
    from helpers import MASK_RCNN

    from spnas.data.source import CocoSource
    from spnas.export.bundle import export_model
    from spnas.models.detector import build_detector
    tmp = tmp_path_factory.mktemp("mask-export")
    torch.manual_seed(3)
    model = randomize_norms(build_detector(MASK_RCNN), 5).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.5)
        model.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.0)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.normal_(0, 0.3)
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.normal_(0, 0.3)
    torch.save(model.state_dict(), tmp / "w.pth")
    info = export_model(MASK_RCNN, tmp / "w.pth", CocoSource(str(tiny_data)), tmp / "out", name="masks")
    return tmp / "out", info, model


@pytest.fixture
def rand_norms():
    return randomize_norms


_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") and _skipped and session.exitstatus == 0:
        session.exitstatus = 1
        print(f"\nCI: {len(_skipped)} test(s) were skipped; every test must run in CI: {_skipped}")
