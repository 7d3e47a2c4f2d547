"""Property-based fuzzing of every parser of user input, and regression tests for what it found.

Targets: the architecture-code parsers (spnas.encoding), the run-config loader (YAML files,
structured mutations of configs/demo.yml, ``--set`` overrides) and the COCO annotation loader.
Property: any input either parses into a valid object (checked by a round trip or by
invariants) or raises the project's typed error with a message naming the input at fault;
never another exception type, never a hang. Runs are derandomized (reproducible in CI) and
sized to take well under a minute on a 2-core machine.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml
from helpers import demo, load_ann, save_ann
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from spnas.config import MAX_VALUES, RunConfig, apply_overrides, load_config
from spnas.data.coco import MAX_SIDE, load_split
from spnas.models.encoding import (
    MAX_BLOCKS,
    MAX_DOUBLINGS,
    MAX_PARALLEL_PER_STAGE,
    MAX_STAGES,
    Bounds,
    SerialCode,
    check_bounds,
    format_arch,
    normalize_block,
    parse_arch,
    parse_parallel,
    parse_serial,
)
from spnas.utils.errors import CodeError, ConfigError, DataError, SpnasError

DEMO = Path(__file__).parent.parent / "configs" / "demo.yml"
DEMO_RAW: dict = yaml.safe_load(DEMO.read_text())

#: A call taking this long is a hang: each takes milliseconds (deep YAML nesting ~1 s).
HANG_S = 30.0
#: derandomize: the same examples on every run, so CI is reproducible; no example database.
#: No per-example deadline: on a loaded machine a 1 s example can take several, and hypothesis
#: reports such a one-off as a flaky failure; :func:`no_hang` catches real hangs instead.
FUZZ = dict(derandomize=True, database=None, deadline=None, print_blob=False)


class Rejected:
    """What :func:`outcome` returns when the call raised the expected typed error."""

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.message = exc, str(exc)


class Hang(Exception):
    """A parser call ran for more than :data:`HANG_S` seconds."""


@contextlib.contextmanager
def no_hang(seconds: float = HANG_S) -> Iterator[None]:
    """Fail (rather than wait forever) when the body runs longer than ``seconds``."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"call still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn: Callable[..., Any], *args: Any, error: type = SpnasError, **kwargs: Any) -> Any:
    """``fn(...)``, or a :class:`Rejected` when it raised ``error`` (a ValueError, with a short
    message). Any other exception propagates and fails the test."""
    try:
        with no_hang():
            res = fn(*args, **kwargs)
        if currently_in_test_context():
            event(f"{fn.__name__}: accepted")
        return res
    except error as exc:
        if currently_in_test_context():
            event(f"{fn.__name__}: rejected")
        assert isinstance(exc, ValueError), f"{type(exc).__name__} is not a ValueError"
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        assert len(str(exc)) < 5000, f"message of {len(str(exc))} characters: hostile input is echoed in full"
        return Rejected(exc)


# ----------------------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-10**400, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "é", "²", "١", "../../etc/passwd", "/etc/passwd", "x" * 300, "{local_base_path}",
                     "1-2-2-2", "r_11-21_0-1", "0-1-0-0", "SGD", "SpNasS", "SpNasP", "ReignitionCallback",
                     "fine_tune.trainer", "BasicBlock", 10**30, -1, 0, 1, 2, 0.5, 1e308]))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

# ----------------------------------------------------------------------------- encoding

stages = st.lists(st.text(alphabet="1112", min_size=1, max_size=6), min_size=1, max_size=9)
near_serial = st.builds("-".join, stages)                           # mostly valid serial codes
near_parallel = st.lists(st.integers(0, 9), min_size=1, max_size=9)
near_arch = st.builds(  # <t>_<serial>[_<parallel>], the parallel part mostly one entry per stage
    lambda t, sp, sep: f"{t}_{'-'.join(sp[0])}" + (f"_{sep.join(map(str, sp[1]))}" if sp[1] else ""),
    st.sampled_from(["r", "r", "b", "x", "R", "q"]),
    stages.flatmap(lambda ss: st.tuples(st.just(ss), st.lists(st.integers(0, 9), min_size=len(ss), max_size=len(ss))
                                        | st.lists(st.integers(0, 9), max_size=9))),
    st.sampled_from(["-", ","]))
