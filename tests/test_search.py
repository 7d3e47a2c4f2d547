"""SpNasS / SpNasP search: operators, sampling, Pareto front, state, determinism ."""
from __future__ import annotations

import copy
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from spnas.models import cost as spm
from spnas.models.cost import stage_pass_gflops
from spnas.models.encoding import Bounds, check_bounds, parse_serial
from spnas.models.inherit import align_blocks
from spnas.search import (
    Rejected,
    SearchError,
    SearchSettings,
    add_stage,
    choose_serial_op,
    expand,
    front,
    is_done,
    mutate_parallel,
    mutate_serial,
    new_state,
    objective_values,
    pareto_front,
    propose,
    records,
    stage_sampling_probabilities,
    swap,
    swap_moves,
    update,
    width,
    width_moves,
)
from spnas.utils.errors import ConfigError

SIZE = 128          # flops_size for every test: small and fast


def small_desc(code: str = "11-21-21-21", neck: list[int] | None = None, **extra) -> dict:
    return {"num_classes": 3, "backbone": {"code": code, "block": "basic", "base_channels": 16},
            "neck": {"code": neck, "out_channels": 32}, **extra}


def seed_of(code: str = "11-21-21-21", mAP: float = 35.0, neck: list[int] | None = None,
            weights: str = "s3://b/model_0.pth", **extra) -> dict:
    return {"desc": small_desc(code, neck, **extra), "metrics": {"mAP": mAP}, "weights": weights}


def serial_settings(**kw) -> SearchSettings:
    base = dict(min_blocks=4, max_blocks=16, max_stages=5, flops_size=SIZE)
    base.update(kw)
    return SearchSettings("SpNasS", **base)


def parallel_settings(**kw) -> SearchSettings:
    base = dict(flops_size=SIZE)
    base.update(kw)
    return SearchSettings("SpNasP", **base)


def blocks_peak(peak: int = 12):
    """Fake serial evaluator: mAP = 40 - |blocks - peak| (optimum 40 at ``peak`` blocks)."""
    def ev(c: dict) -> dict:
        n = parse_serial(c["desc"]["backbone"]["code"]).num_blocks
        return {"id": c["id"], "status": "ok", "metrics": {"mAP": 40.0 - abs(n - peak)},
                "weights": f"s3://b/model_{c['id']}.pth", "inherited": 10, "fresh": 2}
    return ev


def stage2_passes(c: dict) -> dict:
    """Fake parallel evaluator: mAP = 30 + 2 * passes on stage 2 (optimum 36 at 3 passes)."""
    k = c["desc"]["neck"]["code"]
    return {"id": c["id"], "status": "ok", "metrics": {"mAP": 30.0 + 2 * k[2]}, "weights": f"w{c['id']}"}


def run_search(state: dict, evaluate, max_rounds: int = 100) -> tuple[dict, list[list[dict]]]:
    rounds = []
    while not is_done(state):
        state, cands = propose(state)
        rounds.append(cands)
        state = update(state, [evaluate(c) for c in cands])
        assert len(rounds) <= max_rounds
    return state, rounds


def random_code(rng: random.Random, stages: int, max_len: int = 4) -> str:
    out = []
    for s in range(stages):
        n = rng.randint(1, max_len)
        out.append("".join("2" if (j == 0 and s > 0 and rng.random() < 0.7) else "1" for j in range(n)))
    return "-".join(out)


# ----------------------------------------------------------------------------- operators

@pytest.mark.parametrize("a,e,w", [(0.05, 0.3, 0.2), (0.2, 0.6, 0.5), (0.0, 1.0, 0.3), (0.1, 0.3, 0.0)])
def test_operator_rates_match_settings(a, e, w):
    s = serial_settings(add_stage_ratio=a, expand_ratio=e, width_ratio=w, max_stages=6)
    n = 20000
    rng = random.Random(1)
    hist = Counter(choose_serial_op(rng, 4, s) for _ in range(n))
    assert set(hist) <= {"add_stage", "expand", "width", "swap"}
    assert abs(hist["add_stage"] / n - a) < 0.012
    assert abs(hist["expand"] / n - (1 - a) * e) < 0.012
    assert abs(hist["width"] / n - (1 - a) * (1 - e) * w) < 0.012
    assert abs(hist["swap"] / n - (1 - a) * (1 - e) * (1 - w)) < 0.012
    if w == 0:
        assert hist["width"] == 0
    # at max_stages add-stage is never drawn; expand/width/swap split by expand_ratio and width_ratio alone
    hist = Counter(choose_serial_op(rng, 6, s) for _ in range(n))
    assert hist["add_stage"] == 0
    assert abs(hist["expand"] / n - e) < 0.012
    assert abs(hist["width"] / n - (1 - e) * w) < 0.012


