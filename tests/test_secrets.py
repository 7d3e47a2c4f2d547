"""Secrets: object-store credentials come only from the environment (on a cluster: the
Kubernetes secret ``spnas-s3`` through kfp-kubernetes ``use_secret_as_env``) and never show up
in a log record, stdout/stderr, a written file, an object published to the store, artifact
metadata or the compiled pipeline.

One real ``weed mini`` runs for the module with a recognisable access key and secret (the
canaries below). Every scan looks for the whole keys, for the marker both share (a truncated
key) and for the secret's last characters (a masked key such as ``****abcd``). The embedded
store's loopback-only binding is tested in ``test_storage.test_server_listens_on_loopback_only``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
import tempfile
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spnas import storage
from spnas.devtools import objectstore
from spnas.storage import StorageError, Store

ROOT = Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo.yml"
BUCKET = "spnas-secrets"
MARKER = "LEAKCANARY"
SECRET = f"SPNAS{MARKER}" + secrets.token_hex(12)
ACCESS = f"AK{MARKER}" + secrets.token_hex(6).upper()
NEEDLES = (SECRET, ACCESS, MARKER, SECRET[-12:], ACCESS[-8:])
CREDENTIAL_ENV = {"endpoint": storage.ENV_ENDPOINT, "accesskey": storage.ENV_ACCESS_KEY,
                  "secretkey": storage.ENV_SECRET_KEY}

# what each test scanned, printed at the end of the module (pytest -s) for the report
SCANNED: dict[str, dict[str, int]] = {}


# ---------------------------------------------------------------------------------------------
# scanning


def _found(data: str | bytes) -> list[str]:
    """The needles present in ``data``."""
    blob = data.encode("utf-8", "replace") if isinstance(data, str) else data
    return [n for n in NEEDLES if n.encode() in blob]


def _assert_clean(data: str | bytes, where: str) -> None:
    hits = _found(data)
    assert not hits, f"credential material {hits} in {where}"


def _scan_tree(*roots: Path) -> int:
    """Assert no file under ``roots`` holds a needle; returns how many files were read."""
    n = 0
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else ():
            if p.is_file() and not p.is_symlink():
                _assert_clean(p.read_bytes(), str(p))
                n += 1
    return n


def _scan_bucket(store: Store, prefix: str) -> int:
    """Download every object under ``prefix`` of the bucket and scan body, key and metadata."""
    n = 0
    for info in store.list(BUCKET, prefix):
        resp = store.client.get_object(BUCKET, info.key)
        try:
            body = resp.read()
            headers = json.dumps(dict(resp.headers))
        finally:
            resp.close()
            resp.release_conn()
        _assert_clean(body, f"object s3://{BUCKET}/{info.key}")
        _assert_clean(info.key + headers, f"key/headers of s3://{BUCKET}/{info.key}")
        n += 1
    return n


def _error_text(exc: BaseException) -> str:
    """Everything an error could show: message, repr, args and the printed traceback."""
    return "\n".join([str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))])


class _AllRecords(logging.Handler):
    """Keeps every record fully formatted (message, arguments, exception text, stack)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.names: set[str] = set()
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.names.add(record.name)
        self.lines.append(f"{self.format(record)} | args={record.args!r}")


@contextlib.contextmanager
def _debug_logging(caplog: pytest.LogCaptureFixture) -> Iterator[_AllRecords]:
    """Every logger at DEBUG, each record kept by ``caplog`` and by a handler on the root logger
    (also on loggers that do not propagate). torch's own loggers keep their levels: at DEBUG they
    trace every autograd node, which sees tensors only and would slow training many times."""
    caplog.set_level(logging.DEBUG)
    handler = _AllRecords()
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n != "torch" and not n.startswith("torch.")]
    loggers = [lg for lg in loggers if isinstance(lg, logging.Logger)]
    levels = {lg: lg.level for lg in loggers}
    quiet = [lg for lg in loggers if not lg.propagate]
    for lg in loggers:
        if lg.level > logging.DEBUG:
            lg.setLevel(logging.DEBUG)
    for lg in [logging.root, *quiet]:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in [logging.root, *quiet]:
            lg.removeHandler(handler)
        for lg, level in levels.items():
            lg.setLevel(level)