code_text = st.one_of(
    st.text(),                                                     # any unicode
    near_serial, near_arch, near_arch,
    st.builds(lambda p, sep: sep.join(map(str, p)), near_parallel, st.sampled_from(["-", ",", ", ", "-²"])),
    st.text(alphabet="12-", max_size=160),
    st.text(alphabet="12- _rbx0123456789,[]²١\t\n", max_size=60),  # near-valid arch / parallel strings
    st.builds(lambda piece, n: piece * n, st.sampled_from(["1", "2", "1-", "12-", "9", "0-", "0,", " ", "_"]),
              st.integers(0, 5000)),                               # very long strings
)


def half(likely: st.SearchStrategy, rest: st.SearchStrategy) -> st.SearchStrategy:
    """``likely`` for about half the examples (``a | b`` flattens nested one_of branches, which
    would leave ``likely`` one branch among many)."""
    return st.booleans().flatmap(lambda first: likely if first else rest)


any_code = st.one_of(code_text, json_values, near_parallel, st.lists(st.floats(0, 9), min_size=1, max_size=9),
                     st.lists(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=3)),
                              max_size=10),
                     st.tuples(st.integers(-2, 10), st.integers(-2, 10)))


@settings(max_examples=500, **FUZZ)
@given(half(near_serial, any_code))
def test_fuzz_parse_serial(code):
    res = outcome(parse_serial, code)
    if isinstance(res, Rejected):
        return
    assert isinstance(res, SerialCode) and str(res) == code.strip()
    assert parse_serial(str(res)) == res
    assert 1 <= res.num_stages <= MAX_STAGES and 1 <= res.num_blocks <= MAX_BLOCKS
    assert res.blocks.count("2") <= MAX_DOUBLINGS and set(res.blocks) <= {"1", "2"}


@settings(max_examples=500, **FUZZ)
@given(half(near_parallel, any_code), st.none() | st.integers(0, MAX_STAGES))
def test_fuzz_parse_parallel(code, num_stages):
    res = outcome(parse_parallel, code, num_stages)
    if isinstance(res, Rejected):
        return
    assert isinstance(res, tuple) and all(type(v) is int and 0 <= v <= MAX_PARALLEL_PER_STAGE for v in res)
    assert len(res) <= MAX_STAGES and (num_stages is None or len(res) == num_stages)
    assert parse_parallel(list(res), len(res)) == res
    if res:
        assert parse_parallel("-".join(map(str, res)), len(res)) == res


@settings(max_examples=500, **FUZZ)
@given(half(near_arch, any_code))
def test_fuzz_parse_arch(text):
    res = outcome(parse_arch, text)
    if isinstance(res, Rejected):
        return
    block, serial, parallel = res
    assert block in ("basic", "bottleneck", "resnext") and len(parallel) == serial.num_stages
    again = format_arch(block, serial, parallel)
    assert parse_arch(again) == res and format_arch(*parse_arch(again)) == again


@settings(max_examples=300, **FUZZ)
@given(half(st.sampled_from(["r", "BasicBlock", "bottleneck", "resnext"]), any_code), half(near_serial, any_code),
       half(near_parallel, st.one_of(any_code, st.integers(), st.builds(lambda: iter([0, 1])))))
def test_fuzz_format_arch_block_and_bounds(block, serial, parallel):
    name = outcome(normalize_block, block)
    assert isinstance(name, Rejected) or name in ("basic", "bottleneck", "resnext")
    text = outcome(format_arch, block, serial, parallel)
    if not isinstance(text, Rejected):
        assert format_arch(*parse_arch(text)) == text
    par = parallel if isinstance(parallel, (list, tuple)) else None
    res = outcome(check_bounds, serial, par, Bounds())
    if not isinstance(res, Rejected):  # accepted: the code really lies inside the bounds
        b, code = Bounds(), parse_serial(serial)
        assert b.min_blocks <= code.num_blocks <= b.max_blocks and b.min_stages <= code.num_stages <= b.max_stages
        if par is not None:
            assert max(parse_parallel(par, code.num_stages)) <= b.max_parallel_per_stage