def test_expand_inserts_one_block_after_stage_start():
    rng = random.Random(2)
    for _ in range(500):
        parent = random_code(rng, rng.randint(1, 6))
        child = expand(parent, rng)
        p, c = parse_serial(parent), parse_serial(child)
        assert c.num_blocks == p.num_blocks + 1 and c.num_stages == p.num_stages
        changed = [i for i in range(p.num_stages) if p.stages[i] != c.stages[i]]
        assert len(changed) == 1
        old, new = p.stages[changed[0]], c.stages[changed[0]]
        assert new[0] == old[0]
        assert any(new[pos] == "1" and new[:pos] + new[pos + 1:] == old for pos in range(1, len(new)))
        align_blocks(parent, child)


@pytest.mark.parametrize("max_shift", [1, 2, 3])
def test_swap_keeps_blocks_and_stage_count_and_moves_one_boundary(max_shift):
    rng = random.Random(3)
    shifts: Counter = Counter()
    for _ in range(500):
        parent = random_code(rng, rng.randint(2, 6))
        child = swap(parent, rng, max_shift)
        p = parse_serial(parent)
        if child is None:
            assert all(len(s) == 1 for s in p.stages) and swap_moves(parent, max_shift) == []
            continue
        c = parse_serial(child)
        assert c.blocks == p.blocks and c.num_stages == p.num_stages
        assert all(c.stages)
        diffs = [len(cs) - len(ps) for ps, cs in zip(p.stages, c.stages, strict=False)]
        moved = [i for i, d in enumerate(diffs) if d]
        assert len(moved) == 2 and moved[1] == moved[0] + 1 and diffs[moved[0]] == -diffs[moved[1]]
        assert 1 <= abs(diffs[moved[0]]) <= max_shift
        shifts[-diffs[moved[0]]] += 1       # the boundary's move: negative = to the left
        assert align_blocks(parent, child) == {i: i for i in range(p.num_blocks)}
    assert set(shifts) == {d for d in range(-max_shift, max_shift + 1) if d}
    assert swap("1-1-1-1", rng, max_shift) is None


def test_swap_moves_enumerated_exactly():
    assert swap_moves("111-2111", 2) == [(0, -2), (0, -1), (0, 1), (0, 2)]
    assert swap_moves("111-2111", 1) == [(0, -1), (0, 1)]
    assert swap_moves("111-2111", 8) == [(0, -2), (0, -1), (0, 1), (0, 2), (0, 3)]
    assert swap_moves("1-21-211", 2) == [(0, 1), (1, -1), (1, 1), (1, 2)]
    assert swap_moves("1-1-1", 3) == []
    rng = random.Random(0)
    children = {swap("111-2111", random.Random(k), 2) for k in range(200)}
    assert children == {"1-112111", "11-12111", "1112-111", "11121-11"}
    # uniform over the valid (boundary, shift) pairs: every boundary move equally likely
    n = 24000
    hist = Counter(swap("1-21-211", rng, 2) for _ in range(n))
    expected = {"12-1-211", "1-2-1211", "1-212-11", "1-2121-1"}
    assert set(hist) == expected
    for code in expected:
        assert abs(hist[code] / n - 0.25) < 0.012, (code, hist[code])
    # no empty stage ever, for any shift bound
    for _ in range(2000):
        parent = random_code(rng, rng.randint(2, 6))
        child = swap(parent, rng, rng.randint(1, 8))
        assert child is None or all(parse_serial(child).stages)


def test_width_moves_one_two_by_one_block():
    assert width_moves("11-21") == [(2, -1), (2, 1)]
    assert width_moves("12-2") == [(1, -1)]
    assert width_moves("11-11") == [] and width("11-11", random.Random(0)) is None
    assert width_moves("22-22") == [] and width("2-2", random.Random(0)) is None
    assert {width("11-21", random.Random(k)) for k in range(100)} == {"12-11", "11-12"}
    rng = random.Random(5)
    for _ in range(1000):
        parent = random_code(rng, rng.randint(1, 6))
        child = width(parent, rng)
        p = parse_serial(parent)
        if child is None:
            assert width_moves(parent) == []
            continue
        c = parse_serial(child)
        assert [len(x) for x in c.stages] == [len(x) for x in p.stages]      # stages and block count kept
        assert c.blocks.count("2") == p.blocks.count("2")
        changed = [i for i in range(p.num_blocks) if p.blocks[i] != c.blocks[i]]
        assert len(changed) == 2 and changed[1] == changed[0] + 1            # one '2' moved by one block
        wide = [i for i, (x, y) in enumerate(zip(p.width_multipliers(), c.width_multipliers(), strict=True)) if x != y]
        assert wide == changed[:1]                                          # only the block in between changes width
        assert align_blocks(parent, child) == {i: i for i in range(p.num_blocks)}


