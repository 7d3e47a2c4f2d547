"""The submission command lines in docs/kubeflow.md and README.md, parsed the way they will be:
`kfp run create` lines by the kfp CLI itself, `make run`/`make schedule` PARAMS by our submit CLI.
Every parameter value must arrive with the Python type of the compiled pipeline's parameter type
(the API server refuses, e.g., the number 8 for the STRING parameter cpu_per_task)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from string import Template

import kfp.client
import pytest
from click.testing import CliRunner
from kfp.cli import cli as kfp_cli
from kfp.cli.utils import parsing

from pipelines import submit

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "docs" / "kubeflow.md", REPO / "README.md"]
PY_TYPE = {"NUMBER_INTEGER": int, "STRING": str, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "LIST": list, "STRUCT": dict}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def command_lines(path: Path) -> list[list[str]]:
    """Each shell command of the fenced blocks of ``path``, split the way a POSIX shell splits it
    (backslash-newline continued, comments dropped)."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def split_command(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, the command's words)."""
    i = 0
    while i < len(words) and ASSIGNMENT.match(words[i]):
        i += 1
    return dict(w.split("=", 1) for w in words[:i]), words[i:]


def kfp_run_creates() -> list[tuple[str, dict[str, str], list[str]]]:
    out = []
    for path in DOCS:
        for words in command_lines(path):
            env, cmd = split_command(words)
            if cmd[:1] == ["kfp"] and "run" in cmd and cmd[cmd.index("run") + 1:cmd.index("run") + 2] == ["create"]:
                out.append((path.name, env, cmd))
    return out


def make_submits() -> list[tuple[str, list[str]]]:
    out = []
    for path in DOCS:
        for words in command_lines(path):
            _, cmd = split_command(words)
            if cmd[:2] in (["make", "run"], ["make", "schedule"], ["make", "retrain"]):
                out.append((path.name, cmd))
    return out


def assert_typed(params: dict, where: str, package=submit.PACKAGE) -> None:
    types = submit.pipeline_parameters(package)
    assert params, f"{where}: no parameters"
    for name, value in params.items():
        assert name in types, f"{where}: {name!r} is not a pipeline parameter"
        assert type(value) is PY_TYPE[types[name]], \
            f"{where}: {name}={value!r} arrives as {type(value).__name__}, the pipeline declares {types[name]}"


def test_the_docs_have_the_command_lines():
    found = {(name, cmd[1]) for name, cmd in make_submits()}
    assert {("kubeflow.md", "run"), ("kubeflow.md", "schedule"), ("README.md", "run"), ("README.md", "schedule")} <= found
    assert [name for name, _, _ in kfp_run_creates()] == ["kubeflow.md"]


class _Created(Exception):
    """Raised by the fake client once the CLI has handed it the run's parameters."""


@pytest.mark.parametrize("doc, env, cmd", kfp_run_creates(), ids=lambda x: x if isinstance(x, str) else None)
def test_kfp_run_create_lines_send_the_pipelines_types(monkeypatch, doc, env, cmd):
    """The kfp CLI's own command (kfp.cli.cli, as the `kfp` script calls it), with a fake client."""
    seen: dict = {}

    class FakeClient:
        def __init__(self, *args):  # cli.py: Client(endpoint, iap_client_id, namespace, ..., existing_token)
            seen["client"] = args

        def create_experiment(self, name, namespace=None):
            seen["experiment"] = name
            return type("Experiment", (), {"experiment_id": "exp-1"})

        def run_pipeline(self, **kwargs):
            seen["run"] = kwargs
            raise _Created

    monkeypatch.setattr(kfp.client, "Client", FakeClient)
    monkeypatch.chdir(REPO)  # --package-file is relative to the repository root
    shell = {"KFP_TOKEN": "tok-1", "KFP_ENDPOINT": "http://kfp.test:8080", "KFP_NAMESPACE": "team-a"}  # the doc's exports
    env = {k: Template(v).substitute(shell) for k, v in env.items()}
    result = CliRunner().invoke(kfp_cli.cli, cmd[1:], obj={}, auto_envvar_prefix="KFP", env={**shell, **env})
    assert isinstance(result.exception, _Created), result.output
    endpoint, _, namespace, _, _, token = seen["client"]
    assert (endpoint, namespace, token) == ("http://kfp.test:8080", "team-a", "tok-1")  # read from the environment
    assert seen["run"]["pipeline_package_path"] == "pipelines/spnas_pipeline.yaml"
    params = seen["run"]["params"]
    assert_typed(params, f"{doc}: {shlex.join(cmd)}")
    assert params["cpu_per_task"] == "8"


def test_the_kfp_cli_reads_an_unquoted_8_as_a_number():
    """Why the doc quotes cpu_per_task: the CLI's parser types by the value, not by the pipeline."""
    assert parsing.parse_parameter_value("8") == 8
    assert parsing.parse_parameter_value('"8"') == "8"
    assert parsing.parse_parameter_value("32G") == "32G"


@pytest.mark.parametrize("doc, cmd", make_submits(), ids=lambda x: x if isinstance(x, str) else None)
def test_make_lines_send_the_pipelines_types(doc, cmd):
    """Make hands $(PARAMS) unquoted to the recipe's shell, which splits it again."""
    assigned = dict(w.split("=", 1) for w in cmd[2:] if ASSIGNMENT.match(w))
    # the Makefile's recipes: `make retrain` is `submit run --package pipelines/retrain_pipeline.yaml`
    verb = ["run", "--package", str(submit.RETRAIN_PACKAGE)] if cmd[1] == "retrain" else [cmd[1]]
    argv = [*verb, *shlex.split(assigned.get("PARAMS", ""))]
    if cmd[1] == "schedule":
        argv += ["--cron", assigned.get("CRON", "0 0 2 * * *")]
        submit.check_cron(assigned.get("CRON", "0 0 2 * * *"))
    args = submit.build_parser().parse_args(argv)
    if args.param:
        assert_typed(submit.parse_params(args.param, args.package), f"{doc}: {shlex.join(cmd)}", args.package)
