"""Equal-budget controls and reports: which control a phase gets, who wins, control.json, compute
accounting, and Pareto plots where no legend or label covers a point."""
import pytest

from spnas.orchestration import steps
from spnas.orchestration.reports import control_summary, pareto_figure, phase_compute, run_compute


def rec(i, parent, rnd, mAP, params=1_000_000, gflops=1.0, iters=10, lineage=None, status="ok"):
    return {"id": i, "parent": parent, "round": rnd, "status": status, "metrics": {"mAP": mAP, "AP50": mAP + 30},
            "params": params, "gflops": gflops, "iters": iters, "images": None if iters is None else iters * 4,
            "seconds": 1.0,
            "lineage_iters": lineage, "desc": {"backbone": {"code": "1-2-2-2"}, "neck": {"code": [0, 0, 0, 0]}},
            "weights": f"w{i}.pth"}


def test_phase_control_plan_follows_the_best_lineage_back_to_its_seed():
    # seed 0 (lineage 20) -> 2 -> 5 (best); seed 1 -> 3; 4 failed with a tempting mAP
    records = [rec(0, None, -1, 40, lineage=20), rec(1, None, -1, 41, lineage=20), rec(2, 0, 0, 45, lineage=30),
               rec(3, 1, 0, 44, lineage=30), rec(4, 2, 1, 99, status="failed"), rec(5, 2, 1, 47, lineage=40)]
    plan = steps.phase_control_plan(records)
    assert plan["best"]["id"] == 5 and plan["seed"]["id"] == 0
    assert plan["generations"] == 2 and plan["iters"] == 20
    assert steps.phase_control_plan(records[:2] + [records[4]]) is None  # no candidate succeeded


def test_search_seeds_carry_their_lineage_into_the_next_search(tmp_path):
    """A parallel search seeded by reignited serial candidates starts their lineage where the
    serial search left it, so the final control trains as long as the whole lineage."""
    from spnas.search.settings import SearchSettings
    from spnas.search.state import new_state
    seeds = steps.search_seeds([rec(2, 0, 0, 45, lineage=60), rec(0, None, -1, 40, lineage=0),
                                rec(7, None, -1, 41, lineage=None)])
    assert [s["lineage_iters"] for s in seeds] == [60, 0, 0]
    state = new_state(SearchSettings(algorithm="SpNasP", max_sample=2, flops_size=64), seeds)
    assert [r["lineage_iters"] for r in state["records"]] == [60, 0, 0]


@pytest.mark.parametrize("searched, control, winner, why", [
    ((50.0, 5e6, 1.0), (48.0, 4e6, 0.8), "searched", "neither dominates"),   # better mAP, costs more: mAP decides
    ((47.0, 5e6, 1.0), (48.0, 4e6, 0.8), "control", "the control dominates"),
    ((50.0, 4e6, 0.8), (48.0, 4e6, 0.8), "searched", "the searched model dominates"),
    ((48.0, 4e6, 0.8), (48.0, 4e6, 0.8), "searched", "neither dominates"),    # a tie stays with the search
    ((47.0, 3e6, 0.5), (48.0, 4e6, 0.8), "control", "the control has the higher mAP"),
])
def test_winner(searched, control, winner, why):
    s = rec(1, 0, 0, searched[0], params=int(searched[1]), gflops=searched[2])
    c = rec("control", None, -1, control[0], params=int(control[1]), gflops=control[2])
    got, reason = steps.winner(s, c, ["mAP", "params", "gflops"])
    assert got == winner and why in reason


def test_control_summary_has_every_key_and_the_exact_delta():
    searched = {**rec(7, 3, 2, 61.25, lineage=300), "latency": 12.5, "memory": 80.0}
    control = {**rec("control", None, -1, 60.5, iters=300, lineage=300), "latency": 10.0, "memory": 70.0}
    serial_ctrl = {**rec("control", None, -1, 55.0, iters=20), "best": 2, "planned_iters": 20, "generations": 2}
    s = control_summary(searched, control, {"serial": serial_ctrl}, ["mAP", "params"],
                        {"serial": [rec(2, 0, 1, 56.5, lineage=20)]})
    keys = {"id", "desc", "mAP", "AP50", "params", "gflops", "latency", "memory", "iterations", "weights"}
    assert set(s["searched"]) == set(s["control"]) == keys
    assert s["delta_mAP"] == 61.25 - 60.5 and s["searched"]["iterations"] == s["control"]["iterations"] == 300
    assert s["winner"] == "searched" and s["objectives"] == ["mAP", "params"]
    assert s["phases"]["serial"]["delta_mAP"] == 56.5 - 55.0
    assert s["phases"]["serial"]["searched"]["iterations"] == s["phases"]["serial"]["control"]["iterations"] == 20