@pytest.mark.parametrize("call, message", [
    (lambda: parse_parallel("0-²-0-0", 4), "entry '²' is not a non-negative integer"),  # was ValueError from int()
    (lambda: parse_parallel("0-" + "9" * 5000), "extra passes on one stage"),          # was ValueError (4300 digits)
    (lambda: format_arch("r", "1-1", 5), "must be a list of integers"),                # was TypeError
    (lambda: parse_serial("1" * 10**6), "1000000 characters long"),                    # refused before scanning
    (lambda: parse_parallel([0] * 9), "9 entries; a code has one per stage"),
])
def test_code_parser_regressions(call, message):
    with pytest.raises(CodeError, match=message) as info:
        call()
    assert len(str(info.value)) < 500  # the hostile value is quoted, not echoed in full


def test_format_arch_accepts_a_parallel_string():
    assert format_arch("r", "1-1", "0-1") == "r_1-1_0-1"  # was list("0-1") -> "entry '0' is not an integer"


# ----------------------------------------------------------------------------- config loader

@pytest.fixture(scope="module")
def cfg_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cfg")


def _check_run_config(cfg: RunConfig) -> None:
    """Invariants of every config that loads."""
    assert isinstance(cfg, RunConfig) and cfg.steps and Path(cfg.workdir).is_absolute()
    names = [s.name for s in cfg.steps]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", n) for n in names)
    for s in cfg.steps:
        assert s.dataset.batch_size >= 1 and s.trainer.lr > 0 and math.isfinite(s.trainer.lr)
        for p in (s.dataset.data_root, s.pretrained_model_file, s.models_folder):
            assert p is None or (isinstance(p, str) and "\x00" not in p)


hostile_yaml = st.sampled_from([
    "a: !!int x", "a: !!float abc", "a: !!timestamp 2020-13-45", "a: !!int " + "9" * 5000, "a: !!binary '%%%'",
    "a: !!float", "a: !!int _", "a: !!bool maybe", "a: !!timestamp x", "a: !!set 5", "<<: 5",
    "[" * 3000 + "]" * 3000, "a: &a [*a]\npipeline: [a]", "a: &a {b: *a}\npipeline: [a]", "? [1, 2]\n: x",
    "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7)),   # alias bomb: 10**7 values
    "pipeline: [s]\ns: {ref: s}", "pipeline: [fine_tune]\nfine_tune: {trainer: {ref: fine_tune.trainer}}",
    "!!python/object:os.system {}", "pipeline: [../../x]\n../../x: {}", "general: {local_base_path: 5}\npipeline: [x]",
    "\ufeffpipeline: [x]", "pipeline: [x]\nx:\n\t- a", "%YAML 9.9\n---\na: 1", "--- a\n--- b",
])
demo_text = DEMO.read_text()
yaml_text = st.one_of(
    st.text(), hostile_yaml,
    st.builds(lambda at, cut, ins: demo_text[:at] + ins + demo_text[at + cut:],          # a damaged demo.yml
              st.integers(0, len(demo_text)), st.integers(0, 40), st.text(max_size=20)),
    st.builds(lambda v: yaml.safe_dump(v), json_values),
    st.builds(lambda extra: demo_text + "\n" + extra, hostile_yaml),
)


@settings(max_examples=300, **FUZZ)
@given(st.one_of(yaml_text, st.binary(max_size=300)))
def test_fuzz_config_file(cfg_dir, content):
    path = cfg_dir / "fuzz.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    res = outcome(load_config, path, error=ConfigError)
    if isinstance(res, Rejected):
        assert str(path) in res.message or res.message.startswith("config key "), res.message
    else:
        _check_run_config(res)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys and list indices) of a config tree, the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _at(root: Any, path: tuple) -> Any:
    for part in path:
        root = root[part]
    return root