def test_add_stage_appends_one_plain_block_stage():
    assert add_stage("11-21-21-21") == "11-21-21-21-1"
    c = parse_serial(add_stage("111-2111-211111-211"))
    assert c.num_stages == 5 and c.stages[-1] == "1"
    assert c.width_multipliers()[-1] == c.width_multipliers()[-2]   # same width


def test_mutate_serial_respects_max_stages_and_derivability():
    s = serial_settings(add_stage_ratio=0.4, expand_ratio=0.4, width_ratio=0.5, max_stages=5, num_mutate=3,
                        max_swap_shift=3)
    rng = random.Random(4)
    op_counts: Counter = Counter()
    for _ in range(2000):
        parent = random_code(rng, rng.randint(4, 5))
        try:
            child, ops = mutate_serial(parent, rng, s)
        except Rejected as rej:  # the only rejections here: a swap or width move that cannot happen
            assert rej.reason in ("no possible swap", "no possible width move")
            continue
        op_counts.update(ops)
        assert 1 <= len(ops) <= 3
        c, p = parse_serial(child), parse_serial(parent)
        assert c.num_stages <= 5
        assert c.num_stages == p.num_stages + ops.count("add_stage")
        assert c.num_blocks == p.num_blocks + ops.count("add_stage") + ops.count("expand")
        assert c.blocks.count("2") == p.blocks.count("2")
        mapping = align_blocks(parent, child)
        assert sorted(mapping.values()) == list(range(p.num_blocks))
    assert set(op_counts) == {"add_stage", "expand", "width", "swap"}


# ----------------------------------------------------------------------------- Pareto front

def test_pareto_front_hand_made():
    pts = [
        {"mAP": 30, "params": 10},   # 0 front
        {"mAP": 32, "params": 20},   # 1 front
        {"mAP": 31, "params": 25},   # 2 dominated by 1
        {"mAP": 30, "params": 10},   # 3 duplicate of 0: front too
        {"mAP": 29, "params": 10},   # 4 tie on params, worse mAP: dominated by 0
        {"mAP": 35, "params": 40},   # 5 front
        {"mAP": 35, "params": 41},   # 6 tie on mAP, more params: dominated by 5
    ]
    assert pareto_front(pts, ("mAP", "params")) == [0, 1, 3, 5]
    assert pareto_front(pts, ["mAP"]) == [5, 6]
    assert pareto_front(pts, ["params"]) == [0, 3, 4]
    assert pareto_front([], ("mAP", "params")) == []
    three = [{"mAP": 1, "params": 1, "gflops": 5}, {"mAP": 1, "params": 1, "gflops": 4},
             {"mAP": 2, "params": 3, "gflops": 9}]
    assert pareto_front(three, ("mAP", "params", "flops")) == [1, 2]
    with pytest.raises(SearchError, match="params"):
        pareto_front([{"mAP": 1}], ("mAP", "params"))


# ----------------------------------------------------------------------------- SpNasP sampling

def test_stage_pass_cost_is_the_measured_gflops_of_one_more_pass():
    desc = small_desc("111-21-2-21", [0, 1, 0, 0])
    costs = stage_pass_gflops(desc, SIZE)
    base = spm.gflops(desc, SIZE)
    for s in range(4):
        more = small_desc("111-21-2-21", [0, 1, 0, 0])
        more["neck"]["code"][s] += 1
        assert math.isclose(spm.gflops(more, SIZE) - base, costs[s], rel_tol=1e-9)
    assert len(set(costs)) >= 3   # the stages really differ in cost


def test_flops_inverse_sampling_frequencies():
    desc = small_desc("111-21-2-21", [0, 3, 0, 1])
    s = parallel_settings(num_mutate=1, max_per_stage=3)
    costs = stage_pass_gflops(desc, SIZE)
    probs = stage_sampling_probabilities(desc, s)
    inv = [0.0 if k >= 3 else 1 / c for c, k in zip(costs, [0, 3, 0, 1], strict=False)]
    expected = [w / sum(inv) for w in inv]
    assert probs == pytest.approx(expected, rel=1e-12)
    assert probs[1] == 0.0 and math.isclose(sum(probs), 1.0)
    rng = random.Random(5)
    n = 20000
    hist = Counter()
    for _ in range(n):
        code, ops = mutate_parallel(desc, rng, s)
        (stage,) = [int(o.split(":")[1]) for o in ops]
        assert code[stage] == [0, 3, 0, 1][stage] + 1
        hist[stage] += 1
    assert hist[1] == 0
    for st in range(4):
        assert abs(hist[st] / n - expected[st]) < 0.015
    full = small_desc("111-21-2-21", [3, 3, 3, 3])
    assert stage_sampling_probabilities(full, s) == [0.0] * 4


