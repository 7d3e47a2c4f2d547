"""``spnas describe``: the command people run first."""
import json
import subprocess
import sys

import pytest

from spnas.cli.main import main


def test_describe_json(capsys):
    assert main(["describe", "--code", "11-21-21-21", "--block", "basic", "--base-channels", "32",
                 "--parallel", "0,1,0,0", "--num-classes", "4", "--size", "256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "b_11-21-21-21_0-1-0-0"
    assert [(r["blocks"], r["out_channels"], r["stride"], r["parallel"]) for r in info["stages"]] == [
        (2, 32, 4, 0), (2, 64, 8, 1), (2, 128, 16, 0), (2, 256, 32, 0)]
    assert info["params"]["parallel"] == 64 * 32 + 2 * 32
    assert info["gflops"] > 0 and info["size"] == 256


def test_describe_table_for_the_seed(capsys):
    assert main(["describe"]) == 0
    out = capsys.readouterr().out
    assert "r_111-2111-211111-211_0-0-0-0" in out
    assert "params        41,808,406 total" in out
    assert "    3 211                 3   1024   2048     32        0" in out


def test_describe_accepts_the_one_string_form(capsys):
    assert main(["describe", "--code", "x_111-2111-211111-211_1-0-0-0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["desc"]["backbone"]["block"] == "resnext"


@pytest.mark.parametrize("argv, message", [
    (["describe", "--code", "11-2a"], "bad character 'a'"),
    (["describe", "--parallel", "0,1"], "has 2 entries but the serial code has 4 stages"),
    (["describe", "--block", "dense"], "unknown block type 'dense'"),
])
def test_describe_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("spnas describe: error: ") and message in err and "Traceback" not in err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "spnas", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("spnas ")


def test_installed_console_script():
    """The ``spnas`` command pyproject.toml installs (``make install``) points at the CLI's main."""
    from pathlib import Path

    import tomllib

    from spnas.cli.main import main as cli_main
    root = Path(__file__).parent.parent
    target = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]["spnas"]
    module, _, func = target.partition(":")
    import importlib
    assert getattr(importlib.import_module(module), func) is cli_main
    script = Path(sys.executable).parent / "spnas"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("spnas ")