known_keys = st.sampled_from([  # keys of the schema, so that added keys are often meaningful
    "ref", "type", "params", "epochs", "iters", "lr", "momentum", "code", "block", "backbone", "neck", "norm",
    "common", "data_root", "img_prefix", "ann_prefix", "batch_size", "milestones", "gamma", "warmup_iters",
    "after_scheduler_config", "models_folder", "pretrained_model_file", "model_desc", "top_k", "hyperparameters",
    "range", "key", "callbacks", "objective_keys", "max_sample", "expend_ratio", "expand_ratio", "seed",
    "local_base_path", "workers", "device", "amp", "clip_grad_norm", "image_size", "convert_pretrained", "by_epoch",
    "lr_scaling", "lr_reference_batch", "grad_clip", "use_amp", "valid_interval", "with_train", "task", "T_max",
    "eta_min", "warmup_type", "loss", "metric", "train", "data_path"])


@st.composite
def mutated_config(draw) -> tuple[dict, list[str]]:
    """configs/demo.yml with 1-4 random edits: replace a leaf or subtree, delete a key or
    list entry, add an unknown (or non-string) key."""
    raw, log = copy.deepcopy(DEMO_RAW), []
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(raw)))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace" and path:
            _at(raw, path[:-1])[path[-1]] = value = draw(json_values)
            log.append(f"{path} = {value!r}")
        elif op == "delete" and path:
            del _at(raw, path[:-1])[path[-1]]
            log.append(f"del {path}")
        else:
            node = _at(raw, path)
            if isinstance(node, dict):
                key = draw(st.one_of(st.text(max_size=10), known_keys, st.integers(), st.booleans(), st.none()))
                node[key] = value = draw(json_values)
                log.append(f"{path}[{key!r}] = {value!r}")
            elif isinstance(node, list):
                node.append(value := draw(json_values))
                log.append(f"{path}.append({value!r})")
    return raw, log


@settings(max_examples=400, **FUZZ)
@given(mutated_config())
def test_fuzz_config_mutations(cfg_dir, mutated):
    raw, edits = mutated
    res = outcome(load_config, raw, workdir=cfg_dir, error=ConfigError)
    if isinstance(res, Rejected):
        assert res.message.startswith(("config key ", "config '<dict>'")), (edits, res.message)
    else:
        _check_run_config(res)


demo_keys = [".".join(map(str, p)) for p in _paths(DEMO_RAW) if p and all(isinstance(k, str) for k in p)]
yaml_flow = st.builds(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("\n..."),
                      json_values)
valid_override = st.sampled_from([
    "general.seed=3", "general.workers=2", "general.device=cpu", "serial.search_algorithm.max_sample=6",
    "fine_tune.trainer.epochs=3", "fine_tune.trainer.optimizer.params.lr=0.5", "reignition.top_k=1",
    "fine_tune.dataset.common.batch_size=2", "pipeline=[fine_tune, serial]", "fine_tune.trainer.amp=false",
    "fine_tune.model.model_desc.backbone.code=11-21-21-21", "parallel.search_algorithm.max_per_stage=1",
    "fine_tune.dataset.common.data_root=s3://bucket/demo", "serial.search_algorithm.objective_keys=[mAP, flops]"])
override = st.one_of(
    st.text(),
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(demo_keys), st.text(max_size=20)),
              st.one_of(st.text(max_size=30), yaml_flow, yaml_flow,
                        st.sampled_from(["", "~", "[]", "{}", "!!int x", "[" * 2000, "&a [*a]", "-1", "1e999",
                                         ".nan", "{ref: serial}", "9" * 400, "3", "0.5", "true", "1-2-2-2"]))),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(demo_keys),  # plausible values
              st.sampled_from(["1", "2", "3", "0.5", "0.01", "true", "false", "SGD", "1-2-2-2", "[0, 1]", "[mAP]"])),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(demo_keys).map(lambda k: k + "." + "x"),
              st.text(max_size=10)),
)


@pytest.mark.slow
@settings(max_examples=300, **FUZZ)
@given(st.lists(half(valid_override, override), min_size=1, max_size=2))
def test_fuzz_set_overrides(cfg_dir, overrides):
    res = outcome(load_config, DEMO_RAW, workdir=cfg_dir, overrides=overrides, error=ConfigError)
    if isinstance(res, Rejected):
        assert res.message.startswith(("--set ", "config key ", "config '<dict>'")), res.message
    else:
        _check_run_config(res)