# ----------------------------------------------------------------------------- search runs

@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_serial_search_sanity(seed):
    s = serial_settings(max_sample=22, candidates_per_round=4, expand_ratio=0.5, seed=seed)
    state = new_state(s, [seed_of("11-21-21-21")])
    state, rounds = run_search(state, blocks_peak(12))
    recs = records(state)
    cands = [r for r in recs if r["round"] >= 0]
    assert len(cands) == 22 and [len(r) for r in rounds] == [4, 4, 4, 4, 4, 2]
    assert [r["id"] for r in recs] == list(range(23))
    codes = [r["desc"]["backbone"]["code"] for r in recs]
    assert len(set(codes)) == len(codes)
    by_id = {r["id"]: r for r in recs}
    for r in cands:
        code = parse_serial(r["desc"]["backbone"]["code"])
        check_bounds(code, r["desc"]["neck"]["code"], Bounds(4, 16, 4, 5))
        assert r["desc"]["neck"]["code"] == [0] * code.num_stages
        parent = by_id[r["parent"]]
        assert parent["round"] < r["round"]               # parents come from earlier results
        assert r["parent_desc"] == parent["desc"] and r["parent_weights"] == parent["weights"]
        align_blocks(parent["desc"]["backbone"]["code"], code)   # derivable from its parent's code
        assert r["params"] == spm.params(r["desc"])["total"]
        assert r["status"] == "ok" and r["inherited"] == 10 and r["fresh"] == 2
    top = front(state)
    assert max(r["metrics"]["mAP"] for r in top) == 40.0
    assert any(parse_serial(r["desc"]["backbone"]["code"]).num_blocks == 12 for r in top)
    pts = [{"mAP": r["metrics"]["mAP"], "params": r["params"]} for r in recs]
    assert [r["id"] for r in top] == [recs[i]["id"] for i in pareto_front(pts, ("mAP", "params"))]
    assert propose(state)[1] == []


@pytest.mark.slow
def test_parallel_search_sanity():
    s = parallel_settings(max_sample=24, objective_keys=("mAP", "flops"), seed=0)
    assert s.objective_keys == ("mAP", "gflops")
    state = new_state(s, [seed_of("11-21-21-21", mAP=30.0)])
    state, rounds = run_search(state, stage2_passes)
    recs = records(state)
    cands = [r for r in recs if r["round"] >= 0]
    assert len(cands) == 24
    keys = [(r["desc"]["backbone"]["code"], tuple(r["desc"]["neck"]["code"])) for r in recs]
    assert len(set(keys)) == len(keys)
    by_id = {r["id"]: r for r in recs}
    for r in cands:
        parent = by_id[r["parent"]]
        k, pk = r["desc"]["neck"]["code"], parent["desc"]["neck"]["code"]
        assert r["desc"]["backbone"] == parent["desc"]["backbone"]          # serial code kept
        assert all(a >= b for a, b in zip(k, pk, strict=False)) and 1 <= sum(k) - sum(pk) <= 3 == s.num_mutate
        assert sum(k) - sum(pk) == len(r["ops"]) and max(k) <= 3
        assert math.isclose(r["gflops"], spm.gflops(r["desc"], SIZE))
    top = front(state)
    assert max(r["metrics"]["mAP"] for r in top) == 36.0
    assert any(r["desc"]["neck"]["code"][2] == 3 for r in top)


def test_spnasp_ignores_serial_bounds_of_the_serial_phase():
    # a 4-block serial network (as the demo's serial phase yields) under default min_blocks=8
    s = SearchSettings("SpNasP", max_sample=3, max_per_stage=2, flops_size=SIZE)
    state, cands = propose(new_state(s, [seed_of("1-2-2-2")]))
    assert len(cands) == 3 and all(c["desc"]["backbone"]["code"] == "1-2-2-2" for c in cands)
    assert all(max(c["desc"]["neck"]["code"]) <= 2 for c in cands)