def test_compute_counts_every_training_once():
    recs = [rec(0, None, -1, 40, iters=None), rec(1, 0, 0, 45, iters=12), rec(2, 0, 0, 44, iters=8)]
    ctrl = rec("control", None, -1, 43, iters=12)
    ph = phase_compute(recs, ctrl)
    assert ph == {"iterations": 20, "images": 80, "train_seconds": 3.0,
                  "control": {"iterations": 12, "images": 48, "train_seconds": 1.0}}
    run = run_compute({"serial": {"compute": ph, "seconds": 9.0}, "fine_tune": {"records": [rec(0, None, -1, 40)],
                                                                                 "seconds": 4.0}}, 13.5)
    assert run["search"] == {"iterations": 30, "images": 120} and run["controls"] == {"iterations": 12, "images": 48}
    assert run["phases"]["serial"]["seconds"] == 9.0 and run["seconds"] == 13.5


def test_pareto_plot_covers_no_point_with_a_label_or_the_legend():
    import matplotlib.pyplot as plt
    # a crowded phase: seeds and candidates close together, two of them on the same spot
    records = [rec(i, None if i < 2 else 0, -1 if i < 2 else 0, 50 + (i % 4) * 0.3, params=4_800_000 + (i % 5) * 20_000)
               for i in range(14)]
    records.append(rec(14, 0, 1, 10.0, status="failed"))
    control = rec("control", None, -1, 50.4, params=4_810_000)
    fig, ax, layout = pareto_figure(records, [0, 3, 7], "serial", control=control)
    try:
        assert len(layout["labels"]) == 14 + 1  # every ok record and the control labelled
        assert layout["legend"].x0 >= layout["axes"].x1  # the legend sits outside the axes
        labels, points = layout["labels"], layout["points"]
        for i, box in enumerate(labels):
            assert not any(box.overlaps(p) for p in points), f"label {i} covers a point"
            assert not any(box.overlaps(other) for j, other in enumerate(labels) if j != i), f"label {i} covers a label"
        assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "equal-budget control"
    finally:
        plt.close(fig)


def test_control_summary_counts_the_candidates_that_beat_the_phase_seed():
    """The hard demo's case: every candidate below the seed as it came (the front never left it),
    said as such; a phase where some candidates beat the best seed counts them exactly."""
    from spnas.orchestration.reports import report_markdown, seed_line
    searched, control = rec(0, None, -1, 32.5, lineage=240), rec("control", None, -1, 32.5, iters=240)
    ctrl = {**rec("control", None, -1, 23.4, iters=60), "best": 3, "planned_iters": 60, "generations": 1}
    serial = [rec(0, None, -1, 23.86), rec(1, 0, 0, 19.15), rec(2, 0, 0, 20.36), rec(3, 0, 1, 20.73),
              rec(4, 0, 1, 2.45), rec(5, 0, 1, 99.0, status="failed")]
    parallel = [rec(0, None, -1, 40.0), rec(9, None, -1, 41.0), rec(1, 0, 0, 41.0), rec(2, 9, 0, 41.5),
                rec(3, 9, 1, 43.0)]
    s = control_summary(searched, control, {"serial": ctrl, "parallel": {**ctrl, "best": 3}}, ["mAP", "params"],
                        {"serial": serial, "parallel": parallel})
    assert s["phases"]["serial"]["seed"] == {"id": 0, "mAP": 23.86}
    assert (s["phases"]["serial"]["candidates"], s["phases"]["serial"]["beat_seed"]) == (4, 0)
    assert s["phases"]["parallel"]["seed"] == {"id": 9, "mAP": 41.0}
    assert (s["phases"]["parallel"]["candidates"], s["phases"]["parallel"]["beat_seed"]) == (3, 2)  # 41.0 is a tie
    assert seed_line(s["phases"]["serial"], "mAP").startswith("no candidate of 4 beat the best seed (mAP 23.86)")
    assert seed_line(s["phases"]["parallel"], "mAP") == "2 of 3 candidate(s) beat the best seed (mAP 41.00)"
    text = report_markdown({"serial": serial}, searched, s)
    assert "  - no candidate of 4 beat the best seed (mAP 23.86)" in text