# regressions for what fuzzing the config loader found: each raised another exception type or hung
@pytest.mark.parametrize("text, message", [
    (b"\xff\xfe pipeline: [a]", "cannot be read: 'utf-8' codec"),                             # UnicodeDecodeError
    ("a: !!int x", "is not valid YAML: invalid literal"),                                      # ValueError
    ("a: !!float abc", "is not valid YAML"),                                                   # ValueError
    ("a: !!timestamp 2020-13-45", "is not valid YAML: month must be in 1..12"),                # ValueError
    ("a: !!timestamp x", "is not valid YAML"),                                                 # AttributeError
    ("a: !!float", "is not valid YAML: string index out of range"),                            # IndexError
    ("a: !!bool maybe", "is not valid YAML: 'maybe'"),                                         # KeyError
    ("a: " + "[" * 3000 + "]" * 3000, "is not valid YAML"),                                    # RecursionError
    ("a: &a [*a]\npipeline: [a]", "config key a\\[0\\].*: is nested more than 64 levels"),      # RecursionError
    ("l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(                                    # alias bomb: hung
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9)), f"more than {MAX_VALUES} values"),
    ("general: {local_base_path: 5}\npipeline: [x]", "general.local_base_path: must be a path string, got 5"),  # TypeError
])
def test_config_file_regressions(tmp_path, text, message):
    path = tmp_path / "c.yml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with no_hang(), pytest.raises(ConfigError, match=message):
        load_config(path)


def test_config_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file .* cannot be read: .*Is a directory"):  # was IsADirectoryError
        load_config(tmp_path)


def _ref_fan_out(raw: dict) -> None:
    raw["s0"] = {"x": 1}
    for i in range(1, 20):  # each section refs the previous one twice: 2**19 copies without memoising
        raw[f"s{i}"] = {"a": {"ref": f"s{i - 1}"}, "b": {"ref": f"s{i - 1}"}}


def _set(*path: str, **values: Any) -> Callable[[dict], None]:
    """A mutation: update the section at ``path`` of the demo config with ``values``."""
    return lambda raw: _at(raw, path).update(values)


# what each one did before the fix: hung, raised another exception type, or loaded
@pytest.mark.parametrize("mutate, message", [
    (_ref_fan_out, "refs expand the config beyond"),                                                  # hung
    (_set("fine_tune", "trainer", ref="serial.trainer"), "ref cycle 'serial.trainer' -> 'fine_tune.trainer'"),
    (lambda r: r["fine_tune"]["model"]["model_desc"]["backbone"].update({1: 2}),
     "backbone: key 1 is not a string"),                                                              # TypeError (sorted)
    (_set("serial", "search_algorithm", objective_keys=5), "search setting objective_keys: must be a non-empty list of .*, got 5"),         # TypeError
    (_set("serial", "search_algorithm", add_stage_ratio=10**400), r"search_algorithm: search setting add_stage_ratio: must be a probability in \[0, 1\], got 1000"),  # OverflowError
    (_set("general", seed=2**64), "general.seed: must be below 2\\*\\*63, got 18446744073709551616"),         # loaded
    (_set("fine_tune", "trainer", "optimizer", "params", lr=4 * 10**400), "params.lr: must be a number, got 4000.*too large"),  # OverflowError
    (lambda r: r.update(pipeline=["../../evil"], **{"../../evil": r["fine_tune"]}),
     "pipeline\\[0\\]: step name '../../evil'"),                                                      # loaded
    (lambda r: r.update(pipeline=["fine_tune", "fine_tune"]), "pipeline\\[1\\]: step 'fine_tune' is listed twice"),  # loaded
    (_set("fine_tune", "dataset", "common", img_prefix="/../../x"), "img_prefix: '/../../x' must be part of a file"),  # loaded
    (_set("fine_tune", "dataset", "common", data_root="data\x00"), "data_root: must be a path or URI string"),  # loaded
    (_set("reignition", "pipe_step", models_folder=5), "reignition.pipe_step.models_folder: must be a path string"),  # loaded
    (lambda r: r["serial"]["search_space"]["hyperparameters"][0].update(range=["1-2-2-2", "1-2x"]),
     "serial.search_space.hyperparameters\\[0\\].range\\[1\\]: serial code '1-2x' has bad character"),   # loaded
    (lambda r: r["parallel"].update(search_space={"hyperparameters": [{"key": "network.neck.code", "range": [[0, -1]]}]}),
     "parallel.search_space.hyperparameters\\[0\\].range\\[0\\]: parallel code \\[0, -1\\]: entry -1 is negative"),  # loaded
])
def test_config_structure_regressions(tmp_path, mutate, message):
    raw = copy.deepcopy(DEMO_RAW)
    mutate(raw)
    with no_hang(), pytest.raises(ConfigError, match=message):
        load_config(raw, workdir=tmp_path)