def test_failed_candidates_are_recorded_and_search_goes_on():
    s = serial_settings(max_sample=12, seed=1)
    ok = blocks_peak(12)

    def ev(c):
        if c["id"] % 3 == 0:
            # a failure that also reports a tempting metric must still never reach the front
            return {"id": c["id"], "status": "failed", "metrics": {"mAP": 99.0}, "error": "CUDA out of memory"}
        if c["id"] == 4:
            return {**ok(c), "metrics": {"mAP": float("nan")}}
        return ok(c)

    state, _ = run_search(new_state(s, [seed_of()]), ev)
    recs = records(state)
    failed = [r for r in recs if r["status"] == "failed"]
    assert [r["id"] for r in failed] == [3, 4, 6, 9, 12]
    assert failed[0]["error"] == "CUDA out of memory" and "non-finite" in failed[1]["error"]
    assert len([r for r in recs if r["round"] >= 0]) == 12
    top_ids = {r["id"] for r in front(state)}
    assert not top_ids & {r["id"] for r in failed}
    assert all(r["parent"] not in {f["id"] for f in failed} for r in recs if r["round"] >= 0)


def test_budget_respected_by_every_proposal():
    seed = seed_of()
    p0 = spm.params(seed["desc"])["total"]
    g0 = spm.gflops(seed["desc"], SIZE)
    s = serial_settings(max_sample=10, add_stage_ratio=0.3, max_params=p0 + 40000, max_gflops=g0 * 1.3, seed=2)
    state, _ = run_search(new_state(s, [seed]), blocks_peak(12))
    cands = [r for r in records(state) if r["round"] >= 0]
    assert len(cands) == 10
    for r in cands:
        assert r["params"] == spm.params(r["desc"])["total"] <= p0 + 40000
        assert r["gflops"] <= g0 * 1.3


def test_redraw_exhaustion_raises_clear_error():
    s = serial_settings(min_blocks=4, max_blocks=4, max_stages=4, max_redraws=7)
    state = new_state(s, [seed_of("1-1-1-1")])
    with pytest.raises(SearchError, match=r"could not find a valid new child after 7 draws"):
        propose(state)
    # dedup exhaustion: with at most 1 extra pass per stage and 1..3 passes per child, the seed
    # [0, 0, 0, 0] has exactly 4 + 6 + 4 = 14 distinct children
    p = parallel_settings(max_per_stage=1, max_sample=20, max_redraws=300)
    state = new_state(p, [seed_of()])
    state, cands = propose(state, k=14)
    assert len({tuple(c["desc"]["neck"]["code"]) for c in cands}) == 14
    with pytest.raises(SearchError, match=r"after 300 draws: 300 duplicate .* 14 candidate\(s\) proposed"):
        propose(state, k=1)


def test_spnass_child_neck_is_zero_and_seed_only_keys_dropped():
    s = serial_settings(max_sample=4, add_stage_ratio=0.5, seed=3)
    seed = seed_of(neck=[1, 0, 0, 2], convert_pretrained=True, freeze_swap_keys=True)
    state, cands = propose(new_state(s, [seed]))
    for c in cands:
        n = parse_serial(c["desc"]["backbone"]["code"]).num_stages
        assert c["desc"]["neck"]["code"] == [0] * n
        assert "convert_pretrained" not in c["desc"] and c["desc"]["freeze_swap_keys"] is True
        assert c["parent"] == 0 and c["parent_weights"] == "s3://b/model_0.pth" and c["round"] == 0


# ----------------------------------------------------------------------------- state contract

def test_propose_update_contract():
    s = serial_settings(max_sample=5, candidates_per_round=4)
    state = new_state(s, [seed_of(), seed_of("11-21-211-21", mAP=36.0, weights="w1")])
    recs = records(state)
    assert [(r["id"], r["status"], r["round"], r["parent"]) for r in recs] == [(0, "ok", -1, None), (1, "ok", -1, None)]
    before = copy.deepcopy(state)
    st1, cands = propose(state)
    assert state == before                                       # input not mutated
    assert [c["id"] for c in cands] == [2, 3, 4, 5]
    assert set(cands[0]) == {"id", "round", "desc", "parent", "parent_desc", "parent_weights", "ops",
                             "params", "gflops", "memory", "latency"}
    assert cands[0]["memory"] is None and cands[0]["latency"] is None  # measured only when needed
    assert all(r["status"] == "pending" for r in records(st1) if r["id"] >= 2)
    assert not is_done(st1)
    st2, more = propose(st1, k=10)                               # capped at max_sample
    assert [c["id"] for c in more] == [6] and more[0]["round"] == 1
    st3, none = propose(st2)
    assert none == [] and not is_done(st3)                       # pending candidates remain
    with pytest.raises(SearchError, match="unknown candidate id 99"):
        update(st3, [{"id": 99, "status": "ok", "metrics": {"mAP": 1.0}}])
    with pytest.raises(SearchError, match="not pending"):
        update(st3, [{"id": 0, "status": "ok", "metrics": {"mAP": 1.0}}])
    with pytest.raises(SearchError, match="status"):
        update(st3, [{"id": 2, "status": "done", "metrics": {"mAP": 1.0}}])
    with pytest.raises(SearchError, match="mAP"):
        update(st3, [{"id": 2, "status": "ok", "metrics": {"AP50": 1.0}}])
    with pytest.raises(SearchError, match="unknown key"):
        update(st3, [{"id": 2, "status": "ok", "metrics": {"mAP": 1.0}, "colour": "red"}])
    st4 = update(st3, [{"id": 2, "status": "ok", "metrics": {"mAP": 1.0}, "weights": "w2"}])
    with pytest.raises(SearchError, match="not pending"):
        update(st4, [{"id": 2, "status": "ok", "metrics": {"mAP": 2.0}}])
    st5 = update(st4, [{"id": float(i), "status": "failed", "error": "boom", "metrics": None} for i in (3, 4, 5, 6)])
    assert is_done(st5)
    assert [r["status"] for r in records(st5)][2:] == ["ok", "failed", "failed", "failed", "failed"]


