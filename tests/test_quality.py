"""The run's quality is its first maximised objective: a Mask R-CNN searched by mask AP is
ranked, picked, compared with its control, reignited and retrained by mask AP; without
objectives, box mAP (a semantic model's mIoU)."""
import pytest

from spnas.orchestration import ship, steps
from spnas.orchestration.reports import control_summary, report_markdown
from spnas.search import SearchSettings, new_state, propose, update
from spnas.search.settings import quality, quality_key

MASK_KEYS = ("segm_mAP", "params")


def rec(i, parent, rnd, box, mask, params=1_000_000, lineage=None, status="ok"):
    """A Mask R-CNN record whose box and mask figures can disagree."""
    return {"id": i, "parent": parent, "round": rnd, "status": status,
            "metrics": {"mAP": box, "AP50": box + 30, "segm_mAP": mask, "segm_AP50": mask + 30},
            "params": params, "gflops": 1.0, "iters": 10, "images": 40, "seconds": 1.0, "lineage_iters": lineage,
            "desc": {"type": "MaskRCNN", "backbone": {"code": "1-2-2-2"}, "neck": {"code": [0, 0, 0, 0]}},
            "weights": f"w{i}.pth"}


@pytest.mark.parametrize("metrics, objectives, key", [
    ({"mAP": 30.0, "segm_mAP": 40.0}, (), "mAP"),                             # no objectives: box mAP
    ({"mAP": 30.0, "segm_mAP": 40.0}, ("segm_mAP", "params"), "segm_mAP"),
    ({"mAP": 30.0, "segm_mAP": 40.0}, ("params", "segm_AP50", "mAP"), "mAP"),  # segm_AP50 not measured
    ({"mAP": 30.0, "segm_mAP": 40.0}, ("gflops", "map"), "mAP"),              # an alias, costs skipped
    ({"mAP": 30.0, "segm_mAP": None}, ("segm_mAP",), "mAP"),                  # undefined: the default
    ({"mIoU": 70.0, "pixel_acc": 95.0}, ("mIoU", "params"), "mIoU"),
    ({"mIoU": 70.0, "pixel_acc": 95.0}, (), "mIoU"),
    (None, ("segm_mAP",), "mAP"),
])
def test_quality_key_is_the_first_maximised_objective_measured(metrics, objectives, key):
    assert quality_key(metrics, objectives) == key
    assert quality(metrics, objectives) == (metrics or {}).get(key)


def test_ranking_picking_and_the_phase_control_follow_mask_ap():
    # box mAP says 2 is best; mask AP says 3 (a child of seed 1)
    records = [rec(0, None, -1, 40, 30, lineage=20), rec(1, None, -1, 39, 31, lineage=20),
               rec(2, 0, 0, 45, 32, lineage=30), rec(3, 1, 0, 41, 36, lineage=30)]
    assert [r["id"] for r in steps.by_map(records)] == [2, 3, 0, 1]
    assert [r["id"] for r in steps.by_map(records, MASK_KEYS)] == [3, 2, 1, 0]
    assert steps.best_of(records)["id"] == 2 and steps.best_of(records, MASK_KEYS)["id"] == 3
    plan = steps.phase_control_plan(records, MASK_KEYS)
    assert (plan["best"]["id"], plan["seed"]["id"], plan["generations"]) == (3, 1, 1)
    assert steps.phase_control_plan(records)["seed"]["id"] == 0


def test_the_winner_and_control_json_compare_mask_ap():
    searched = {**rec(7, 3, 2, 40.0, 36.0, lineage=300), "latency": 1.0, "memory": 1.0}
    control = {**rec("control", None, -1, 42.0, 35.0, lineage=300), "iters": 300, "latency": 1.0, "memory": 1.0}
    # box mAP: the control wins outright (same params, higher mAP); mask AP: the searched model does
    assert steps.winner(searched, control, ["mAP", "params"])[0] == "control"
    win, why = steps.winner(searched, control, list(MASK_KEYS))
    assert win == "searched" and "dominates on segm_mAP, params" in why
    serial_ctrl = {**rec("control", None, -1, 44.0, 33.0), "iters": 20, "best": 3, "planned_iters": 20,
                   "generations": 1}
    s = control_summary(searched, control, {"serial": serial_ctrl}, MASK_KEYS,
                        {"serial": [rec(0, None, -1, 40, 30), rec(3, 0, 0, 41, 36.5)]})
    assert s["quality"] == "segm_mAP" and s["winner"] == "searched" and "delta_mAP" not in s
    assert s["delta_segm_mAP"] == 36.0 - 35.0 and s["phases"]["serial"]["delta_segm_mAP"] == 36.5 - 33.0
    assert s["phases"]["serial"]["seed"] == {"id": 0, "segm_mAP": 30} and s["phases"]["serial"]["beat_seed"] == 1
    assert {k: s["searched"][k] for k in ("mAP", "AP50", "segm_mAP", "segm_AP50")} == \
        {"mAP": 40.0, "AP50": 70.0, "segm_mAP": 36.0, "segm_AP50": 66.0}
    text = report_markdown({"serial front": [searched]}, searched, s)
    assert "segm_mAP 36.00, segm_AP50 66.00" in text and "delta segm_mAP +1.00" in text
    assert "| id | parent | serial code | neck | status | segm_mAP | segm_AP50 |" in text


def test_the_plateau_trigger_counts_the_search_objective():
    """A search ranked by mask AP: children that raise mask AP while box mAP falls are progress
    (no stale round); children that raise box mAP only are a plateau."""
    desc = {"num_classes": 3, "type": "MaskRCNN", "backbone": {"code": "11-21-21-21", "block": "basic",
                                                               "base_channels": 16},
            "neck": {"code": None, "out_channels": 32}}
    s = SearchSettings("SpNasS", min_blocks=4, max_blocks=16, max_stages=5, flops_size=128, max_sample=4,
                       candidates_per_round=2, reignition_patience=1, max_reignitions=2, seed=1,
                       objective_keys=MASK_KEYS)
    for mask_up, stale in ((True, 0), (False, 1)):
        state = new_state(s, [{"desc": desc, "metrics": {"mAP": 40.0, "segm_mAP": 30.0}, "weights": "w0"}])
        state, cands = propose(state)
        state = update(state, [{"id": c["id"], "status": "ok", "weights": f"w{c['id']}",
                                "metrics": {"mAP": 35.0 if mask_up else 45.0, "segm_mAP": 31.0 if mask_up else 29.0}}
                               for c in cands])
        assert state["plateau"]["stale_rounds"] == stale
        assert state["plateau"]["best_mAP"] == (31.0 if mask_up else 30.0)  # the key keeps its old name


def test_retraining_decides_by_the_quality_the_evaluation_named(tmp_path):
    champion = {"metrics": {"mAP": 50.0, "segm_mAP": 40.0}, "quality": "segm_mAP"}
    challenger = {"metrics": {"mAP": 49.0, "segm_mAP": 41.0}, "quality": "segm_mAP"}
    verdict = ship.decide(champion, challenger, 0.5, str(tmp_path / "a"))
    assert (verdict["key"], verdict["decision"], verdict["delta"]) == ("segm_mAP", "promote", 1.0)
    verdict = ship.decide(champion, {"metrics": challenger["metrics"]}, 0.5, str(tmp_path / "b"))
    assert (verdict["key"], verdict["decision"], verdict["delta"]) == ("mAP", "keep", -1.0)  # no quality: box mAP
