"""The model registry (spnas.registry) against a real `mlflow server` (SQLite backend, artifacts
proxied to the embedded S3 store), one per module and pytest worker, stopped by PID at the end.

Export folders here are written by hand (the files and keys `spnas export` writes, with random
model bytes): the registry reads JSON and uploads files, it never loads a model.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow_server import free_port, mlflow_server

from spnas.cli.main import main as spnas_main
from spnas.registry import Registry, VersionInfo, read_export, tracking_uri, version_tags
from spnas.storage import ENV_ACCESS_KEY, ENV_ENDPOINT, ENV_REGION, ENV_SECRET_KEY, Store
from spnas.utils.errors import RegistryError, SpnasError

ROOT = Path(__file__).resolve().parents[1]

EXPORT_INFO = {
    "name": "spnas", "format_version": 1, "onnx": "model.onnx", "labels": "labels.json",
    "desc": {"backbone": {"type": "SerialBackbone", "code": "111-2111-211111-211", "block": "bottleneck",
                          "base_channels": 64, "norm": "FrozenBN"},
             "neck": {"type": "ParallelFPN", "code": [0, 1, 0, 2], "out_channels": 256}, "num_classes": 4},
    "data": {"root": "s3://data/coco", "version": "sha256:0123abcd", "val_images": 6, "classes": 3},
    "metrics": {"mAP": 37.125, "AP50": 55.5},
    "costs": {"params": 41_234_567, "gflops": 12.345, "size": 800,
              "latency_ms": {"pytorch_cpu": 101.5, "onnxruntime_cpu": 64.25, "image": [96, 96], "threads": 1}},
    "parity": {"passed": True, "file": "parity.json"},
    "control": {"searched": {"mAP": 36.5}, "control": {"mAP": 35.25}, "delta_mAP": 1.25, "winner": "searched"},
    "lineage": [],
}
EXPECTED_TAGS = {"serial_code": "111-2111-211111-211", "parallel_code": "0-1-0-2", "block": "bottleneck",
                 "data_version": "sha256:0123abcd", "mAP": "37.125", "control_mAP": "35.25", "control_delta": "1.25",
                 "params": "41234567", "gflops": "12.345", "latency_ms_pytorch_cpu": "101.5",
                 "latency_ms_onnxruntime_cpu": "64.25", "parity": "passed"}


def make_export(d: Path, *, passed: bool | None = True, seed: int = 0, **changes) -> Path:
    """An export folder as `spnas export` writes it (random model bytes); ``passed=None``: no
    parity.json; ``changes``: top-level export.json keys replaced."""
    d.mkdir(parents=True, exist_ok=True)
    rnd = __import__("random").Random(seed)
    (d / "model.onnx").write_bytes(rnd.randbytes(50_000))
    (d / "model.torchscript.pt").write_bytes(rnd.randbytes(20_000))
    (d / "labels.json").write_text(json.dumps({"labels": [{"label": 1, "category_id": 3, "name": "circle"}]}))
    (d / "MODEL_CARD.md").write_text("# Model card\n")
    if passed is not None:
        (d / "parity.json").write_text(json.dumps({"passed": passed, "programs": {}}))
    info = copy.deepcopy(EXPORT_INFO)
    info["parity"]["passed"] = bool(passed)
    info.update(changes)
    (d / "export.json").write_text(json.dumps(info))
    return d


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv
    assert srv.proc.returncode is not None  # stopped by PID


@pytest.fixture
def reg(server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the explicit URI must be enough
    return Registry(server.uri, timeout_s=30)


def _runs(server, name: str) -> int:
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name(f"spnas/{name}")
    return 0 if exp is None else len(client.search_runs([exp.experiment_id]))


# --------------------------------------------------------------------------------------------
# no server


def test_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking_uri("http://arg:5000") == "http://arg:5000"
    assert tracking_uri() == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match=r"^no model registry given: pass --registry-uri URI or set MLFLOW_TRACKING_URI"):
        tracking_uri()
    with pytest.raises(RegistryError, match="MLFLOW_TRACKING_URI"):
        Registry()


def test_version_tags_exact():
    assert version_tags(EXPORT_INFO) == EXPECTED_TAGS
    tags = version_tags(EXPORT_INFO, storage_uri="s3://models/spnas/1", extra_tags={"pipeline_run": "r-7"})
    assert tags == {**EXPECTED_TAGS, "storage_uri": "s3://models/spnas/1", "pipeline_run": "r-7"}
    # no control: no control tags; a control with its delta only: the delta
    assert version_tags({**EXPORT_INFO, "control": None}) == {k: v for k, v in EXPECTED_TAGS.items()
                                                             if k not in ("control_mAP", "control_delta")}
    only_delta = version_tags({**EXPORT_INFO, "control": {"delta_mAP": -0.5}})
    assert (only_delta["control_delta"], "control_mAP" in only_delta) == ("-0.5", False)
    # the delta is computed from the two in-run mAPs, rounded to 6 decimals; floats round-trip
    odd = version_tags({**EXPORT_INFO, "control": {"searched": {"mAP": 0.35}, "control": {"mAP": 0.3}},
                        "metrics": {"mAP": 0.1 + 0.2}})
    assert (odd["control_delta"], odd["control_mAP"], float(odd["mAP"])) == ("0.05", "0.3", 0.1 + 0.2)
    # a semantic model's quality is its mIoU: its tags and control tags are of mIoU, no mAP
    semantic = {**EXPORT_INFO, "task": "semantic_segmentation", "metrics": {"mIoU": 82.5, "pixel_acc": 96.0},
                "control": {"searched": {"mIoU": 89.25}, "control": {"mIoU": 87.5}, "delta_mIoU": 1.75}}
    tags = version_tags(semantic)
    assert (tags["mIoU"], tags["control_mIoU"], tags["control_delta"]) == ("82.5", "87.5", "1.75")
    assert "mAP" not in tags and "control_mAP" not in tags
    with pytest.raises(RegistryError, match=r"metrics.mIoU"):
        version_tags({**semantic, "metrics": {"mAP": 1.0}})
    # a Mask R-CNN searched by mask AP: the control tags are of segm_mAP, the box mAP stays tagged
    instance = {**EXPORT_INFO, "task": "instance_segmentation", "metrics": {"mAP": 40.5, "segm_mAP": 36.25},
                "control": {"searched": {"mAP": 41.0, "segm_mAP": 37.0}, "control": {"mAP": 42.0, "segm_mAP": 35.5},
                            "delta_segm_mAP": 1.5, "quality": "segm_mAP"}}
    tags = version_tags(instance)
    assert (tags["mAP"], tags["segm_mAP"], tags["control_segm_mAP"], tags["control_delta"]) == \
        ("40.5", "36.25", "35.5", "1.5")
    assert "control_mAP" not in tags
    with pytest.raises(RegistryError, match=r"metrics.segm_mAP"):
        version_tags({**instance, "metrics": {"mAP": 1.0}})
    with pytest.raises(RegistryError, match="one the registry sets itself"):
        version_tags(EXPORT_INFO, extra_tags={"control_segm_mAP": "1"})


@pytest.mark.parametrize("change, message", [
    ({"metrics": {}}, "key 'metrics.mAP' is missing"),
    ({"desc": {"backbone": {"code": "11"}, "neck": {"code": [0]}}}, "key 'desc.backbone.block' is missing"),
    ({"costs": {"params": 1, "gflops": 1.0, "latency_ms": {"pytorch_cpu": 1.0}}}, "key 'costs.latency_ms.onnxruntime_cpu' is missing"),
    ({"metrics": {"mAP": float("nan")}}, "metrics.mAP must be a finite number, got nan"),
    ({"metrics": {"mAP": "37"}}, "metrics.mAP must be a finite number, got '37'"),
    ({"desc": {"backbone": {"code": "11", "block": "basic"}, "neck": {"code": "0-1"}}}, "desc.neck.code must be a list of non-negative integers"),
])
def test_version_tags_refuse_bad_export_json(change, message):
    with pytest.raises(RegistryError, match="^export.json: ") as err:
        version_tags({**EXPORT_INFO, **change})
    assert message in str(err.value)


def test_extra_tags_cannot_forge_computed_tags():
    for key in ("mAP", "parity", "promoted_at"):
        with pytest.raises(RegistryError, match=f"extra tag '{key}' is one the registry sets itself"):
            version_tags(EXPORT_INFO, extra_tags={key: "99"})
    with pytest.raises(RegistryError, match="keys and values must be strings"):
        version_tags(EXPORT_INFO, extra_tags={"n": 3})


def test_read_export_refusals(tmp_path):
    assert read_export(make_export(tmp_path / "ok"))["metrics"]["mAP"] == 37.125
    with pytest.raises(RegistryError, match=r"export folder '.*/absent' does not exist"):
        read_export(tmp_path / "absent")
    no_gate = make_export(tmp_path / "no-gate", passed=None)
    with pytest.raises(RegistryError, match=rf"^{re.escape(str(no_gate / 'parity.json'))} does not exist: an export without a parity gate"):
        read_export(no_gate)
    failed = make_export(tmp_path / "failed", passed=False)
    with pytest.raises(RegistryError, match=rf"^{re.escape(str(failed / 'parity.json'))}: the parity gate did not pass \(passed: False\)"):
        read_export(failed)
    contradicted = make_export(tmp_path / "contradicted")
    info = json.loads((contradicted / "export.json").read_text())
    info["parity"]["passed"] = False
    (contradicted / "export.json").write_text(json.dumps(info))
    with pytest.raises(RegistryError, match=r"export.json: parity.passed is False but .*parity.json says true"):
        read_export(contradicted)
    (contradicted / "export.json").write_text("{not json")
    with pytest.raises(RegistryError, match=r"export description '.*export.json' is not valid JSON"):
        read_export(contradicted)


def test_missing_extra_gives_the_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    hint = "the model registry needs the 'registry' extra (mlflow-skinny): pip install 'spnas[registry]'"
    with pytest.raises(RegistryError) as err:
        Registry("http://127.0.0.1:1")
    assert str(err.value).startswith(hint)
    assert spnas_main(["registry", "--registry-uri", "http://127.0.0.1:1", "list"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith(f"spnas registry: error: {hint}")


# --------------------------------------------------------------------------------------------
# a live registry


def test_register_tags_and_artifacts(reg, server, tmp_path):
    export = make_export(tmp_path / "export", seed=1)
    weights = tmp_path / "best_weights.pth"
    weights.write_bytes(os.urandom(30_000))
    before = int(time.time() * 1000)
    info = reg.register(export, "reg-artifacts", weights=weights, storage_uri="s3://models/reg-artifacts/1",
                        extra_tags={"pipeline_run": "run-42"})
    assert isinstance(info, VersionInfo)
    assert (info.name, info.version, info.aliases) == ("reg-artifacts", 1, ())
    assert info.tags == {**EXPECTED_TAGS, "storage_uri": "s3://models/reg-artifacts/1", "pipeline_run": "run-42"}
    assert info.run_id and info.source.startswith("mlflow-artifacts:/") and info.source.endswith(f"/{info.run_id}/artifacts/export")
    assert before - 5000 <= info.created_ms <= int(time.time() * 1000) + 5000
    assert info.to_dict() == {"name": "reg-artifacts", "version": 1, "aliases": [], "tags": info.tags,
                              "source": info.source, "run_id": info.run_id, "created_ms": info.created_ms}
    assert reg.get("reg-artifacts", 1) == info == reg.get("reg-artifacts", "1")
    assert _runs(server, "reg-artifacts") == 1 and server["uri"] == server.uri
    # the server proxied the files to s3://mlflow/artifacts/<experiment>/<run>/artifacts/...: a
    # KServe storage initializer with S3 credentials can read the export there
    exp_id = info.source.split("/")[1]
    prefix = f"artifacts/{exp_id}/{info.run_id}/artifacts/"
    env = server.s3_env
    with Store(env[ENV_ENDPOINT], env[ENV_ACCESS_KEY], env[ENV_SECRET_KEY], region=env[ENV_REGION]) as st:
        stored = {o.key[len(prefix):]: o.size for o in st.list("mlflow", prefix)}
    assert stored == {**{f"export/{k}": len(v) for k, v in tree(export).items()}, "pytorch/model.pth": 30_000}

    dst = reg.download("reg-artifacts", 1, tmp_path / "dl")
    assert dst == tmp_path / "dl"
    assert tree(dst / "export") == tree(export)
    assert tree(dst / "pytorch") == {"model.pth": weights.read_bytes()}
    assert sorted(p.name for p in dst.iterdir()) == ["export", "pytorch"]  # no temporary folder left

    # a version without weights replaces both folders: no stale pytorch/ from another version
    other = make_export(tmp_path / "export2", seed=2)
    reg.register(other, "reg-artifacts")
    reg.download("reg-artifacts", 2, dst)
    assert tree(dst) == {f"export/{k}": v for k, v in tree(other).items()}


def test_candidates_champion_challenger_and_promotion(reg, tmp_path):
    name = "reg-promote"
    t0 = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    first, alias1 = reg.register_candidate(make_export(tmp_path / "e1", seed=1), name)
    assert (first.version, alias1, first.aliases) == (1, "champion", ("champion",))
    assert (first.tags["previous_champion"], first.tags["promotion_reason"]) == ("", "first candidate: the model had no champion")
    second, alias2 = reg.register_candidate(make_export(tmp_path / "e2", seed=2), name)
    assert (second.version, alias2, second.aliases) == (2, "challenger", ("challenger",))
    assert "promoted_at" not in second.tags
    assert reg.get(name, "champion").version == 1 and reg.get(name, "challenger").version == 2
    assert reg.alias(name, "champion") == reg.get(name, 1)
    assert [(v.version, v.aliases) for v in reg.versions(name)] == [(1, ("champion",)), (2, ("challenger",))]

    promoted = reg.promote(name, 2, reason="mAP +1.2 on the control")
    assert (promoted.version, promoted.aliases) == (2, ("champion",))
    assert (promoted.tags["previous_champion"], promoted.tags["promotion_reason"]) == ("1", "mAP +1.2 on the control")
    stamp = dt.datetime.fromisoformat(promoted.tags["promoted_at"])
    assert stamp.tzinfo is not None and t0 <= stamp <= dt.datetime.now(dt.timezone.utc)
    assert reg.alias(name, "challenger") is None  # it pointed at the promoted version
    assert [(v.version, v.aliases) for v in reg.versions(name)] == [(1, ()), (2, ("champion",))]
    assert {k: v for k, v in promoted.tags.items() if k in EXPECTED_TAGS} == EXPECTED_TAGS

    third, alias3 = reg.register_candidate(make_export(tmp_path / "e3", seed=3), name)
    assert (third.version, alias3) == (3, "challenger")
    again = reg.promote(name, 2, reason="again")  # already champion: nothing changes, challenger 3 stays
    assert again.tags == promoted.tags and reg.alias(name, "challenger").version == 3
    back = reg.promote(name, 1)
    assert (back.tags["previous_champion"], back.tags["promotion_reason"], back.aliases) == ("2", "", ("champion",))
    assert [(v.version, v.aliases) for v in reg.versions(name)] == [(1, ("champion",)), (2, ()), (3, ("challenger",))]


def test_refused_export_registers_nothing(reg, server, tmp_path):
    name = "reg-refused"
    reg.register(make_export(tmp_path / "ok"), name)
    for bad, message in [(make_export(tmp_path / "failed", passed=False), "the parity gate did not pass"),
                         (make_export(tmp_path / "no-gate", passed=None), "parity.json does not exist")]:
        with pytest.raises(RegistryError, match=message):
            reg.register(bad, name)
        with pytest.raises(RegistryError, match=message):
            reg.register_candidate(bad, name)
    with pytest.raises(RegistryError, match=r"weights file '.*/absent.pth' does not exist"):
        reg.register(make_export(tmp_path / "ok2"), name, weights=tmp_path / "absent.pth")
    with pytest.raises(RegistryError, match=r"model name 'bad/name': must be 1-128 letters"):
        reg.register(make_export(tmp_path / "ok3"), "bad/name")
    assert [v.version for v in reg.versions(name)] == [1]
    assert _runs(server, name) == 1


def test_unknown_model_version_alias(reg, tmp_path):
    name = "reg-unknown"
    reg.register_candidate(make_export(tmp_path / "e"), name)
    at = f"the model registry at {reg.uri}"
    cases = [(lambda: reg.get("no-such-model", 1), f"{at} has no model 'no-such-model'"),
             (lambda: reg.get(name, 99), f"{at} has no version 99 of model '{name}'"),
             (lambda: reg.get(name, "staging"), f"{at}: model '{name}' has no alias 'staging' (its aliases: champion -> 1)"),
             (lambda: reg.versions("no-such-model"), f"{at} has no model 'no-such-model'"),
             (lambda: reg.alias("no-such-model", "champion"), f"{at} has no model 'no-such-model'"),
             (lambda: reg.promote(name, 99), f"{at} has no version 99 of model '{name}'"),
             (lambda: reg.promote(name, "champion"), "version 'champion' must be a version number"),
             (lambda: reg.set_challenger(name, 7), f"{at} has no version 7 of model '{name}'"),
             (lambda: reg.download(name, "challenger", tmp_path / "dl"), f"model '{name}' has no alias 'challenger'"),
             (lambda: reg.get(name, 0), "version 0: version numbers start at 1"),
             (lambda: reg.get(name, True), "version True is neither a version number nor an alias name")]
    for call, message in cases:
        with pytest.raises(RegistryError) as err:
            call()
        assert message in str(err.value), (str(err.value), message)
    assert reg.alias(name, "staging") is None
    assert [(v.version, v.aliases) for v in reg.versions(name)] == [(1, ("champion",))]
    assert not (tmp_path / "dl").exists() or not any((tmp_path / "dl").iterdir())


def test_registry_down_fails_fast_and_changes_nothing(reg, tmp_path):
    name = "reg-down"
    reg.register_candidate(make_export(tmp_path / "e1"), name)
    reg.register_candidate(make_export(tmp_path / "e2"), name)
    uri = closed_port_uri()
    default, down = Registry(uri), Registry(uri, timeout_s=5)  # 30 s: 3 tries and 2 s of back-off; 5 s: 1 try
    for call, limit in ((default.check, 8), (lambda: down.promote(name, 2), 3),
                        (lambda: down.register(make_export(tmp_path / "e3"), name), 3), (lambda: down.versions(name), 3)):
        t = time.monotonic()
        with pytest.raises(RegistryError) as err:
            call()
        assert time.monotonic() - t < limit
        assert str(err.value).startswith(f"the model registry at {uri} is unreachable (connection refused) while ")
    assert [(v.version, v.aliases) for v in reg.versions(name)] == [(1, ("champion",)), (2, ("challenger",))]

    # a registry that accepts connections and never answers: bounded by timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t = time.monotonic()
        with pytest.raises(RegistryError, match=rf"^the model registry at {re.escape(uri)} is unreachable \(no answer in time\) while checking"):
            Registry(uri, timeout_s=2).check()
        assert 1.5 <= time.monotonic() - t < 8


def test_registry_imports_no_torch():
    code = "\n".join([
        "import sys",
        "from spnas.registry import Registry",
        "from spnas.registry.cli import register",
        "from spnas.utils.errors import RegistryError",
        "try:",
        f"    Registry('http://127.0.0.1:{free_port()}', timeout_s=1).check()",
        "except RegistryError as e:",
        "    print(e)",
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "unreachable (connection refused)" in r.stdout and r.stdout.splitlines()[-1] == "[]"


def test_credentials_are_not_shown():
    with pytest.raises(RegistryError) as err:
        Registry(f"http://alice:s3cret@127.0.0.1:{free_port()}", timeout_s=1).check()
    assert "s3cret" not in str(err.value) and "alice" not in str(err.value)
    assert str(err.value).startswith("the model registry at http://***@127.0.0.1:")


def test_concurrent_clients_keep_their_own_timeouts(reg, tmp_path):
    """Two registries in two threads: the env settings are per call, and calls do not interleave."""
    uri = closed_port_uri()
    errors: list[str] = []
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_")}

    def fail_down() -> None:
        try:
            Registry(uri, timeout_s=1).check()
        except RegistryError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=fail_down) for _ in range(3)]
    for th in threads:
        th.start()
    reg.check()
    for th in threads:
        th.join(timeout=30)
    assert len(errors) == 3 and all("unreachable" in e for e in errors)
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_")} == before  # restored after the calls


# --------------------------------------------------------------------------------------------
# the command line


def _spnas(*args: str, uri: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "spnas", "registry", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.mark.slow
def test_cli(server, tmp_path):
    name = "reg-cli"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"\x00weights")
    r = _spnas("register", str(make_export(tmp_path / "e1", seed=1)), "--name", name, "--weights", str(weights),
               "--storage-uri", "s3://models/cli/1", "--candidate", uri=server.uri)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["version"], out["aliases"], out["alias_set"], out["tags"]["storage_uri"]) == (1, ["champion"], "champion", "s3://models/cli/1")

    r = _spnas("--registry-uri", server.uri, "register", str(make_export(tmp_path / "e2", seed=2)), "--name", name)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["version"], json.loads(r.stdout)["aliases"]) == (2, [])

    r = _spnas("list", name, "--registry-uri", server.uri)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["version", "aliases", "mAP", "Δcontrol", "serial", "parallel", "data", "created", "(UTC)"]
    assert [ln.split()[:7] for ln in lines[1:]] == [
        ["1", "champion", "37.125", "1.25", "111-2111-211111-211", "0-1-0-2", "sha256:0123abcd"],
        ["2", "-", "37.125", "1.25", "111-2111-211111-211", "0-1-0-2", "sha256:0123abcd"]]

    r = _spnas("promote", name, "2", "--reason", "better on val", uri=server.uri)
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["aliases"], json.loads(r.stdout)["tags"]["previous_champion"]) == (["champion"], "1")

    r = _spnas("show", name, "champion", uri=server.uri)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["version"], shown["tags"]["promotion_reason"], shown["tags"]["parity"]) == (2, "better on val", "passed")

    r = _spnas("list", uri=server.uri)
    assert r.returncode == 0, r.stderr
    assert [ln.split()[:3] for ln in r.stdout.splitlines() if ln.startswith(f"{name} ")] == [[name, "2", "-"]]

    r = _spnas("show", name, "staging", uri=server.uri)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines() == [f"spnas registry: error: the model registry at {server.uri}: model '{name}' has no "
                                     "alias 'staging' (its aliases: champion -> 2)"]


def test_cli_errors_in_process(server, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = closed_port_uri()
    cases = [(["registry", "--registry-uri", uri, "--timeout", "1", "list"],
              f"spnas registry: error: the model registry at {uri} is unreachable (connection refused) while listing the registered models"),
             (["registry", "list"], "spnas registry: error: no model registry given: pass --registry-uri URI or set MLFLOW_TRACKING_URI"),
             (["registry", "register", str(make_export(tmp_path / "bad", passed=False)), "--name", "x", "--registry-uri", server.uri],
              f"spnas registry: error: {tmp_path / 'bad' / 'parity.json'}: the parity gate did not pass (passed: False)")]
    for argv, start in cases:
        assert spnas_main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
    assert issubclass(RegistryError, SpnasError)