def test_json_round_trip_mid_search_gives_identical_proposals():
    s = serial_settings(max_sample=16, seed=7)
    ev = blocks_peak(11)
    state = new_state(s, [seed_of()])
    for _ in range(2):
        state, cands = propose(state)
        state = update(state, [ev(c) for c in cands])
    reloaded = json.loads(json.dumps(state))
    a, ra = run_search(state, ev)
    b, rb = run_search(reloaded, ev)
    assert ra == rb and len(ra) == 2
    assert records(a) == records(b)


@pytest.mark.slow
def test_same_seed_same_proposals_different_seed_different():
    def codes(seed: int, alg: str) -> list:
        if alg == "SpNasS":
            s, ev = serial_settings(max_sample=12, seed=seed), blocks_peak(12)
        else:
            s, ev = parallel_settings(max_sample=12, seed=seed), stage2_passes
        state, _ = run_search(new_state(s, [seed_of()]), ev)
        return [(r["parent"], r["ops"], r["desc"]["backbone"]["code"], r["desc"]["neck"]["code"])
                for r in records(state)]

    for alg in ("SpNasS", "SpNasP"):
        assert codes(11, alg) == codes(11, alg)
        assert codes(11, alg) != codes(12, alg)


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("field,value,extra", [
    ("add_stage_ratio", 1.5, {}), ("expand_ratio", -0.1, {}), ("max_sample", 0, {}),
    ("min_blocks", 70, {}), ("min_stages", 7, {}), ("objective_keys", ("mAP", "energy"), {}),
    ("algorithm", "SpNasX", {}), ("num_mutate", 0, {}), ("max_redraws", 0, {}), ("flops_size", 16, {}),
    ("max_gflops", -1.0, {}), ("max_params", 0, {}), ("candidates_per_round", 2.5, {}),
    ("max_per_stage", 0, {"algorithm": "SpNasP"}), ("max_stages", 9, {}),
    ("max_swap_shift", 0, {}), ("max_swap_shift", 9, {}), ("max_swap_shift", 1.5, {}), ("max_swap_shift", True, {}),
    ("width_ratio", 1.01, {}), ("width_ratio", -0.5, {}), ("width_ratio", "0.2", {}),
    ("refresh_seeds", "yes", {}), ("refresh_seeds", 1, {}),
])
def test_settings_validation_names_the_field(field, value, extra):
    kw = {"algorithm": "SpNasS", **extra, field: value}
    with pytest.raises(ConfigError, match=field):
        SearchSettings(**kw)


def test_settings_normalisation():
    s = SearchSettings("spnasp", max_sample=20.0, objective_keys=["mAP", "flops"], max_params=1e6)
    assert s.algorithm == "SpNasP" and s.max_sample == 20 and isinstance(s.max_sample, int)
    assert s.objective_keys == ("mAP", "gflops") and s.max_params == 1000000
    assert (s.max_swap_shift, s.width_ratio) == (2, 0.2)                  # the defaults
    k = SearchSettings("SpNasS", max_swap_shift=3.0, width_ratio=1)       # KFP delivers numbers as floats
    assert k.max_swap_shift == 3 and isinstance(k.max_swap_shift, int) and k.width_ratio == 1.0
    assert SearchSettings.from_dict(k.to_dict()) == k
    with pytest.raises(SearchError, match="at least one seed"):
        new_state(s, [])
    with pytest.raises(SearchError, match="mAP"):
        new_state(s, [{"desc": small_desc(), "metrics": {}, "weights": None}])


