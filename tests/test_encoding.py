import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spnas import CodeError, format_arch, parse_arch, parse_parallel, parse_serial
from spnas.models.encoding import Bounds, check_bounds, normalize_block


def test_resnet50_code_structure():
    c = parse_serial("111-2111-211111-211")
    assert c.stages == ("111", "2111", "211111", "211")
    assert (c.num_blocks, c.num_stages) == (16, 4)
    assert c.stage_starts() == [0, 3, 7, 13]
    assert c.width_multipliers() == [1] * 3 + [2] * 4 + [4] * 6 + [8] * 3


def test_width_depends_only_on_where_the_twos_stand():
    assert parse_serial("111-2111").width_multipliers() == parse_serial("1112-111").width_multipliers()


stage = st.text(alphabet="12", min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(stage, min_size=1, max_size=6).filter(lambda s: "".join(s).count("2") <= 6),
       st.sampled_from(["bottleneck", "basic", "resnext"]), st.data())
def test_roundtrips(stages, block, data):
    text = "-".join(stages)
    code = parse_serial(text)
    assert str(code) == text and parse_serial(str(code)) == code
    par = data.draw(st.lists(st.integers(0, 8), min_size=len(stages), max_size=len(stages)))
    assert parse_parallel(par, len(stages)) == tuple(par)
    assert parse_parallel("-".join(map(str, par)), len(stages)) == tuple(par)
    arch = format_arch(block, text, par)
    assert parse_arch(arch) == (block, code, tuple(par))
    assert format_arch(*parse_arch(arch)) == arch


def test_vega_one_string_form():
    assert parse_arch("r_111-2111-211111-211_0-0-0-0") == (
        "bottleneck", parse_serial("111-2111-211111-211"), (0, 0, 0, 0))
    assert parse_arch("b_11-21-21-21") == ("basic", parse_serial("11-21-21-21"), (0, 0, 0, 0))
    assert parse_arch("x_1-2_1-3")[0] == "resnext"


@pytest.mark.parametrize("code, message", [
    ("", "is empty"),
    ("   ", "is empty"),
    ("1--2", "stage 1 is empty"),
    ("-11", "stage 0 is empty"),
    ("11-", "stage 1 is empty"),
    ("1a1", "bad character 'a' at position 1"),
    ("11_21", "bad character '_'"),
    ("1" * 129, "129 blocks; at most 128"),
    ("-".join("1" * 9), "9 stages; at most 8"),
    ("1222-2222", "doubles the width 7 times"),
    (None, "must be a string"),
    (111, "must be a string"),
])
def test_invalid_serial_codes(code, message):
    with pytest.raises(CodeError, match=message) as info:
        parse_serial(code)
    assert isinstance(info.value, ValueError)
    assert repr(code) in str(info.value) or isinstance(code, int) or code is None


@pytest.mark.parametrize("code, n, message", [
    ([0, 1, 0], 4, "has 3 entries but the serial code has 4 stages"),
    ([0, -1, 0, 0], 4, "entry -1 is negative"),
    ([0, 1.5, 0, 0], 4, "entry 1.5 is not an integer"),
    ([0, "a", 0, 0], 4, "entry 'a' is not an integer"),
    ([0, True, 0, 0], 4, "entry True is not an integer"),
    ("0-x-0-0", 4, "entry 'x' is not a non-negative integer"),
    ("0--0-0", 4, "empty entry"),
    ([0, 9, 0, 0], 4, "9 extra passes on one stage"),
    (None, None, "number of stages is unknown"),
    (7, 1, "must be a list"),
])
def test_invalid_parallel_codes(code, n, message):
    with pytest.raises(CodeError, match=message):
        parse_parallel(code, n)


def test_parallel_accepts_kfp_floats_and_empty():
    assert parse_parallel([0.0, 2.0], 2) == (0, 2)
    assert parse_parallel([], 3) == (0, 0, 0)
    assert parse_parallel("0,1,2", 3) == (0, 1, 2)
    assert parse_parallel("[0, 1]", 2) == (0, 1)


@pytest.mark.parametrize("text, message", [
    ("q_11-21_0-0", "block letter 'q'"),
    ("r", "must have the form"),
    ("r_11_0_0", "must have the form"),
    ("r_11-21_0-0-0", "has 3 entries"),
    ("r_1x_0", "bad character 'x'"),
])
def test_invalid_arch_strings(text, message):
    with pytest.raises(CodeError, match=message):
        parse_arch(text)


def test_block_spellings():
    assert normalize_block("BottleneckBlock") == "bottleneck"
    assert normalize_block("BasicBlock") == "basic"
    assert normalize_block("ResNeXtBlock") == "resnext"
    with pytest.raises(CodeError, match="unknown block type 'dense'"):
        normalize_block("dense")


def test_search_bounds():
    check_bounds("111-2111-211111-211", [0, 1, 0, 3])
    with pytest.raises(CodeError, match="7 blocks, outside \\[8, 60\\]"):
        check_bounds("1-21-21-21")
    with pytest.raises(CodeError, match="3 stages, outside \\[4, 6\\]"):
        check_bounds("1111-2111-2111")
    with pytest.raises(CodeError, match="exceeds 3 extra passes"):
        check_bounds("111-2111-211111-211", [0, 4, 0, 0])
    check_bounds("1-21-21-21", bounds=Bounds(min_blocks=4))