def _check_output(handler: _AllRecords, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture,
                  recwarn: pytest.WarningsRecorder) -> dict[str, int]:
    """Assert the logs, the process's stdout/stderr and the warnings are clean; return counts."""
    out, err = capfd.readouterr()
    lines = handler.lines + [caplog.text] + [r.getMessage() for r in caplog.records]
    for i, line in enumerate(lines):
        _assert_clean(line, f"log line {i}: {line[:200]}")
    _assert_clean(out, "stdout")
    _assert_clean(err, "stderr")
    for w in recwarn:
        _assert_clean(f"{w.category.__name__}: {w.message} {w.filename}", "a warning")
    return {"log_records": len(handler.lines), "stdout_lines": len(out.splitlines()),
            "stderr_lines": len(err.splitlines()), "warnings": len(recwarn)}


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, a second spinning thread makes the tiny
    trainings several times slower as soon as another process wants a core."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A weed mini with the canary credentials and bucket ``BUCKET`` (stopped by PID at the end)."""
    d = tmp_path_factory.mktemp("objectstore")
    info: dict[str, Any] = {}
    try:
        for attempt in range(3):  # another process may grab a port between the check and the start
            try:
                info = objectstore.start(d, port=objectstore.free_port_block(), access_key=ACCESS, secret_key=SECRET,
                                         buckets=[BUCKET], ready_timeout=30)
                break
            except StorageError:
                objectstore.stop(d, grace=2)
                for f in (objectstore.STATE_FILE, objectstore.PID_FILE):
                    (d / f).unlink(missing_ok=True)
                if attempt == 2:
                    raise
        yield {**info, "dir": d, "env": objectstore.env(d)}
    finally:
        objectstore.stop(d, grace=5)
        if SCANNED:
            print("\nsecrets scan:", json.dumps(SCANNED, sort_keys=True))