def test_latency_is_a_measured_objective():
    s = SearchSettings("SpNasS", objective_keys=["mAP", "latency_ms"])
    assert s.objective_keys == ("mAP", "latency") and s.needs_latency and not s.needs_memory
    pts = [{"mAP": 50.0, "latency": 10.0}, {"mAP": 55.0, "latency": 12.0}, {"mAP": 54.0, "latency": 13.0}]
    assert pareto_front(pts, s.objective_keys) == [0, 1]
    rec = {"metrics": {"mAP": 50.0, "latency": 999.0}, "latency": 10.0, "params": 1, "gflops": 1.0}
    assert objective_values(rec, s.objective_keys) == {"mAP": 50.0, "latency": 10.0}  # the search's own measure


def test_default_objectives_by_algorithm():
    assert SearchSettings("SpNasS").objective_keys == ("mAP", "params")
    assert SearchSettings("SpNasP").objective_keys == ("mAP", "gflops")  # passes cost FLOPs, not params


def test_memory_objective_and_budget():
    """Memory is the deterministic training-memory estimate, measured for every proposal; the
    budget rejects children over it."""
    seed = seed_of()
    m0 = spm.train_memory_mb(seed["desc"], SIZE, 2)
    s = serial_settings(max_sample=8, objective_keys=["mAP", "memory"], memory_batch=2, max_memory_mb=m0 * 1.15,
                        add_stage_ratio=0.3, expand_ratio=0.6, seed=1)
    state, _ = run_search(new_state(s, [seed]), blocks_peak(12))
    recs = records(state)
    assert recs[0]["memory"] == m0 and all(r["latency"] is None for r in recs)
    cands = [r for r in recs if r["round"] >= 0]
    assert len(cands) == 8
    for r in cands:
        assert r["memory"] == spm.train_memory_mb(r["desc"], SIZE, 2) <= m0 * 1.15
    # a deeper code needs more memory: the estimate orders architectures
    assert spm.train_memory_mb(small_desc("111-211-21-21"), SIZE, 2) > m0
    assert spm.train_memory_mb(seed["desc"], SIZE, 4) > m0


def test_latency_budget_rejects_slow_children(monkeypatch):
    """Latency is measured once per proposal (here a deterministic fake: 10 ms per GFLOP) and the
    budget rejects every child above it."""
    from spnas.models import cost
    monkeypatch.setattr(cost, "detector_latency_ms", lambda desc, size, **kw: round(10 * cost.gflops(desc, size), 6))
    seed = seed_of()
    l0 = 10 * spm.gflops(seed["desc"], SIZE)
    s = parallel_settings(max_sample=6, max_latency_ms=l0 * 1.3, seed=3)
    state, _ = run_search(new_state(s, [seed]), blocks_peak(12))
    recs = records(state)
    assert recs[0]["latency"] == pytest.approx(l0)
    cands = [r for r in recs if r["round"] >= 0]
    assert len(cands) == 6 and all(r["latency"] <= l0 * 1.3 for r in cands)
    assert all(r["latency"] == pytest.approx(10 * spm.gflops(r["desc"], SIZE)) for r in cands)


def test_kfp_update_stops_when_every_candidate_of_a_round_failed(tmp_path):
    """The Kubeflow update step applies the same rule as ``spnas run``: one success is enough to
    go on; a round with no success stops with every failure listed."""
    from spnas.orchestration import pods as remote
    from spnas.utils.errors import PhaseError
    run = str(tmp_path / "run")
    proposal = remote.propose(new_state(serial_settings(candidates_per_round=2), [seed_of()]), None, run, "serial")
    ids = [c["id"] for c in json.loads(Path(proposal).read_text())["candidates"]]
    failed = [{"id": i, "status": "failed", "error": f"NonFiniteLossError: loss nan at step {i}"} for i in ids]
    with pytest.raises(PhaseError, match="serial round 0: every candidate failed: candidate 1: NonFiniteLossError: "
                                         "loss nan at step 1; candidate 2: NonFiniteLossError: loss nan at step 2"):
        remote.update(proposal, failed, "serial", run)
    ok = [{**failed[0], "status": "ok", "error": None, "metrics": {"mAP": 36.0}, "weights": "w1"}, failed[1]]
    state = json.loads(Path(remote.update(proposal, ok, "serial", run)).read_text())
    assert [r["status"] for r in state["records"]] == ["ok", "ok", "failed"]