def test_set_override_regressions(tmp_path):
    for value, message in (("!!int x", "value is not valid YAML: invalid literal"),   # ValueError
                           ("[" * 3000, "value is not valid YAML")):                  # RecursionError
        with pytest.raises(ConfigError, match=message):
            apply_overrides(DEMO_RAW, [f"general.seed={value}"])


# ----------------------------------------------------------------------------- COCO annotations

@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny demo set (4 training images of 64x64, 2 classes) and its training annotations."""
    root = demo(tmp_path_factory.mktemp("coco") / "d", train=4, val=1, classes=2, size=64)
    return root, load_ann(root)


hostile_values = st.sampled_from([
    None, True, -1, 0, 1, 2.5, -1e30, 1e30, 1e308, 10**400, float("nan"), float("inf"), -float("inf"), "", "1",
    "../x.jpg", "../../etc/passwd", "/etc/passwd", "a/../../b.jpg", "sub/../000000000001.jpg", "\\\\server\\x.jpg",
    "C:\\x.jpg", "x" * 300, "\x00.jpg", "é.jpg", ".", [], {}, [1, 2], ["1", "2", "3", "4"], [0, 0, 1e30, 1e30],
    [-1, -1, 0.5, 0.5], [0, 0, 1e-300, 5], [float("nan")] * 4, [0, 0, 10**400, 5], [0, 0, float("inf"), 5],
    [10, 10, -5, 5], [0, 0, 1e300, 1e300], [60, 60, 10, 10], [1]])
coco_values = st.one_of(hostile_values.map(copy.deepcopy), json_values)  # a copy: later edits must not
# change the sampled constant (hypothesis would see its strategy change between runs)
FIELDS = {"images": ["id", "file_name", "width", "height"],
          "annotations": ["id", "image_id", "category_id", "bbox", "iscrowd", "area"],
          "categories": ["id", "name"]}


@st.composite
def mutated_coco(draw, base: dict) -> dict:
    """The annotation file with 1-4 random edits: a field set to a hostile value or removed,
    an entry removed, duplicated or replaced, a whole section or top-level key replaced."""
    ann = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["images", "annotations", "annotations", "categories", "top"]))
        entries = ann.get(section) if section != "top" else None
        op = draw(st.sampled_from(["set", "set", "set", "drop_field", "drop", "duplicate", "replace_entry"]))
        if not isinstance(entries, list) or not entries:
            key = draw(st.sampled_from(["images", "annotations", "categories", "info"]) | st.text(max_size=5))
            if draw(st.booleans()):
                ann.pop(key, None)
            else:
                ann[key] = draw(coco_values)
            continue
        i = draw(st.integers(0, len(entries) - 1))
        entry = entries[i]
        if op == "drop":
            entries.pop(i)
        elif op == "duplicate":
            entries.append(copy.deepcopy(entry))
        elif op == "replace_entry" or not isinstance(entry, dict):
            entries[i] = draw(coco_values)
        elif op == "drop_field":
            entry.pop(draw(st.sampled_from(FIELDS[section])), None)
        else:
            key = draw(st.sampled_from(FIELDS[section]) | st.text(max_size=5))
            ids = [copy.deepcopy(e.get("id")) for e in entries if isinstance(e, dict)]
            entry[key] = draw(coco_values | st.sampled_from(ids))
    return ann


def _inside(path: Path, folder: Path) -> bool:
    """``path`` lies in ``folder``, judged on the text (the demo set has no symbolic links)."""
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


@contextlib.contextmanager
def is_file_calls() -> Iterator[list[Path]]:
    """Record every path whose existence is checked (the loader reaches image files only
    through ``Path.is_file``)."""
    checked: list[Path] = []
    original = Path.is_file

    def spy(self: Path) -> bool:
        checked.append(self)
        return original(self)
    with mock.patch.object(Path, "is_file", spy):
        yield checked


@settings(max_examples=300, **FUZZ)
@given(st.booleans(), st.sampled_from(["skip", "error"]), st.data())
def test_fuzz_coco_annotations(coco, train, bad_boxes, data):
    root, base = coco
    ann = data.draw(mutated_coco(base))
    ann_file = save_ann(root, ann)
    try:
        with is_file_calls() as checked:
            ds = outcome(load_split, root, "train", train=train, bad_boxes=bad_boxes, error=DataError)
    finally:
        save_ann(root, base)
    outside = [p for p in checked if not _inside(p, root)]
    assert not outside, f"the loader looked outside the data set: {outside}"
    if isinstance(ds, Rejected):
        assert ann_file.name in ds.message, ds.message
        return
    for rec in ds.records:
        assert _inside(ds.img_dir / rec["file_name"], ds.img_dir)
        boxes = torch.tensor(rec["boxes"], dtype=torch.float32).reshape(-1, 4)
        assert torch.isfinite(boxes).all() and (boxes >= 0).all() and (boxes <= MAX_SIDE).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all(), rec["boxes"]
        assert all(type(label) is int and 1 <= label < ds.num_classes for label in rec["labels"])
        assert type(rec["id"]) is int
    # every annotation is either a kept box or counted once as skipped
    assert sum(len(rec["boxes"]) for rec in ds.records) + sum(ds.skipped.values()) == len(ann["annotations"])


segmentation_values = st.one_of(
    coco_values,
    st.lists(st.lists(st.integers(-10**6, 10**6) | st.floats(), max_size=12), max_size=3),
    st.fixed_dictionaries({"size": st.lists(st.integers(-5, 70), max_size=3) | st.just([64, 64]) | coco_values,
                           "counts": st.text(max_size=40) | st.lists(st.integers(-5, 5000), max_size=12)
                           | st.just([64 * 64]) | coco_values}))


@settings(max_examples=200, **FUZZ)
@given(st.sampled_from(["skip", "error"]), st.data())
def test_fuzz_coco_instance_masks(coco, bad_boxes, data):
    """Hostile segmentations (polygons, RLE objects, compressed strings of any text) never
    reach pycocotools' C code malformed: a named DataError, or masks of the image's size with
    one per kept box and every other annotation counted as skipped."""
    root, base = coco
    ann = copy.deepcopy(base)
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    for _ in range(data.draw(st.integers(1, 3))):
        a = ann["annotations"][data.draw(st.integers(0, len(ann["annotations"]) - 1))]
        if data.draw(st.booleans()):
            a["segmentation"] = data.draw(segmentation_values)
        else:
            a.pop("segmentation", None)
    ann_file = save_ann(root, ann)
    try:
        ds = outcome(load_split, root, "train", train=False, bad_boxes=bad_boxes, masks=True, error=DataError)
        if isinstance(ds, Rejected):
            assert ann_file.name in ds.message, ds.message
            return
        for i in range(len(ds)):
            image, target = ds[i]
            m = target["masks"]
            assert m.dtype == torch.uint8 and m.shape == (len(target["boxes"]), *image.shape[-2:])
            assert bool(((m == 0) | (m == 1)).all()) and all(bool(x.any()) for x in m)
    finally:
        save_ann(root, base)
    assert sum(len(rec["boxes"]) for rec in ds.records) + sum(ds.skipped.values()) == len(ann["annotations"])


# regressions for what fuzzing the COCO loader found
def _first_image(**fields: Any) -> Callable[[dict], None]:
    return lambda d: d["images"][0].update(fields)


def _first_ann(**fields: Any) -> Callable[[dict], None]:
    return lambda d: d["annotations"][0].update(fields)


@pytest.mark.parametrize("mutate, message", [
    (_first_ann(image_id=[1]), "annotations\\[0\\] image_id \\[1\\] is not an integer"),          # TypeError: unhashable
    (_first_ann(category_id={"id": 1}), "category_id \\{'id': 1\\} is not an integer"),           # TypeError: unhashable
    (_first_ann(bbox=[0, 0, 10**400, 5]), "bbox .* is not \\[x, y, width, height\\] of finite"),  # OverflowError
    (_first_image(width=float("nan")), "images\\[0\\] width nan is not a positive number"),       # loaded: NaN boxes
    (_first_image(height=1e300), f"height 1e\\+300 is not a positive number up to {MAX_SIDE}"),  # loaded: let a
    # box of height 1e299 through, inf once in float32
    (_first_image(file_name="x" * 300), "file_name 'xxx.* cannot be checked"),                  # OSError: name too long
    (lambda d: d["categories"][0].update(name=["cat"]), "categories\\[0\\] name \\['cat'\\] is not a string"),  # loaded
])
def test_coco_regressions(tmp_path, mutate, message):
    root = demo(tmp_path / "d", train=2, val=1, classes=2, size=64)
    ann = load_ann(root)
    mutate(ann)
    save_ann(root, ann)
    with pytest.raises(DataError, match=message):
        load_split(root, "train", train=False)


@pytest.mark.parametrize("text", ["1" * 5000, "[" * 100_000 + "]" * 100_000])  # ValueError, RecursionError
def test_unparsable_annotation_json_is_a_data_error(tmp_path, text):
    root = demo(tmp_path / "d", train=1, val=1, classes=1, size=64)
    (root / "annotations" / "instances_train2017.json").write_text(text)
    with pytest.raises(DataError, match="instances_train2017.json' is not valid JSON"):
        load_split(root, "train", train=False)


@pytest.mark.parametrize("bbox, has_size, kind", [
    ([-1, -1, 0.5, 0.5], True, "outside"),         # clipped to [0, 0, -0.5, -0.5]: a degenerate box reached the model
    ([0, 0, 1e300, 10], False, "outside"),         # no width in the file: 1e300 became inf in float32
    ([-50, 0, 10, 10], False, "outside"),          # no width in the file: clipped to x1 = -40 < x0 = 0
    ([0, 0, 1e-300, 5], True, "non_positive"),     # width 0 once stored as float32
])
def test_degenerate_boxes_are_skipped_and_counted(tmp_path, bbox, has_size, kind):
    root = demo(tmp_path / "d", train=2, val=1, classes=2, size=64)
    ann = load_ann(root)
    if not has_size:
        for img in ann["images"]:
            del img["width"], img["height"]
    ann["annotations"][0]["bbox"] = bbox
    save_ann(root, ann)
    ds = load_split(root, "train", train=False)
    assert ds.skipped[kind] == 1 and sum(ds.skipped.values()) == 1
    boxes = torch.tensor([b for r in ds.records for b in r["boxes"]], dtype=torch.float32)
    assert torch.isfinite(boxes).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    with pytest.raises(DataError, match=f"annotation {ann['annotations'][0]['id']} bbox"):
        load_split(root, "train", train=False, bad_boxes="error")


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    from PIL import Image
    root = demo(tmp_path / "d", train=1, val=1, classes=1, size=64)
    ds = load_split(root, "train", train=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 64x64 image is now over twice the limit
    with pytest.raises(DataError, match="cannot be decoded: Image size .* exceeds limit"):  # was DecompressionBombError
        ds.read_image(0)


def test_search_settings_refuse_huge_numbers_with_a_typed_error():
    """Settings can arrive without the config loader (KFP structs): huge ints are refused, and
    an int too long for repr() is still named."""
    from spnas.search import SearchSettings
    with pytest.raises(ConfigError, match=r"search setting add_stage_ratio: must be a probability in \[0, 1\], got <int too large to show>"):
        SearchSettings("SpNasS", add_stage_ratio=10 ** 5000)
    with pytest.raises(ConfigError, match=r"search setting expand_ratio: must be a probability in \[0, 1\], got 10{199}\.\.\. \(401 characters\)"):
        SearchSettings("SpNasS", expand_ratio=10 ** 400)
    with pytest.raises(ConfigError, match=r"search setting max_gflops: must be a positive number or None, got 10{199}\.\.\. \(401 characters\)"):
        SearchSettings("SpNasS", max_gflops=10 ** 400)
