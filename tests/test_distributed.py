"""Data-parallel training (torch.distributed, DDP) on CPU with 2 gloo processes.

The launches (marked slow) run torchrun's engine, ``torch.distributed.run``, as the library
does; the rest are unit checks of the pieces (samplers, sharding, call files, refusals)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import demo

from spnas.cli.main import main as cli
from spnas.data.coco import batches_per_epoch, load_split, make_loader
from spnas.data.source import CocoSource
from spnas.models.desc import normalize_desc
from spnas.models.detector import build_detector
from spnas.training import distributed, launch
from spnas.training.engine import restore, save, setup
from spnas.training.evaluation import eval_batches, predict
from spnas.training.schedule import TrainConfig
from spnas.utils.errors import CheckpointError, ConfigError, SpnasError

WORKER = Path(__file__).parent / "ddp_worker.py"
TINY = {"backbone": {"code": "1-1-1-1", "block": "basic", "base_channels": 8}, "min_size": 64, "max_size": 64}


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    """16 training and 6 validation images (64 px)."""
    return demo(tmp_path_factory.mktemp("ddp") / "data", train=16, val=6, size=64)


def _torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = distributed.launch_argv(2, [str(WORKER), *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------- unit checks

def test_global_batch_sets_the_linear_lr():
    one = TrainConfig(batch_size=4, lr=0.02)
    two = TrainConfig(batch_size=4, lr=0.02, world_size=2)
    assert (one.global_batch, two.global_batch) == (4, 8)
    assert one.effective_lr == pytest.approx(0.005) and two.effective_lr == pytest.approx(0.01)
    assert TrainConfig(batch_size=4, lr=0.02, world_size=2, lr_scaling="none").effective_lr == 0.02
    with pytest.raises(ConfigError, match="training setting world_size"):
        TrainConfig(world_size=0)
    with pytest.raises(ConfigError, match="training setting pin_memory"):
        TrainConfig(pin_memory="yes")


def test_distributed_sampler_shards_cover_each_epoch_once(ddp_data):
    ds = load_split(ddp_data, "train", train=True)
    n = len(ds)
    for world in (2, 3):
        shards = [list(make_loader(ds, 2, True, seed=5, epoch=1, rank=r, world_size=world).sampler)
                  for r in range(world)]
        assert all(len(s) == -(-n // world) for s in shards)
        flat = [i for s in shards for i in s]
        assert sorted(set(flat)) == list(range(n))  # every image; the padding repeats the permutation's start
        assert len(flat) - n == (-n) % world
        again = list(make_loader(ds, 2, True, seed=5, epoch=1, rank=0, world_size=world).sampler)
        other = list(make_loader(ds, 2, True, seed=5, epoch=2, rank=0, world_size=world).sampler)
        assert again == shards[0] and other != shards[0]  # fixed by (seed, epoch), and changes with the epoch
    assert batches_per_epoch(16, 2, 2) == 4 and batches_per_epoch(17, 2, 2) == 5 and batches_per_epoch(16, 4) == 4


@pytest.mark.parametrize(("n", "batch", "world"), [(6, 3, 2), (7, 2, 3), (1, 4, 2), (10, 1, 4), (0, 2, 2)])
def test_sharded_evaluation_sees_every_image_once_in_its_single_process_batch(n, batch, world):
    single = eval_batches(n, batch)
    shards = [eval_batches(n, batch, r, world) for r in range(world)]
    got = sorted((b for s in shards for b in s), key=lambda b: b[0] if b else -1)
    assert got == single
    assert sorted(i for s in shards for b in s for i in b) == list(range(n))


def test_rank_seeds_are_distinct_and_rank0_keeps_the_run_seed():
    seeds = {distributed.rank_seed(s, r) for s in range(50) for r in range(8)}
    assert len(seeds) == 400
    assert distributed.rank_seed(7, 0) == 7


def test_nproc_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="--nproc must be a positive integer"):
            distributed.check_nproc(bad)
    assert distributed.launch_argv(3, ["-m", "x"])[1:7] == ["-m", "torch.distributed.run", "--standalone",
                                                           "--nproc-per-node", "3", "-m"]


def test_one_process_per_gpu_at_most(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_devices(2, torch.device("cuda"))
    distributed.check_devices(8, torch.device("cpu"))  # CPU processes share the cores
    with pytest.raises(ConfigError, match="--nproc 3: this machine has 2 GPU\\(s\\); one process per GPU at most"):
        distributed.check_devices(3, torch.device("cuda"))


def test_call_file_round_trip(tmp_path):
    cfg = TrainConfig(iters=3, batch_size=2, lr=0.01)
    path = launch.write_call(tmp_path / "call.json", desc=TINY, data=CocoSource("s3://b/d", "2014", "x"),
                             out_dir=tmp_path / "o", cfg=cfg, arch_id="c7", init=tmp_path / "w.pth",
                             trainable={"b.w", "a.w"}, device="cpu", resume=False, min_size=96, max_size=None)
    kw = launch.read_call(path)
    assert kw == {"desc": TINY, "data": CocoSource("s3://b/d", "2014", "x"), "out_dir": str(tmp_path / "o"),
                  "cfg": cfg, "arch_id": "c7", "init": str(tmp_path / "w.pth"), "trainable": ["a.w", "b.w"],
                  "device": "cpu", "resume": False, "progress": False, "min_size": 96}
    assert launch.rank_command("C", "R") == ["-m", "spnas.training.launch", "C", "R"]
    with pytest.raises(SpnasError, match="collection of names"):
        launch.write_call(tmp_path / "c2.json", desc=TINY, data=CocoSource("d"), out_dir=tmp_path, cfg=cfg,
                          trainable=lambda name: True)
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(SpnasError, match="not a version 1 call"):
        launch.read_call(tmp_path / "old.json")


def test_checkpoint_resumes_only_with_its_world_size(ddp_data, tmp_path):
    ds = load_split(ddp_data, "train", train=True)
    model = build_detector({**TINY, "num_classes": ds.num_classes})
    st = setup(model, ds, TrainConfig(iters=2, batch_size=2), torch.device("cpu"))
    save(tmp_path / "last.pth", st, TrainConfig(iters=2, batch_size=2))
    ck = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ck["world_size"] == 1
    ck["world_size"] = 2
    torch.save(ck, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match="made by 2 process\\(es\\), this training runs 1"):
        restore(tmp_path / "two.pth", st)
    with pytest.raises(SpnasError, match="set for 2 process\\(es\\) but 1 train"):
        setup(model, ds, TrainConfig(iters=2, world_size=2), torch.device("cpu"))


def test_syncbn_is_a_norm_with_batchnorm_weights():
    d = normalize_desc({**TINY, "backbone": {**TINY["backbone"], "norm": "SyncBatchNorm"}})
    assert d["backbone"]["norm"] == "syncbn"
    a, b = build_detector(d), build_detector(TINY)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in a.modules())  # converted only under DDP


def test_run_refuses_to_be_a_rank_and_more_processes_than_gpus(monkeypatch, tmp_path, ddp_data):
    from helpers import DEMO, tiny_overrides

    from spnas.config import load_config
    from spnas.orchestration.local import Runner
    config = load_config(DEMO, workdir=tmp_path, overrides=tiny_overrides(ddp_data))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SpnasError, match="spnas run is not a rank of a torchrun launch"):
        Runner(config, nproc=1)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="--nproc must be a positive integer"):
        Runner(config, nproc=0)


def test_launch_hears_each_checkpoint_and_names_a_failed_launch(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(
        "import os, sys, time\n"
        "from spnas.utils.fileio import atomic_write_bytes\n"
        "if os.environ['RANK'] == '0':\n"
        "    for i in range(3):\n"
        "        atomic_write_bytes(sys.argv[1], str(i).encode()); time.sleep(0.4)\n"
        "sys.exit(int(sys.argv[2]))\n")
    target, heard = tmp_path / "last.pth", []
    distributed.launch(2, [str(script), str(target), "0"], watch=target, poll=0.05,
                       on_change=lambda p: heard.append(p.read_text()))
    assert heard[-1] == "2" and heard == sorted(set(heard)) and len(heard) >= 2
    with pytest.raises(distributed.LaunchFailed, match="launch of 2 processes exited with status 1"):
        distributed.launch(2, [str(script), str(tmp_path / "x"), "3"])


# ----------------------------------------------------------------------------- 2 gloo processes

@pytest.mark.slow
def test_ddp_ranks_stay_bit_identical_and_only_rank0_writes(ddp_data, tmp_path):
    r = _torchrun("train", str(ddp_data), str(tmp_path), "6")
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = (torch.load(tmp_path / f"state_rank{i}.pt", weights_only=True) for i in (0, 1))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)  # parameters and BN buffers
    start = build_detector({**TINY, "num_classes": 4}).state_dict()
    assert any(not torch.equal(s0[k], start[k]) for k in s0)  # it trained
    files = sorted(p.relative_to(tmp_path / "rank0").as_posix() for p in (tmp_path / "rank0").rglob("*"))
    assert files == ["desc_0.json", "model_0.pth", "performance_0.json", "train_0", "train_0/best.pth",
                     "train_0/last.pth"]
    assert not (tmp_path / "rank1").exists() or not any((tmp_path / "rank1").rglob("*"))
    perf = json.loads((tmp_path / "rank0" / "performance_0.json").read_text())
    assert (perf["world_size"], perf["global_batch"], perf["iters"], perf["images"]) == (2, 4, 6, 24)
    assert perf["effective_lr"] == pytest.approx(0.02 * 4 / 16)
    ck = torch.load(tmp_path / "rank0" / "train_0" / "last.pth", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]["ranks"]) == 2
    assert not torch.equal(ck["rng"]["ranks"][0]["torch"], ck["rng"]["ranks"][1]["torch"])  # a stream per rank
    final = torch.load(tmp_path / "rank0" / "model_0.pth", weights_only=True)
    assert all(torch.equal(final[k], s0[k]) for k in final)


@pytest.mark.slow
def test_ddp_gradient_equals_the_single_process_gradient_of_the_whole_batch(ddp_data, tmp_path):
    sys.path.insert(0, str(WORKER.parent))
    from ddp_worker import mean_model
    r = _torchrun("grad", str(ddp_data), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    g0, g1 = (torch.load(tmp_path / f"grad_rank{i}.pt", weights_only=True) for i in (0, 1))
    assert all(torch.equal(g0["grads"][k], g1["grads"][k]) for k in g0["grads"])  # all-reduced
    indices = g0["indices"] + g1["indices"]
    assert len(set(indices)) == 4
    ds = CocoSource(ddp_data).load("train", train=True, seed=0)
    ds.set_epoch(0)
    model = mean_model().train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    images, targets = zip(*(ds[i] for i in indices), strict=True)
    model(list(images), list(targets))["loss"].backward()
    ref = dict(model.named_parameters())
    for k, g in g0["grads"].items():
        torch.testing.assert_close(g, ref[k].grad, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process_and_syncbn_refused_on_cpu(ddp_data, tmp_path):
    ds = CocoSource(ddp_data).load("val", train=False)
    torch.manual_seed(3)
    model = build_detector({**TINY, "num_classes": ds.num_classes}).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    r = _torchrun("eval", str(ddp_data), str(tmp_path), str(tmp_path / "w.pth"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "eval.pt", weights_only=False)
    torch.manual_seed(0)
    fresh = build_detector({**TINY, "num_classes": ds.num_classes})
    fresh.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (torchrun's OMP_NUM_THREADS=1): the same kernels, the same sums
    try:
        single = predict(fresh, ds, "cpu", batch_size=3)
    finally:
        torch.set_num_threads(threads)
    assert single and got["preds"] == single
    assert {p["image_id"] for p in single} <= set(ds.coco.getImgIds())
    from spnas.training.evaluation import coco_metrics
    assert got["metrics"] == coco_metrics(ds.coco, single)
    assert "syncbn' needs CUDA devices" in (tmp_path / "syncbn.txt").read_text()
    # a semantic model's sharded confusion matrix: the counts summed over the ranks are the single process's
    from spnas.training.evaluation import confusion_matrix
    sem_set = CocoSource(ddp_data).load("val", train=False, semantic=True)
    torch.manual_seed(5)
    sem = build_detector({**TINY, "type": "SemanticFPN", "num_classes": sem_set.num_classes, "head_channels": 8})
    torch.set_num_threads(1)
    try:
        conf = confusion_matrix(sem, sem_set, "cpu", batch_size=3)
    finally:
        torch.set_num_threads(threads)
    pixels = sum(sem_set[i][1]["sem_seg"].numel() for i in range(len(sem_set)))
    assert int(conf.sum()) == pixels and torch.equal(got["confusion"], conf)


@pytest.mark.slow
def test_spnas_train_nproc_2_killed_mid_epoch_resumes_to_the_uninterrupted_weights(ddp_data, tmp_path, capsys):
    args = ["train", "--data", str(ddp_data), "--code", "1-1-1-1", "--block", "basic", "--base-channels", "8",
            "--min-size", "64", "--max-size", "64", "--epochs", "2", "--batch-size", "2", "--warmup-iters", "1",
            "--device", "cpu", "--nproc", "2", "--checkpoint-every", "2"]
    assert cli([*args, "--out", str(tmp_path / "whole")]) == 0
    perf = json.loads((tmp_path / "whole" / "performance_0.json").read_text())
    assert (perf["world_size"], perf["global_batch"], perf["iters"]) == (2, 4, 8)
    env = {"SPNAS_FAILPOINT": "train_iter:3"}  # both ranks SIGKILLed after step 3 of 8 (epoch 1 of 2: 4 steps each)
    os.environ.update(env)
    try:
        assert cli([*args, "--out", str(tmp_path / "cut")]) != 0
    finally:
        for k in env:
            os.environ.pop(k)
    ck = torch.load(tmp_path / "cut" / "train_0" / "last.pth", weights_only=True)
    assert ck["iteration"] == 2  # the last checkpoint before the kill: the resume starts mid-epoch
    assert not (tmp_path / "cut" / "model_0.pth").exists()
    assert cli([*args, "--out", str(tmp_path / "cut")]) == 0
    a, b = (torch.load(tmp_path / d / "model_0.pth", weights_only=True) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "performance_0.json").read_text())["iters"] == 8


@pytest.mark.slow
def test_reignition_runs_data_parallel_and_rank0_writes(ddp_data, tmp_path):
    from spnas.training.reignite import reignite
    from spnas.training.schedule import ReignitionSettings
    torch.manual_seed(0)
    desc = normalize_desc({**TINY, "num_classes": 4})
    model = build_detector(desc)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    settings = ReignitionSettings(epochs=1, batch_size=8, lr=0.05, recalibrate_images=8, head_iters=2,
                                  detection_batch_size=2, probe_iters=5)
    perf = reignite(desc, tmp_path / "w.pth", tmp_path / "out", settings, detection=CocoSource(str(ddp_data)),
                    arch_id=3, device="cpu", nproc=2)
    assert (perf["world_size"], perf["head_iters"], perf["recalibrated"]) == (2, 2, 8)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["desc_3.json", "model_3.pth", "performance_3.json"]
    after = torch.load(tmp_path / "out" / "model_3.pth", weights_only=True)
    before = model.state_dict()
    body = [k for k in before if k.startswith("backbone.body.") and k.endswith("conv1.weight")]
    assert body and all(not torch.equal(after[k], before[k]) for k in body)  # the classifier trained the backbone
    assert json.loads((tmp_path / "out" / "performance_3.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_spnas_run_nproc_2_trains_one_model_phases_data_parallel(tiny_data, tmp_path):
    from helpers import run_argv
    assert cli([*run_argv(tiny_data, tmp_path / "w"), "--nproc", "2"]) == 0
    reports = json.loads((tmp_path / "w" / "output" / "reports.json").read_text())
    ft = reports["phases"]["fine_tune"]["records"][0]
    assert (ft["world_size"], ft["global_batch"]) == (2, 8)
    full = reports["phases"]["fully_train"]["records"]
    assert full and all(r["world_size"] == 2 for r in full)
    assert reports["phases"]["fully_train"]["control"]["world_size"] == 2
    assert reports["phases"]["serial"]["control"]["world_size"] == 2
    assert reports["phases"]["reignition"]["records"][0]["reignition"]["world_size"] == 2
    perf = json.loads((tmp_path / "w" / "output" / "serial" / "performance_1.json").read_text())
    assert perf["world_size"] == 1  # candidates train one process each (--workers)


def test_killing_the_launching_process_group_stops_the_ranks(tmp_path):
    """A pod's training child is cut at its time limit by killing its process group: the ranks
    of a launch inside it must die with it, not train on as orphans."""
    import signal
    import time
    script = tmp_path / "rank.py"
    script.write_text("import os, pathlib, sys, time, torch\n"
                      "from spnas.training import distributed\n"
                      "with distributed.process_group(torch.device('cpu')):\n"
                      "    pathlib.Path(sys.argv[1], os.environ['RANK']).write_text(str(os.getpid()))\n"
                      "    time.sleep(120)\n")
    parent = ("import sys; from spnas.training import distributed; "
              f"distributed.launch(2, [{str(script)!r}, {str(tmp_path)!r}])")
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / r).is_file() for r in ("0", "1")):
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        pids = [int((tmp_path / r).read_text()) for r in ("0", "1")]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                  for p in pids):
            assert time.monotonic() < deadline, f"ranks {pids} outlived their launching process group"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