def test_plateau_trigger_fires_at_most_max_reignitions_times():
    """A fake evaluator with a known plateau: every child scores the seed's mAP, so the front's
    best never improves. With patience 1 the trigger fires after every stale round until
    max_reignitions is used up; reignited models join the front as children of their originals."""
    from spnas.search import add_reignited, plateau
    s = serial_settings(max_sample=10, candidates_per_round=2, reignition_patience=1, max_reignitions=2, seed=4)
    state = new_state(s, [seed_of(mAP=35.0)])
    assert not plateau(state)  # nothing stale yet
    fired, rounds = [], 0
    while not is_done(state):
        state, cands = propose(state)
        rounds += 1
        state = update(state, [{"id": c["id"], "status": "ok", "metrics": {"mAP": 35.0}, "weights": f"w{c['id']}"}
                               for c in cands])
        if plateau(state):
            top = max(front(state), key=lambda r: r["metrics"]["mAP"])
            state = add_reignited(state, [{"id": top["id"], "metrics": {"mAP": 35.0 + len(fired) + 0.5},
                                           "weights": f"re{top['id']}.pth", "reignition": {"kept": "after"}}])
            fired.append((rounds, top["id"]))
    assert rounds == 5 and len(fired) == 2           # at most max_reignitions, although every round was stale
    assert [r for r, _ in fired] == [1, 2]             # patience 1: right after the first stale rounds
    re_ = [r for r in records(state) if r["ops"] == ["reignite"]]
    assert [r["parent"] for r in re_] == [i for _, i in fired] and all(r["status"] == "ok" for r in re_)
    assert re_[0]["metrics"]["mAP"] == 35.5 and re_[0]["weights"] == f"re{fired[0][1]}.pth"
    assert re_[-1]["id"] in {r["id"] for r in front(state)}  # the better reignited model leads the front
    assert state["plateau"]["reignitions"] == 2 and not plateau(state)
    # an improving search never fires
    state = new_state(s, [seed_of(mAP=35.0)])
    while not is_done(state):
        state, cands = propose(state)
        state = update(state, [{"id": c["id"], "status": "ok", "metrics": {"mAP": 36.0 + c["id"]}, "weights": "w"}
                               for c in cands])
        assert not plateau(state)


def test_refresh_seeds_retrains_each_seed_first_and_the_refresh_stands_for_it():
    """With refresh_seeds the first candidates are the seeds unchanged (ops ["refresh"], parent
    the seed, its weights), within the round's slots and max_sample; once a refresh is ok its
    seed leaves the front and the run's best, a failed refresh leaves its seed standing."""
    from spnas.orchestration.steps import best_of
    from spnas.search.state import superseded
    s = serial_settings(max_sample=5, candidates_per_round=3, seed=2, refresh_seeds=True)
    seeds = [seed_of("11-21-21-21", 40.0, weights="s3://b/a.pth"), seed_of("1-21-21-21", 38.0, weights="s3://b/b.pth")]
    state = new_state(s, seeds)
    state, cands = propose(state)
    assert [c["ops"] for c in cands[:2]] == [["refresh"], ["refresh"]] and cands[2]["ops"] != ["refresh"]
    assert [(c["parent"], c["parent_weights"]) for c in cands[:2]] == [(0, "s3://b/a.pth"), (1, "s3://b/b.pth")]
    for c, seed in zip(cands[:2], seeds, strict=True):
        assert c["desc"]["backbone"]["code"] == seed["desc"]["backbone"]["code"] == c["parent_desc"]["backbone"]["code"]
        assert c["desc"]["neck"]["code"] == [0, 0, 0, 0]
    assert {r["id"] for r in front(state)} == {0, 1}  # nothing recorded yet: the seeds stand
    results = [{"id": cands[0]["id"], "status": "ok", "metrics": {"mAP": 37.5}, "weights": "r0.pth", "iters": 60},
               {"id": cands[1]["id"], "status": "failed", "metrics": None, "error": "killed"},
               {"id": cands[2]["id"], "status": "ok", "metrics": {"mAP": 39.0}, "weights": "c.pth", "iters": 60}]
    state = update(state, results)
    recs = records(state)
    assert superseded(recs) == {0}
    on_front = {r["id"] for r in front(state)}
    assert 0 not in on_front and cands[1]["id"] not in on_front and 1 in on_front  # seed 0 at 40.0 no longer counts
    assert best_of(recs)["id"] == cands[2]["id"]  # 39.0: the stale 40.0 of seed 0 is not the result
    state, more = propose(state)  # no second refresh, not even of seed 1 whose refresh failed
    assert len(more) == 2 and all(c["ops"] != ["refresh"] for c in more)
    assert len([r for r in records(state) if r["round"] >= 0]) == 5
    off = new_state(serial_settings(max_sample=3, candidates_per_round=3, seed=2), seeds)
    assert all(c["ops"] != ["refresh"] for c in propose(off)[1])  # off by default