@pytest.fixture
def s3env(server: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The credentials in the environment (as the Kubernetes secret puts them), a private cache
    and temporary folder (both scanned by the tests)."""
    for k, v in server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(storage.ENV_RETRY_DELAY, "0.01")
    monkeypatch.setenv(storage.ENV_CACHE, str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return server["env"]


@pytest.fixture(scope="module")
def dataset_uri(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny COCO data set uploaded to the store."""
    from helpers import demo
    root = demo(tmp_path_factory.mktemp("data"), train=16, val=6, size=96)
    uri = f"minio://{BUCKET}/datasets/tiny"
    with Store(server["endpoint"], ACCESS, SECRET, region=objectstore.REGION) as st:
        storage.upload(root, uri, store=st)
    return uri


def _tiny_raw(data_root: str) -> dict[str, Any]:
    from test_run import tiny_overrides

    from spnas.config import apply_overrides
    return apply_overrides(yaml.safe_load(DEMO.read_text()), tiny_overrides(data_root))


# ---------------------------------------------------------------------------------------------
# compiled pipeline


def _check_secret_wiring(docs: list[dict]) -> int:
    """Every executor gets the three credential variables from the Kubernetes secret and none
    as a literal value; returns the number of executors."""
    from pipelines.spnas_pipeline import SECRET as SECRET_NAME
    executors = docs[0]["deploymentSpec"]["executors"]
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors and set(k8s) == set(executors)
    for name, spec in executors.items():
        literal = {e.get("name") for e in spec["container"].get("env") or []}
        assert not literal & set(CREDENTIAL_ENV.values()), (name, literal)
        (entry,) = k8s[name]["secretAsEnv"]
        assert entry["secretName"] == SECRET_NAME
        assert {m["secretKey"]: m["envVar"] for m in entry["keyToEnv"]} == CREDENTIAL_ENV
    return len(executors)


def test_compiled_pipeline_names_the_secret_never_its_values(s3env: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture,
                                                             capfd: pytest.CaptureFixture,
                                                             recwarn: pytest.WarningsRecorder) -> None:
    """Compiled with the credentials in the environment (what ``make compile`` runs), the YAML
    holds no key, only references to the secret; so does the checked-in file."""
    monkeypatch.syspath_prepend(str(ROOT))
    from pipelines.spnas_pipeline import compile_pipeline
    assert os.environ[storage.ENV_SECRET_KEY] == SECRET
    with _debug_logging(caplog) as handler:
        out = compile_pipeline(DEMO, tmp_path / "spnas_pipeline.yaml")
    text = out.read_text()
    _assert_clean(text, "the compiled pipeline")
    executors = _check_secret_wiring(list(yaml.safe_load_all(text)))
    checked_in = list(yaml.safe_load_all((ROOT / "pipelines" / "spnas_pipeline.yaml").read_text()))
    assert _check_secret_wiring(checked_in) == executors
    counts = _check_output(handler, caplog, capfd, recwarn)
    files = _scan_tree(tmp_path)
    SCANNED["compile"] = {**counts, "files": files, "executors": executors, "yaml_bytes": len(text)}


# ---------------------------------------------------------------------------------------------
# a local run that reads its data from and publishes to the store


def _run_argv(data_root: str, workdir: Path, *extra: str) -> list[str]:
    """``spnas -v run`` of the demo config shrunk to the tiny test size, on one worker."""
    from helpers import tiny_overrides
    argv = ["-v", "run", str(DEMO), "--workdir", str(workdir), "--workers", "1", *extra]
    for o in tiny_overrides(data_root):
        argv += ["--set", o]
    return argv


@pytest.mark.slow
def test_local_run_and_publish_leak_nothing(s3env: dict[str, str], dataset_uri: str, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture,
                                            recwarn: pytest.WarningsRecorder) -> None:
    """``spnas -v run --publish`` (:func:`spnas.run.run`) with a ``minio://`` data root: every log
    record at DEBUG, stdout and stderr (progress and summary), every file of the workdir, cache
    and temporary folder, and every object in the bucket (data set and published run)."""
    from spnas.cli.main import main
    publish = f"minio://{BUCKET}/runs/local-1"
    with _debug_logging(caplog) as handler:
        assert main(_run_argv(dataset_uri, tmp_path / "work", "--publish", publish)) == 0
    reports = json.loads((tmp_path / "work" / "output" / "reports.json").read_text())
    assert list(reports["phases"]) == ["fine_tune", "serial", "reignition", "parallel", "fully_train"]
    assert any(n.startswith("urllib3") for n in handler.names), "the HTTP layer's DEBUG records were not captured"
    assert any(f"to {publish}" in line for line in handler.lines)
    counts = _check_output(handler, caplog, capfd, recwarn)
    assert counts["stdout_lines"] > 0
    files = _scan_tree(tmp_path / "work", tmp_path / "cache", tmp_path / "tmp")
    with Store.from_env() as st:
        published = st.list(BUCKET, "runs/local-1/")
        objects = _scan_bucket(st, "")
    assert len(published) == sum(p.is_file() for p in (tmp_path / "work" / "output").rglob("*")) > 10
    SCANNED["local_run"] = {**counts, "files": files, "objects": objects}


# ---------------------------------------------------------------------------------------------
# the pipeline's components, with real artifact objects


@pytest.mark.slow
def test_components_and_publish_step_leak_nothing(s3env: dict[str, str], dataset_uri: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture,
                                                  recwarn: pytest.WarningsRecorder) -> None:
    """stage data -> fine_tune -> serial search (one candidate) -> front -> full train -> publish,
    each component's body called with real artifacts and a ``minio://`` run prefix: return
    values, artifact metadata and files, the published objects and all output are clean. The
    data set, staged once into the run's workspace, is downloaded once: every later task (the
    candidate's child process included) reads the staged copy (0 downloads, counted through
    ``SPNAS_FETCH_LOG`` across processes)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from kfp.dsl import HTML, Dataset, Markdown, Metrics, Model

    from components.spnas_components import build_components
    c = build_components()
    art = tmp_path / "artifacts"
    art.mkdir()
    artifacts: list[Any] = []
    workspace, fetch_log = tmp_path / "workspace", tmp_path / "fetch.log"
    monkeypatch.setenv(storage.ENV_FETCH_LOG, str(fetch_log))

    def make(kind: Any, name: str) -> Any:
        a = kind(name=name, uri=str(art / name), metadata={})
        artifacts.append(a)
        return a

    config = json.dumps(_tiny_raw(dataset_uri))
    returned: list[Any] = []
    with _debug_logging(caplog) as handler:
        overrides = c.prepare.python_func(config=config, seed=0, candidate_epochs=-1, full_epochs=-1)
        run_uri = c.run_prefix.python_func(results_uri=f"minio://{BUCKET}/kfp-runs", job_id="job-1")
        data = {"dataset": make(Dataset, "dataset"), "workspace": str(workspace)}
        c.stage_data.python_func(config=config, overrides=overrides, data_uri=dataset_uri, run_uri=run_uri, **data)
        seeds = c.fine_tune.python_func(config=config, step="fine_tune", **data, run_uri=run_uri,
                                        overrides=overrides, model=make(Model, "ft-model"),
                                        metrics=make(Metrics, "ft-metrics"))
        state = c.search_init.python_func(config=config, step="serial", seeds=seeds, run_uri=run_uri,
                                          overrides=overrides, **data)
        proposal = c.propose.python_func(state=state, k=1, run_uri=run_uri, step="serial")
        items = c.candidates.python_func(proposal=proposal, run_uri=run_uri, overrides=overrides)
        results = [c.train_candidate.python_func(config=config, step="serial", candidate=item, **data, time_limit=0,
                                                 accelerator_type="nvidia.com/gpu", gpus_per_task=0,
                                                 cpu_per_task="1", memory_per_task="2G",
                                                 model=make(Model, f"cand-{i}-model"),
                                                 metrics=make(Metrics, f"cand-{i}-metrics"))
                   for i, item in enumerate(items)]
        assert results and all(r["status"] == "ok" for r in results), results
        state = c.update.python_func(proposal=proposal, results=results, step="serial", run_uri=run_uri)
        front = c.search_front.python_func(state=state, run_uri=run_uri, step="serial",
                                           plot=make(HTML, "serial-plot"))
        chosen = c.choose.python_func(config=config, step="fully_train", front=front, run_uri=run_uri,
                                      overrides=overrides)
        trained = [c.full_train.python_func(config=config, step="fully_train", item=item, **data,
                                            accelerator_type="nvidia.com/gpu", gpus_per_task=0, cpu_per_task="1",
                                            memory_per_task="2G", model=make(Model, f"full-model-{i}"),
                                            metrics=make(Metrics, f"full-metrics-{i}"))
                   for i, item in enumerate(chosen)]
        best = c.finish.python_func(config=config, records=trained, run_uri=run_uri, step="fully_train",
                                     overrides=overrides)
        pod = {"accelerator_type": "nvidia.com/gpu", "gpus_per_task": 0, "cpu_per_task": "1", "memory_per_task": "2G"}
        serial_control = c.phase_control.python_func(config=config, step="serial", state=state, **data,
                                                     run_uri=run_uri, overrides=overrides, **pod,
                                                     model=make(Model, "serial-control-model"),
                                                     metrics=make(Metrics, "serial-control-metrics"))
        controls = c.final_control.python_func(config=config, step="fully_train", fine_tuned=seeds, best=best,
                                               **data, run_uri=run_uri, overrides=overrides, **pod,
                                               model=make(Model, "control-model"), metrics=make(Metrics, "control-metrics"))
        weights = c.publish.python_func(config=config, serial_front=front, parallel_front=front, best=best,
                                        controls=controls, serial_control=serial_control, parallel_control={},
                                        run_uri=run_uri, overrides=overrides, report=make(Markdown, "report"))
        returned += [overrides, run_uri, seeds, state, proposal, items, results, front, chosen, trained, best,
                     serial_control, controls, weights]
    assert weights == f"{run_uri}/model_final.pth"  # a copy of the winner, the one weight file under the run
    winner = json.loads(storage.local_path(f"{run_uri}/control.json").read_text())["winner"]
    won = controls["control"]["weights"] if winner == "control" else best["weights"]
    assert storage.local_path(weights).read_bytes() == Path(won).read_bytes()
    meta = data["dataset"].metadata
    assert meta["root"] == dataset_uri and meta["staged"].startswith(str(workspace / "spnas" / "cache"))
    assert meta["downloaded"] == meta["objects"] > 0
    fetches = [json.loads(line) for line in fetch_log.read_text().splitlines()]
    data_fetches = [f for f in fetches if f["uri"].rstrip("/") == dataset_uri.rstrip("/")]
    assert len(data_fetches) >= 6  # stage, fine_tune, the candidate's child, full train, two controls
    assert sum(f["downloaded"] for f in data_fetches) == meta["objects"]  # one download per object per run
    assert len({f["pid"] for f in data_fetches}) == 2  # this process, and the candidate's training child
    models = [a for a in artifacts if isinstance(a, Model)]
    assert len(models) == 5 and all(a.metadata["data_version"] == meta["version"] for a in models)
    # weights stored once, in the Model artifacts; the run's prefix keeps the final model only
    models_by_name = {a.name: a for a in artifacts}
    assert best["weights"] == models_by_name["full-model-0"].uri
    assert controls["control"]["weights"] == models_by_name["control-model"].uri
    assert [r["weights"] for r in results] == [models_by_name["cand-0-model"].uri]
    for i, value in enumerate(returned):
        _assert_clean(json.dumps(value), f"return value {i}")
    for a in artifacts:
        _assert_clean(json.dumps(a.metadata), f"metadata of artifact {a.name}")
        _assert_clean(a.uri, f"uri of artifact {a.name}")
    counts = _check_output(handler, caplog, capfd, recwarn)
    files = _scan_tree(art, tmp_path / "cache", tmp_path / "tmp", workspace)
    with Store.from_env() as st:
        objects = _scan_bucket(st, "kfp-runs/job-1/")
        assert [o.key for o in st.list(BUCKET, "kfp-runs/job-1/") if o.key.endswith(".pth")] == \
            ["kfp-runs/job-1/model_final.pth"]
    assert objects >= 8
    SCANNED["components"] = {**counts, "files": files, "objects": objects, "artifacts": len(artifacts),
                             "return_values": len(returned)}


# ---------------------------------------------------------------------------------------------
# error paths


def test_failures_never_show_credentials(s3env: dict[str, str], server: dict[str, Any], dataset_uri: str,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture,
                                         recwarn: pytest.WarningsRecorder) -> None:
    """A wrong secret, an unknown access key, an unreachable endpoint, credentials written into
    the endpoint, credentials only in a file (not the environment): each error names what is
    wrong and shows no key, neither in its message and traceback nor in a failed candidate."""
    monkeypatch.syspath_prepend(str(ROOT))
    from kfp.dsl import Dataset, Metrics, Model

    from components.spnas_components import build_components
    from spnas.cli.main import main
    from spnas.config import load_config
    from spnas.orchestration.local import run
    wrong = f"SPNAS{MARKER}WRONG" + secrets.token_hex(8)
    errors: list[str] = []

    def fails(fn: Any, match: str) -> None:
        with pytest.raises(StorageError, match=match) as err:
            fn()
        errors.append(_error_text(err.value))

    c = build_components()
    config = json.dumps(_tiny_raw(dataset_uri))
    candidate = {"id": 9, "desc": {"backbone": {"code": "1-2-2-2"}}, "parent_desc": {}, "parent": 0,
                 "parent_weights": f"minio://{BUCKET}/datasets/tiny/annotations/instances_val2017.json",
                 "ops": ["expand"], "round": 0, "run_uri": f"minio://{BUCKET}/kfp-runs/job-err", "overrides": "[]"}
    model = Model(name="model", uri=str(tmp_path / "art" / "model"), metadata={})
    with _debug_logging(caplog) as handler:
        for key, value in ((storage.ENV_SECRET_KEY, wrong), (storage.ENV_ACCESS_KEY, f"AK{MARKER}NOSUCHKEY")):
            with monkeypatch.context() as m:
                m.setenv(key, value)
                denied = f"access denied at {server['endpoint']}"
                fails(lambda: storage.fetch(dataset_uri), denied)
                fails(lambda: storage.upload(DEMO, f"minio://{BUCKET}/x/"), denied)
                fails(lambda: run(load_config(_tiny_raw(dataset_uri), workdir=tmp_path / "w"), workers=1), denied)
                assert main(_run_argv(dataset_uri, tmp_path / "w", "--publish", f"minio://{BUCKET}/runs/w")) == 2
                printed = capfd.readouterr()
                assert denied in printed.err
                errors += [printed.out, printed.err]
                result = c.train_candidate.python_func(
                    config=config, step="serial", candidate=candidate, workspace="", time_limit=0,
                    dataset=Dataset(name="dataset", uri=str(tmp_path / "art" / "dataset"),
                                    metadata={"root": dataset_uri, "version": "0" * 16}),
                    accelerator_type="nvidia.com/gpu", gpus_per_task=0, cpu_per_task="1", memory_per_task="2G",
                    model=model, metrics=Metrics(name="metrics", uri=str(tmp_path / "art" / "metrics"), metadata={}))
                assert result["status"] == "failed" and denied in result["error"]
                assert Path(model.path).is_dir() and not any(Path(model.path).iterdir())
                errors += [json.dumps(result), json.dumps(model.metadata)]
        with monkeypatch.context() as m:
            m.setenv(storage.ENV_ENDPOINT, "127.0.0.1:1")
            m.setenv(storage.ENV_RETRIES, "2")
            fails(lambda: storage.fetch(dataset_uri), "unreachable or failing after 2 attempt")
        for endpoint in (f"{ACCESS}:{SECRET}@127.0.0.1:{server['port']}",
                         f"http://{ACCESS}:{SECRET}@127.0.0.1:{server['port']}",
                         f"ftp://{ACCESS}:{SECRET}@127.0.0.1:{server['port']}",
                         f"https://{ACCESS}:{SECRET}@minio.example/path"):
            with monkeypatch.context() as m:
                m.setenv(storage.ENV_ENDPOINT, endpoint)
                fails(lambda: storage.fetch(dataset_uri), "must not contain credentials")
        # a credentials file is no source: only the environment (the Kubernetes secret) is
        home = tmp_path / "home"
        (home / ".aws").mkdir(parents=True)
        (home / ".aws" / "credentials").write_text(
            f"[default]\naws_access_key_id = {ACCESS}\naws_secret_access_key = {SECRET}\n")
        with monkeypatch.context() as m:
            m.setenv("HOME", str(home))
            m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
            m.delenv(storage.ENV_ACCESS_KEY)
            m.delenv(storage.ENV_SECRET_KEY)
            fails(lambda: storage.fetch(dataset_uri), f"{storage.ENV_ACCESS_KEY} is not set")
    for i, text in enumerate(errors):
        _assert_clean(text, f"error {i}: {text[:300]}")
    counts = _check_output(handler, caplog, capfd, recwarn)
    files = _scan_tree(tmp_path / "art", tmp_path / "cache", tmp_path / "tmp", tmp_path / "w")
    SCANNED["errors"] = {**counts, "files": files, "errors": len(errors)}


# ---------------------------------------------------------------------------------------------
# the embedded object store


def _anonymous(method: str, url: str, data: bytes | None = None) -> int:
    """The HTTP status of an unsigned request."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_embedded_store_always_runs_with_credentials(server: dict[str, Any], tmp_path: Path) -> None:
    """Unsigned requests are refused; the keys are on neither the server's command line nor in
    any file of its folder but the two private ones; ``start``
    refuses missing, partial or weak keys (given or stored) before launching anything, and
    without keys it makes random strong ones. (Loopback-only binding: test_storage.)"""
    base = server["endpoint"]
    for method, path, data in (("GET", "/", None), ("GET", f"/{BUCKET}/", None),
                               ("GET", f"/{BUCKET}/datasets/tiny/annotations/instances_val2017.json", None),
                               ("PUT", f"/{BUCKET}/anonymous.txt", b"x"), ("PUT", "/anonymous-bucket", None)):
        assert _anonymous(method, base + path, data) in (401, 403), (method, path)
    with Store(base, ACCESS, SECRET, region=objectstore.REGION) as st:
        assert st.stat(BUCKET, "anonymous.txt") is None and not st.bucket_exists("anonymous-bucket")
    cmdline = Path(f"/proc/{server['pid']}/cmdline").read_bytes()
    _assert_clean(cmdline, "the server's command line")
    # its folder: the keys only in the two 0600 files; the log (it names the key id of rejected
    # requests, such as the error test's unknown one) 0600 and without the real keys; the
    # SeaweedFS data (objects, filer, admin state) clean
    d = server["dir"]
    private = {d / objectstore.CREDENTIALS_FILE, d / objectstore.IDENTITIES_FILE, d / objectstore.LOG_FILE}
    for f in private:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    weed_log = (d / objectstore.LOG_FILE).read_bytes()
    assert SECRET.encode() not in weed_log and ACCESS.encode() not in weed_log
    files = 0
    for f in sorted(d.rglob("*")):
        if f.is_file() and f not in private:
            _assert_clean(f.read_bytes(), str(f))
            files += 1
    SCANNED["objectstore"] = {"files": files}

    d = tmp_path / "weak"
    port = objectstore.free_port_block()
    for ak, sk in ((ACCESS, None), (None, SECRET), ("", ""), ("ab", SECRET), (ACCESS, "seven77"),
                   (ACCESS, "with space 123"), (f"{ACCESS} x", SECRET)):
        with pytest.raises(StorageError, match="access_key and secret_key|access key must have") as err:
            objectstore.start(d, port=port, access_key=ak, secret_key=sk, ready_timeout=5)
        _assert_clean(_error_text(err.value), "a refused start")
        assert not (d / objectstore.CREDENTIALS_FILE).exists() and not objectstore.status(d, probe=False)["running"]
    (d / objectstore.CREDENTIALS_FILE).write_text(json.dumps({"access_key": "ab", "secret_key": "weak"}))
    with pytest.raises(StorageError, match="stored credentials .* access key must have"):
        objectstore.start(d, port=port, ready_timeout=5)
    assert not objectstore.status(d, probe=False)["running"]
    assert not (d / objectstore.IDENTITIES_FILE).exists()

    made = [objectstore._credentials(tmp_path / "fresh", None, None) for _ in range(2)]
    assert made[0] != made[1]
    for ak, sk in made:
        assert len(ak) >= 20 and len(sk) >= 40 and ak.isalnum() and sk.isalnum()
