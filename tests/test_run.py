"""`spnas run`: every phase of a small config, the files it writes, reproducibility, failures."""
import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import DEMO, run_argv, tiny_overrides

from spnas.cli.main import main
from spnas.config import load_config
from spnas.utils.errors import SpnasError


@pytest.mark.slow
def test_run_all_phases_files_and_reproducibility(tiny_run, tiny_data, tmp_path):
    workdir, a = tiny_run
    out = workdir / "output"
    assert list(a["phases"]) == ["fine_tune", "serial", "reignition", "parallel", "fully_train"]
    # fine_tune: candidate 0
    for f in ("desc_0.json", "performance_0.json", "model_0.pth", "output.csv"):
        assert (out / "fine_tune" / f).is_file()
    # search phases: per candidate files with consistent ids, output.csv of the front, plot, state
    for phase, n_seeds in (("serial", 1), ("parallel", 1)):
        recs = a["phases"][phase]["records"]
        cands = [r for r in recs if r["parent"] is not None]
        assert len(recs) == n_seeds + 2 and len(cands) == 2
        for r in cands:
            assert r["status"] == "ok" and r["parent"] in {x["id"] for x in recs}
            n_tensors = len(torch.load(out / phase / f"model_{r['id']}.pth", weights_only=True))
            assert r["inherited"] > 0 and r["inherited"] + r["fresh"] == n_tensors
            for f in (f"desc_{r['id']}.json", f"performance_{r['id']}.json", f"model_{r['id']}.pth",
                      f"inherit_{r['id']}.json"):
                assert (out / phase / f).is_file(), f
            desc = json.loads((out / phase / f"desc_{r['id']}.json").read_text())
            assert desc["backbone"]["code"] == r["desc"]["backbone"]["code"]
            assert desc["neck"]["code"] == r["desc"]["neck"]["code"]
            perf = json.loads((out / phase / f"performance_{r['id']}.json").read_text())
            assert perf["mAP"] == r["metrics"]["mAP"]
            inh = json.loads((out / phase / f"inherit_{r['id']}.json").read_text())
            assert len(inh["inherited"]) == r["inherited"] and len(inh["fresh"]) == r["fresh"]
        rows = list(csv.DictReader((out / phase / "output.csv").open()))
        assert sorted(int(r["worker_id"]) for r in rows) == sorted(a["phases"][phase]["front"])
        assert (out / phase / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / phase / "state.json").is_file()
    par = a["phases"]["parallel"]["records"]
    assert all(r["desc"]["backbone"]["code"] == par[0]["desc"]["backbone"]["code"] for r in par)
    assert any(sum(r["desc"]["neck"]["code"]) > 0 for r in par)
    re_ = a["phases"]["reignition"]["records"]
    assert len(re_) == 1 and (out / "reignition" / f"model_{re_[0]['id']}.pth").is_file()
    assert a["phases"]["parallel"]["seeds"] == [{"seed": 0, "from": f"reignition/{re_[0]['id']}"}]
    full = a["phases"]["fully_train"]["records"]
    front = a["phases"]["parallel"]["front"]
    assert len(full) == min(2, len(front)) and {r["id"] for r in full} <= set(front)  # top_k 2 of the front
    best = max(full, key=lambda r: r["metrics"]["mAP"])
    assert all((out / "fully_train" / f"model_{r['id']}.pth").is_file() for r in full)
    assert not list(out.rglob("train_*"))  # training state removed once a candidate is done

    # the equal-budget control: the seed trained from the fine-tuned weights as long as the final
    # model's lineage trained since fine_tune; control.json puts both side by side
    _check_lineage(a)
    ctrl = json.loads((out / "control.json").read_text())
    assert a["control"] == ctrl
    keys = {"id", "desc", "mAP", "AP50", "params", "gflops", "latency", "memory", "iterations", "weights"}
    assert set(ctrl["searched"]) == set(ctrl["control"]) == keys
    assert ctrl["searched"]["id"] == best["id"] and ctrl["searched"]["mAP"] == best["metrics"]["mAP"]
    assert ctrl["searched"]["iterations"] == best["lineage_iters"] == ctrl["control"]["iterations"]
    assert ctrl["delta_mAP"] == ctrl["searched"]["mAP"] - ctrl["control"]["mAP"]
    seed = a["phases"]["fine_tune"]["records"][0]
    assert ctrl["control"]["desc"]["backbone"]["code"] == seed["desc"]["backbone"]["code"]
    assert ctrl["control"]["desc"]["neck"]["code"] == [0, 0, 0, 0] and ctrl["control"]["params"] == seed["params"]
    assert all(ctrl[k]["latency"] > 0 and ctrl[k]["memory"] > 0 for k in ("searched", "control"))
    winner = a["phases"]["fully_train"]["control"] if ctrl["winner"] == "control" else best
    assert ctrl["winner"] in ("searched", "control") and a["best"]["id"] == winner["id"]
    assert a["best"]["weights"] == winner["weights"] and Path(winner["weights"]).is_file()
    for phase in ("serial", "parallel"):  # each search phase: its best candidate beside its own control
        pc, plan = ctrl["phases"][phase], a["phases"][phase]["control"]
        recs = {r["id"]: r for r in a["phases"][phase]["records"]}
        assert pc["searched"]["id"] == max((r for r in recs.values() if r["round"] >= 0 and r["status"] == "ok"),
                                           key=lambda r: r["metrics"]["mAP"])["id"]
        assert pc["control"]["iterations"] == pc["searched"]["iterations"] == plan["iters"]
        assert pc["delta_mAP"] == pc["searched"]["mAP"] - pc["control"]["mAP"]
        top = max(r["metrics"]["mAP"] for r in recs.values() if r["round"] < 0 and r["status"] == "ok")
        cands = [r for r in recs.values() if r["round"] >= 0 and r["status"] == "ok"]
        assert pc["seed"]["mAP"] == top and pc["candidates"] == len(cands)
        assert pc["beat_seed"] == sum(r["metrics"]["mAP"] > top for r in cands)
    compute = a["compute"]
    assert compute["controls"]["iterations"] == sum(a["phases"][p]["control"]["iters"] for p in
                                                    ("serial", "parallel", "fully_train"))
    assert compute["search"]["images"] == sum(r.get("images") or 0 for ph in a["phases"].values()
                                              for r in ph["records"])

    # the same config again, on one worker instead of two: the same records
    assert main(run_argv(tiny_data, tmp_path / "b", workers=1)) == 0
    b = json.loads((tmp_path / "b" / "output" / "reports.json").read_text())
    for phase in ("serial", "parallel"):
        ca = [(r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"], (r["metrics"] or {}).get("mAP"))
              for r in a["phases"][phase]["records"]]
        cb = [(r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"], (r["metrics"] or {}).get("mAP"))
              for r in b["phases"][phase]["records"]]
        assert ca == cb


def _check_lineage(reports):
    """Every record's lineage_iters = its parent's + its own training iterations (the parent of a
    search seed is the previous phase's record it came from; reignition adds none)."""
    phases = reports["phases"]
    assert phases["fine_tune"]["records"][0]["lineage_iters"] == 0
    prev = {r["id"]: r for r in phases["fine_tune"]["records"]}
    for name in ("serial", "reignition", "parallel", "fully_train"):
        ph = phases[name]
        recs = {r["id"]: r for r in ph["records"]}
        for r in ph["records"]:
            if r["status"] != "ok":
                continue
            if name in ("serial", "parallel") and r["round"] >= 0:
                assert r["lineage_iters"] == recs[r["parent"]]["lineage_iters"] + r["iters"] and r["iters"] > 0
            elif name in ("serial", "parallel"):  # a seed: the previous phase's record with its weights
                source = [p for p in prev.values() if p["weights"] == r["weights"]]
                assert len(source) == 1 and r["lineage_iters"] == source[0]["lineage_iters"], (name, r["id"])
            elif name == "fully_train":
                assert r["lineage_iters"] == prev[r["id"]]["lineage_iters"] + r["iters"]
            elif name == "reignition":
                assert r["lineage_iters"] == prev[r["id"]]["lineage_iters"]
        prev = {r["id"]: r for r in ph["records"]} if name != "serial" else \
            {r["id"]: r for r in ph["records"] if r["id"] in ph["front"]}


@pytest.mark.slow
def test_failed_candidate_is_recorded_and_all_failed_stops(tiny_data, tmp_path, monkeypatch):
    import spnas.orchestration.local as run_mod
    from spnas.orchestration import phases
    real = phases.train_candidate
    calls = []

    def flaky(candidate, *args, **kw):
        calls.append(candidate["id"])
        if candidate["id"] == 1:
            return {"id": 1, "status": "failed", "metrics": None, "error": "RuntimeError: out of memory",
                    "weights": None, "inherited": None, "fresh": None}
        return real(candidate, *args, **kw)

    monkeypatch.setattr(run_mod.phases, "train_candidate", flaky)
    cfg = load_config(DEMO, workdir=tmp_path / "w", overrides=tiny_overrides(tiny_data) + [
        "pipeline=[fine_tune, serial]", "serial.search_algorithm.objective_keys=[mAP, params, latency]",
        "serial.model.model_desc.freeze_swap_keys=true"])
    reports = run_mod.run(cfg, workers=1, progress=False)
    recs = reports["phases"]["serial"]["records"]
    failed = [r for r in recs if r["status"] == "failed"]
    assert [r["id"] for r in failed] == [1] and failed[0]["error"] == "RuntimeError: out of memory"
    assert 1 not in reports["phases"]["serial"]["front"] and len(recs) == 3
    assert all(r["latency"] > 0 for r in recs if r["status"] != "pending")  # measured when proposed (end to end)
    trained = [r for r in recs if r["status"] == "ok" and r["parent"] is not None]
    assert len(trained) == 1 and 0 < trained[0]["trainable"] < trained[0]["params"]  # freeze_swap_keys froze some

    monkeypatch.setattr(run_mod.phases, "train_candidate", lambda c, *args, **kw: {
        "id": c["id"], "status": "failed", "metrics": None, "error": f"ValueError: bad {c['id']}",
        "weights": None, "inherited": None, "fresh": None})
    with pytest.raises(SpnasError, match="serial round 0: every candidate failed: candidate 1: ValueError: bad 1; candidate 2: ValueError: bad 2"):
        run_mod.run(load_config(DEMO, workdir=tmp_path / "w2", overrides=tiny_overrides(tiny_data) + [
            "pipeline=[fine_tune, serial]"]), workers=1, progress=False)


def test_run_reports_config_errors_with_key(tmp_path, capsys):
    assert main(["run", str(DEMO), "--workdir", str(tmp_path), "--set", "serial.search_algorithm.num_mutate=0"]) == 2
    assert "serial.search_algorithm" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_page_config_runs(tiny_data, tmp_path):
    """The config assembled from the reference page's snippets runs as written (only the dataset
    paths filled in, the schedule shrunk with --set for CPU CI) through what only it proves: a
    torchvision ResNet-50 Faster R-CNN checkpoint loaded and converted, and a serial round of
    ResNet-50 children with ``freeze_swap_keys``. Loading its other steps is test_config's job;
    running every phase is the demo config's (test_run_all_phases_files_and_reproducibility)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    ckpt = tmp_path / "fasterrcnn_resnet50_fpn_coco.pth"
    torch.save(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), ckpt)
    ref = (Path(__file__).parent / "data" / "reference.yml").read_text()
    cfg_path = tmp_path / "spnas.yml"
    cfg_path.write_text(ref.replace("{data_root}", str(tiny_data)).replace("{pretrained}", str(ckpt)))
    shrink = ["fine_tune.model.model_desc.min_size=96", "fine_tune.model.model_desc.max_size=96",
              "fine_tune.trainer.epochs=1", "serial.search_algorithm.max_sample=1", "pipeline=[fine_tune, serial]"]
    # fewer proposals and RoI samples than torchvision's defaults: the RoI heads, not the backbone, dominate at 96 px
    shrink += [f"fine_tune.model.model_desc.{k}={v}" for k, v in (
        ("rpn_pre_nms_top_n_train", 100), ("rpn_post_nms_top_n_train", 50), ("rpn_pre_nms_top_n_test", 50),
        ("rpn_post_nms_top_n_test", 25), ("box_batch_size_per_image", 32), ("rpn_batch_size_per_image", 64))]
    argv = ["run", str(cfg_path), "--workdir", str(tmp_path / "run"), "--quiet"]
    for o in shrink:
        argv += ["--set", o]
    assert main(argv) == 0
    reports = json.loads((tmp_path / "run" / "output" / "reports.json").read_text())
    ft = reports["phases"]["fine_tune"]["records"][0]
    assert ft["desc"]["backbone"]["code"] == "111-2111-211111-211" and ft["desc"]["num_classes"] == 4
    assert ft["fresh"] == 4  # the 91-class box predictor was replaced, everything else converted
    serial = reports["phases"]["serial"]["records"]
    assert list(reports["phases"]) == ["fine_tune", "serial"]
    assert len(serial) == 2 and serial[1]["status"] == "ok" and serial[1]["parent"] == 0
    assert serial[1]["desc"]["backbone"]["code"] != "111-2111-211111-211" and serial[1]["inherited"] > 0
    assert reports["best"]["id"] in reports["phases"]["serial"]["front"]


def test_serial_plateau_reignites_the_front_inside_the_search(tiny_data, tmp_path, monkeypatch):
    """With ``reignition_patience`` set, ``spnas run`` reignites the serial front when a round
    brings no better mAP, and the reignited models join the search (candidates and reignition
    faked here: the trigger and its bookkeeping are what is tested)."""
    import spnas.orchestration.local as run_mod
    calls = []

    def flat(candidate, *args, **kw):  # every child scores 0: the front never improves
        return {"id": candidate["id"], "status": "ok", "metrics": {"mAP": 0.0, "AP50": 0.0}, "error": None,
                "weights": candidate["parent_weights"], "inherited": 1, "fresh": 0, "iters": 4, "images": 16}

    def reignite(models, step, out_dir, **kw):
        calls.append(([m["id"] for m in models], step.role, str(out_dir)))
        return [{"id": m["id"], "status": "ok", "desc": m["desc"], "metrics": {"mAP": 1.0 + len(calls), "AP50": 2.0},
                 "params": m["params"], "gflops": m["gflops"], "weights": m["weights"], "reignition": {"kept": "after"}}
                for m in models]
    monkeypatch.setattr(run_mod.phases, "train_candidate", flat)
    monkeypatch.setattr(run_mod.phases, "reignition", reignite)
    cfg = load_config(DEMO, workdir=tmp_path / "w", overrides=tiny_overrides(tiny_data) + [
        "pipeline=[fine_tune, serial]", "serial.search_algorithm.max_sample=6", "general.control=false",
        "serial.search_algorithm.reignition_patience=1", "serial.search_algorithm.max_reignitions=1"])
    reports = run_mod.run(cfg, workers=1, progress=False)
    recs = reports["phases"]["serial"]["records"]
    reignited = [r for r in recs if r["ops"] == ["reignite"]]
    assert len(calls) == 1 and calls[0][1] == "reignition" and calls[0][2].endswith("serial/reignition_0")
    assert [r["parent"] for r in reignited] == calls[0][0] and reignited[0]["metrics"]["mAP"] == 2.0
    assert reignited[0]["id"] in reports["phases"]["serial"]["front"]  # the better reignited model leads
    assert len([r for r in recs if r["round"] >= 0 and r["ops"] != ["reignite"]]) == 6
    assert "control" not in reports and reports["phases"]["serial"]["control"] is None  # general.control=false


SEED_SPACE = "serial.search_space={{hyperparameters: [{{key: network.backbone.code, range: {codes}}}]}}"


@pytest.mark.slow
def test_serial_search_space_codes_seed_the_search(tiny_data, tmp_path):
    """Each code of the serial step's range is a seed: the fine-tuned code is the fine-tuned
    model itself, another code is derived from its weights by inheritance and evaluated; a code
    that cannot be derived is a ConfigError naming it, before any file is written."""
    from spnas.models.desc import normalize_desc
    from spnas.models.detector import build_detector
    from spnas.orchestration import phases, steps
    from spnas.training.architecture import evaluate_architecture
    from spnas.utils.errors import ConfigError
    from spnas.utils.fileio import read_json
    cfg = load_config(DEMO, workdir=tmp_path, overrides=tiny_overrides(tiny_data) + [
        SEED_SPACE.format(codes="['1-2-2-2', '1-21-2-2', '1-2-2-2-2']")])  # itself, expand, add-stage
    serial = cfg.step("serial")
    assert steps.seed_codes(serial) == ("backbone", ("1-2-2-2", "1-21-2-2", "1-2-2-2-2"))
    desc = normalize_desc({**steps.seed_desc(cfg.step("fine_tune")), "num_classes": 4})
    torch.manual_seed(0)
    torch.save(build_detector(desc).state_dict(), tmp_path / "ft.pth")
    seed = {"desc": desc, "metrics": {"mAP": 12.5, "params": 1, "gflops": 1.0, "latency": 1.0},
            "weights": str(tmp_path / "ft.pth")}
    out = tmp_path / "serial"
    state = read_json(phases.search_init(serial, [seed], out, data=steps.data_source(serial), device="cpu"))
    recs = state["records"]
    assert [(r["id"], r["round"], r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"]) for r in recs] == \
        [(0, -1, "1-2-2-2", [0] * 4), (1, -1, "1-21-2-2", [0] * 4), (2, -1, "1-2-2-2-2", [0] * 5)]
    assert recs[0]["weights"] == str(tmp_path / "ft.pth") and recs[0]["metrics"]["mAP"] == 12.5
    assert [r["weights"] for r in recs[1:]] == [str(out / "seed_1.pth"), str(out / "seed_2.pth")]
    derived = evaluate_architecture(recs[1]["desc"], out / "seed_1.pth", steps.data_source(serial), device="cpu")
    assert recs[1]["metrics"]["mAP"] == derived["mAP"] and recs[1]["metrics"]["params"] == derived["params"]
    assert recs[1]["metrics"]["params"] > recs[0]["params"]  # its own measures, not the seed's

    for codes, message in (("['1-2-2-2', '2-2-2-2']", "code '2-2-2-2' cannot be derived from the fine-tuned network "
                            "'1-2-2-2': child code '2-2-2-2' is not derivable"),
                           ("['b_1-2-2-2_0-0-0-0', 'r_1-2-2-2_0-0-0-0']", "code 'r_1-2-2-2_0-0-0-0' cannot be derived "
                            "from the fine-tuned network '1-2-2-2': its backbone.block is 'bottleneck', the seed's 'basic'")):
        bad = load_config(DEMO, workdir=tmp_path, overrides=tiny_overrides(tiny_data) + [SEED_SPACE.format(codes=codes)])
        with pytest.raises(ConfigError, match=f"config key serial.search_space: {message}"):
            phases.search_init(bad.step("serial"), [seed], tmp_path / "bad", data=steps.data_source(serial))
        assert not (tmp_path / "bad").exists()


def test_an_underivable_serial_code_stops_the_run_before_any_training(tiny_data, tmp_path, capsys):
    argv = ["run", str(DEMO), "--workdir", str(tmp_path), "--quiet"]
    for o in tiny_overrides(tiny_data) + [SEED_SPACE.format(codes="['1-2-2-2', '11-2-2']")]:
        argv += ["--set", o]
    assert main(argv) == 2
    assert "config key serial.search_space: code '11-2-2' cannot be derived from the fine-tuned network '1-2-2-2'" \
        in capsys.readouterr().err
    assert not (tmp_path / "output").exists()


def test_refresh_seeds_ranks_the_search_against_its_seed_retrained(tiny_data, tmp_path, monkeypatch):
    """With ``refresh_seeds``, ``spnas run``'s first serial candidate retrains the fine-tuned seed
    unchanged, and once it is recorded the seed's own (converged) figure is neither on the front
    nor the run's result, however high it is (candidates faked: the bookkeeping is tested)."""
    import spnas.orchestration.local as run_mod
    seen = []

    def low(candidate, *args, **kw):  # every candidate far below any seed
        seen.append(candidate)
        return {"id": candidate["id"], "status": "ok", "metrics": {"mAP": -1.0 + 0.01 * candidate["id"], "AP50": 0.0},
                "error": None, "weights": candidate["parent_weights"], "inherited": 1, "fresh": 0, "iters": 4,
                "images": 16}
    monkeypatch.setattr(run_mod.phases, "train_candidate", low)
    cfg = load_config(DEMO, workdir=tmp_path / "w", overrides=tiny_overrides(tiny_data) + [
        "pipeline=[fine_tune, serial]", "serial.search_algorithm.max_sample=3", "general.control=false",
        "serial.search_algorithm.refresh_seeds=true"])
    reports = run_mod.run(cfg, workers=1, progress=False)
    seed = reports["phases"]["fine_tune"]["records"][0]
    recs = reports["phases"]["serial"]["records"]
    assert seen[0]["ops"] == ["refresh"] and seen[0]["parent"] == 0 and seen[0]["parent_weights"] == seed["weights"]
    assert seen[0]["desc"]["backbone"]["code"] == seed["desc"]["backbone"]["code"]
    assert [c["ops"] == ["refresh"] for c in seen] == [True, False, False] and len(recs) == 4
    assert reports["best"]["id"] == max(c["id"] for c in seen)  # the best candidate, not the seed (id 0)
    assert reports["best"]["metrics"]["mAP"] < 0 <= seed["metrics"]["mAP"]
