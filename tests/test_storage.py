"""Object storage (spnas.storage), the embedded SeaweedFS server (spnas.objectstore) and their CLI.

A real ``weed mini`` runs on free loopback ports in a temporary folder, with credentials, for
the whole module, and is always stopped by PID at the end.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import secrets
import stat
import threading
import time
from pathlib import Path

import pytest

from spnas import storage
from spnas.cli.storage import register
from spnas.devtools import objectstore
from spnas.storage import FetchStats, StorageError, Store
from spnas.utils.errors import SpnasError

BUCKET = "spnas-test"


def _start(d: Path, **kw) -> dict:
    """Start a server on a free port block (another process may grab a port: try again)."""
    last: Exception | None = None
    for _ in range(3):
        try:
            return objectstore.start(d, port=objectstore.free_port_block(), ready_timeout=30, **kw)
        except StorageError as exc:
            last = exc
            objectstore.stop(d, grace=2)
            for f in (objectstore.STATE_FILE, objectstore.PID_FILE):
                (d / f).unlink(missing_ok=True)
    raise RuntimeError(f"could not start weed mini: {last}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("objectstore")
    creds = {"access_key": "AKSPNAS" + secrets.token_hex(6).upper(), "secret_key": "sk" + secrets.token_hex(16)}
    reader = ("AKREAD" + secrets.token_hex(6).upper(), "sk" + secrets.token_hex(16))  # may read and list only
    try:
        info = _start(d, buckets=[BUCKET], readers=dict([reader]), **creds)
        yield {**info, "dir": d, "env": objectstore.env(d), "reader": reader, **creds}
    finally:
        res = objectstore.stop(d, grace=5)
        assert not objectstore.status(d, probe=False)["running"], res


@pytest.fixture
def s3env(server, monkeypatch):
    for k, v in server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(storage.ENV_RETRY_DELAY, "0.01")
    return server["env"]


def _tree(root: Path, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"annotations/instances_train2017.json": b'{"images": []}',
             "train2017/000001.jpg": rng.randbytes(70_000),
             "train2017/000002.jpg": rng.randbytes(1),
             "val2017/sub/000003.jpg": rng.randbytes(5_000),
             "empty.txt": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------
# no server needed


def test_uri_parsing():
    assert storage.is_uri("s3://b/k") and storage.is_uri("minio://bkt/x") and storage.is_uri("S3://bkt")
    assert not storage.is_uri("/data/x") and not storage.is_uri("gs://b/k") and not storage.is_uri(Path("s3:/x"))
    assert storage.parse_uri("s3://my-bucket/a/b.pth") == ("my-bucket", "a/b.pth")
    assert storage.parse_uri("minio://my-bucket/a/") == ("my-bucket", "a/")
    assert storage.parse_uri("s3://my-bucket") == ("my-bucket", "")
    for bad, words in [("gs://bkt/x", "not an object URI"), ("s3:///x", "no bucket"), ("s3://B_ad/x", "bucket name"),
                       ("s3://ab/x", "bucket name"), ("s3://bkt/a/../b", "'..'"), ("s3://bkt/a//b", "segment"),
                       ("/local/path", "not an object URI")]:
        with pytest.raises(StorageError, match=words.replace(".", r"\.")):
            storage.parse_uri(bad)


def test_local_paths_pass_through(tmp_path):
    assert storage.fetch(str(tmp_path / "x")) == tmp_path / "x"
    assert storage.local_path(tmp_path) == tmp_path


@pytest.mark.parametrize("missing", [storage.ENV_ENDPOINT, storage.ENV_ACCESS_KEY, storage.ENV_SECRET_KEY])
def test_missing_env_variable_is_named(monkeypatch, missing):
    env = {storage.ENV_ENDPOINT: "127.0.0.1:1", storage.ENV_ACCESS_KEY: "ak", storage.ENV_SECRET_KEY: "topsecret1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(missing)
    with pytest.raises(StorageError, match=missing) as err:
        storage.fetch("s3://bkt/x")
    assert "topsecret1" not in str(err.value)


def test_endpoint_forms():
    assert Store("127.0.0.1:9000", "a", "b").endpoint == "http://127.0.0.1:9000"
    st = Store("https://minio.example:9443", "a", "b")
    assert st.secure and st.endpoint == "https://minio.example:9443"
    assert not Store("http://h:1/", "a", "b").secure
    for bad in ("ftp://h:1", "http://h:1/path", "http://u:p@h:1", "h:port"):
        with pytest.raises(StorageError):
            Store(bad, "a", "b")


def test_retry_policy_and_transient_errors(caplog):
    import urllib3
    st = Store("127.0.0.1:1", "a", "b", retry=storage.RetryPolicy(tries=4, delay=0.01))
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise urllib3.exceptions.ProtocolError("connection reset")
        return "ok"
    with caplog.at_level(logging.WARNING, logger="spnas.storage"):
        assert st.call("stat", "s3://bkt/k", flaky) == "ok"
    assert len(calls) == 3 and calls[2] - calls[1] >= 0.02 - 1e-3  # exponential: 0.01, then 0.02
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2

    def broken():
        raise ValueError("not transient")
    with pytest.raises(StorageError, match="stat s3://bkt/k failed at http://127.0.0.1:1"):
        st.call("stat", "s3://bkt/k", broken)


# ---------------------------------------------------------------------------------------------
# against the real server


def test_file_round_trip(s3env, tmp_path):
    src = tmp_path / "model_3.pth"
    src.write_bytes(os.urandom(300_000))
    uris = storage.upload(src, f"s3://{BUCKET}/run1/weights/")
    assert uris == [f"s3://{BUCKET}/run1/weights/model_3.pth"]
    assert storage.upload(src, f"minio://{BUCKET}/run1/renamed.pth") == [f"minio://{BUCKET}/run1/renamed.pth"]
    stats = FetchStats()
    got = storage.fetch(uris[0], tmp_path / "cache", stats=stats)
    assert got.read_bytes() == src.read_bytes() and stats.bytes_downloaded == 300_000
    assert storage.local_path(f"minio://{BUCKET}/run1/renamed.pth", tmp_path / "cache").read_bytes() == src.read_bytes()
    assert storage.exists(uris[0]) and not storage.exists(f"s3://{BUCKET}/run1/weights/nope.pth")


def test_folder_round_trip_and_listing(s3env, tmp_path):
    files = _tree(tmp_path / "ds")
    uris = storage.upload(tmp_path / "ds", f"s3://{BUCKET}/datasets/demo")
    expected = sorted(f"s3://{BUCKET}/datasets/demo/{k}" for k in files)
    assert uris == expected
    assert storage.list_objects(f"s3://{BUCKET}/datasets/demo") == expected
    assert storage.list_objects(f"s3://{BUCKET}/datasets/demo/") == expected
    assert storage.list_objects(f"s3://{BUCKET}/datasets/dem") == []  # whole path segments only
    assert storage.list_objects(f"s3://{BUCKET}/datasets/none/") == []
    assert storage.exists(f"s3://{BUCKET}/datasets/demo") and storage.exists(f"s3://{BUCKET}/datasets/demo/val2017")
    assert storage.exists(f"s3://{BUCKET}") and not storage.exists(f"s3://{BUCKET}/datasets/dem")
    cache = tmp_path / "cache"
    folder = storage.fetch(f"s3://{BUCKET}/datasets/demo", cache)
    assert folder.is_dir() and _read_tree(folder) == files
    assert storage.fetch(f"s3://{BUCKET}/datasets/demo/", cache) == folder
    sub = storage.fetch(f"s3://{BUCKET}/datasets/demo/val2017", cache)
    assert _read_tree(sub) == {"sub/000003.jpg": files["val2017/sub/000003.jpg"]}


def test_warm_cache_and_changed_objects(s3env, server, tmp_path):
    _tree(tmp_path / "ds", seed=1)
    prefix = f"s3://{BUCKET}/warm/ds"
    storage.upload(tmp_path / "ds", prefix)
    cache = tmp_path / "cache"
    cold, warm = FetchStats(), FetchStats()
    folder = storage.fetch(prefix, cache, stats=cold)
    assert cold.downloaded == 5 and cold.bytes_downloaded == 70_000 + 1 + 5_000 + 14
    before = storage.totals()["bytes_downloaded"]
    assert storage.fetch(prefix, cache, stats=warm) == folder
    assert (warm.objects, warm.downloaded, warm.bytes_downloaded) == (5, 0, 0)
    assert storage.totals()["bytes_downloaded"] == before

    # a changed object (new ETag) is downloaded again, alone
    new = b"changed content " * 100
    (tmp_path / "ds" / "train2017" / "000002.jpg").write_bytes(new)
    storage.upload(tmp_path / "ds" / "train2017" / "000002.jpg", f"{prefix}/train2017/000002.jpg")
    again = FetchStats()
    storage.fetch(prefix, cache, stats=again)
    assert (again.downloaded, again.bytes_downloaded) == (1, len(new))
    assert (folder / "train2017" / "000002.jpg").read_bytes() == new

    # single object: warm, then changed
    one = f"{prefix}/empty.txt"
    s1, s2, s3 = FetchStats(), FetchStats(), FetchStats()
    path = storage.fetch(one, cache, stats=s1)
    assert s1.bytes_downloaded == 0 and s1.downloaded == 0  # already mirrored by the folder fetch
    (tmp_path / "v2").write_bytes(b"v2!")
    storage.upload(tmp_path / "v2", one)
    storage.fetch(one, cache, stats=s2)
    assert path.read_bytes() == b"v2!" and s2.bytes_downloaded == 3
    # a local copy changed behind the cache's back is replaced
    path.write_bytes(b"tampered")
    storage.fetch(one, cache, stats=s3)
    assert path.read_bytes() == b"v2!" and s3.downloaded == 1

    # an object deleted from the store disappears from the mirrored folder
    with Store.from_env() as st:
        st.client.remove_object(BUCKET, "warm/ds/val2017/sub/000003.jpg")
    time.sleep(0.01)
    storage.fetch(prefix, cache)
    assert not (folder / "val2017" / "sub" / "000003.jpg").exists()
    assert not any((cache / ".tmp").iterdir())


def test_bad_credentials_name_the_endpoint(s3env, server, monkeypatch, tmp_path):
    endpoint = server["endpoint"]
    monkeypatch.setenv(storage.ENV_SECRET_KEY, "wrong-secret-123")
    for call in (lambda: storage.fetch(f"s3://{BUCKET}/x", tmp_path), lambda: storage.list_objects(f"s3://{BUCKET}/"),
                 lambda: storage.upload(tmp_path, f"s3://{BUCKET}/y/")):
        with pytest.raises(StorageError, match=f"access denied at {endpoint}") as err:
            call()
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in str(err.value)
        assert "wrong-secret-123" not in str(err.value) and server["secret_key"] not in str(err.value)
    monkeypatch.setenv(storage.ENV_ACCESS_KEY, "NOSUCHKEY")
    with pytest.raises(StorageError, match=f"access denied at {endpoint}"):
        storage.fetch(f"s3://{BUCKET}/x", tmp_path)


def test_missing_bucket_and_key_name_the_uri(s3env, tmp_path):
    for uri in ("s3://no-such-bucket/x.pth", f"s3://{BUCKET}/no/such/key.pth", f"s3://{BUCKET}/no/such/prefix/",
                "minio://no-such-bucket/"):
        with pytest.raises(StorageError) as err:
            storage.fetch(uri, tmp_path / "cache")
        assert uri in str(err.value)
    with pytest.raises(StorageError, match="s3://no-such-bucket/p/.*does not exist"):
        storage.list_objects("s3://no-such-bucket/p/")
    with pytest.raises(StorageError, match="s3://no-such-bucket/p/.*does not exist"):
        storage.upload(tmp_path, "s3://no-such-bucket/p/")
    assert not storage.exists("s3://no-such-bucket/p")


def test_write_check_leaves_nothing_and_names_what_refused(s3env, server, tmp_path, monkeypatch):
    marker = storage.check_writable(f"s3://{BUCKET}/results/run-1")
    assert marker.startswith(f"s3://{BUCKET}/results/run-1/.spnas-write-check-")
    assert storage.list_objects(f"s3://{BUCKET}/results/") == []  # written and deleted
    local = storage.check_writable(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and not Path(local).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="results location .*file/sub' is not writable"):
        storage.check_writable(str(tmp_path / "file" / "sub"))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("minio://no-such-bucket/spnas")
    # a read-only identity (as a Kubeflow profile outside its own prefix): reading works, writing is denied
    monkeypatch.setenv(storage.ENV_ACCESS_KEY, server["reader"][0])
    monkeypatch.setenv(storage.ENV_SECRET_KEY, server["reader"][1])
    assert storage.list_objects(f"s3://{BUCKET}/results/") == []
    with pytest.raises(StorageError, match=f"access denied at {server['endpoint']}.*upload s3://{BUCKET}/shared/"):
        storage.check_writable(f"s3://{BUCKET}/shared")


def test_preflight_against_the_store(s3env, server, tmp_path, monkeypatch):
    """The pipeline's preflight with the data set and the results prefix in the object store:
    passes on a complete COCO layout and a writable prefix; otherwise lists every problem, each
    naming its URI, within seconds."""
    from helpers import DEMO, demo

    from spnas.data.source import CocoSource
    from spnas.orchestration import pods
    from spnas.utils.errors import PreflightError
    data = demo(tmp_path / "demo", train=2, val=2, size=64)
    storage.upload(data, f"minio://{BUCKET}/datasets/pf")
    assert CocoSource(f"minio://{BUCKET}/datasets/pf").missing() == []
    text = DEMO.read_text()
    expected = pods.compiled_contract(text)
    t0 = time.monotonic()
    got = pods.preflight(text, "[]", f"minio://{BUCKET}/datasets/pf", f"minio://{BUCKET}/runs/r1", expected)
    assert got["data"] == f"minio://{BUCKET}/datasets/pf" and got["version"] == json.loads(expected)["version"]
    assert storage.list_objects(f"minio://{BUCKET}/runs/") == []
    with pytest.raises(PreflightError) as err:
        pods.preflight(text, "[]", f"minio://{BUCKET}/datasets/none", "minio://no-such-bucket/r1", expected)
    problems = str(err.value).splitlines()[1:]
    assert len(problems) == 5, problems
    assert f"annotation file minio://{BUCKET}/datasets/none/annotations/instances_val2017.json is missing" in str(err.value)
    assert "bucket 'no-such-bucket' does not exist" in problems[-1]
    monkeypatch.setenv(storage.ENV_ACCESS_KEY, server["reader"][0])
    monkeypatch.setenv(storage.ENV_SECRET_KEY, server["reader"][1])
    with pytest.raises(PreflightError, match="access denied") as err:
        pods.preflight(text, "[]", f"minio://{BUCKET}/datasets/pf", f"minio://{BUCKET}/private/other", expected)
    assert len(str(err.value).splitlines()) == 2  # the data set is readable: only the results prefix is refused
    assert time.monotonic() - t0 < 30


def _fetch_in_child(uri: str, cache: str, expected: dict, q) -> None:
    try:
        folder = storage.fetch(uri, cache)
        q.put("ok" if _read_tree(folder) == expected else "mismatch")
    except BaseException as exc:  # report, never hang the parent
        q.put(f"error: {exc!r}")


def test_concurrent_fetches_never_see_partial_files(s3env, tmp_path, monkeypatch):
    monkeypatch.setattr(storage.client, "_CHUNK", 4096)  # many small writes: a non-atomic download would show
    rng = random.Random(7)
    src = tmp_path / "ds"
    expected = {f"img/{i:03d}.bin": rng.randbytes(1_000_000 + i) for i in range(12)}
    for rel, data in expected.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uri = f"s3://{BUCKET}/concurrent/ds"
    storage.upload(src, uri)
    cache = tmp_path / "cache"
    folder = cache / BUCKET / "concurrent" / "ds"
    seen_bad: list[str] = []
    stop = threading.Event()

    def watch():  # reads every file that is visible while the fetches run
        while not stop.is_set():
            for p in list(folder.rglob("*")) if folder.exists() else []:
                if p.is_file():
                    data = p.read_bytes()
                    if data != expected[p.relative_to(folder).as_posix()]:
                        seen_bad.append(f"{p}: {len(data)} bytes")

    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(uri, str(cache), expected, q)) for _ in range(3)]
    for p in procs:
        p.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    results: list[str] = []

    def worker():
        folder_ = storage.fetch(uri, cache)
        results.append("ok" if _read_tree(folder_) == expected else "mismatch")
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    child = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    stop.set()
    watcher.join(timeout=30)
    assert results == ["ok"] * 6 and child == ["ok"] * 3, (results, child)
    assert not seen_bad
    assert all(p.exitcode == 0 for p in procs)
    assert not any((cache / ".tmp").iterdir())


def _listening_addresses(pid: int) -> list[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            addr = ".".join(str(int(addr_hex[i:i + 2], 16)) for i in (6, 4, 2, 0)) if width == 8 else "v6:" + addr_hex
            out.append(f"{addr}:{int(port_hex, 16)}")
    return out


def test_server_listens_on_loopback_only(server):
    pid = server["pid"]
    expected = {f"127.0.0.1:{p}" for p in objectstore.ports_for(server["port"]).values()}
    deadline = time.monotonic() + 30  # SeaweedFS opens its admin port after S3 answers: wait for it
    while not expected <= set(addrs := _listening_addresses(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert expected <= set(addrs), addrs
    assert all(a.startswith("127.0.0.1:") for a in addrs), addrs
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for flag in (b"-ip=127.0.0.1", b"-ip.bind=127.0.0.1", b"-master.telemetry=false", b"-webdav=false"):
        assert flag in cmdline
    environ = Path(f"/proc/{pid}/environ").read_bytes()  # SeaweedFS must not pick up AWS_* keys
    assert b"AWS_SECRET_ACCESS_KEY=" not in environ and b"AWS_ACCESS_KEY_ID=" not in environ


def test_credentials_never_leak(s3env, server, tmp_path, caplog, monkeypatch):
    secret, access = server["secret_key"], server["access_key"]
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    _tree(tmp_path / "ds", seed=3)
    storage.upload(tmp_path / "ds", f"s3://{BUCKET}/leak/ds")
    storage.fetch(f"s3://{BUCKET}/leak/ds", cache)
    storage.list_objects(f"s3://{BUCKET}/leak/")
    with pytest.raises(StorageError):
        storage.fetch(f"s3://{BUCKET}/leak/missing", cache)
    monkeypatch.setenv(storage.ENV_ENDPOINT, "127.0.0.1:1")
    with pytest.raises(StorageError) as err:
        storage.fetch(f"s3://{BUCKET}/leak/ds", cache)
    assert secret not in str(err.value) and access not in str(err.value)
    assert secret not in caplog.text and access not in caplog.text
    assert repr(Store.from_env()) == "Store('http://127.0.0.1:1')"
    # files written by the storage layer (cache) and by the object store (state, pid, log)
    d = server["dir"]
    private = {d / objectstore.CREDENTIALS_FILE, d / objectstore.IDENTITIES_FILE}
    for p in private:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert secret in p.read_text()
    checked = 0
    for root in (cache, d):
        for p in root.rglob("*"):
            if p.is_file() and p not in private and objectstore.WEED_DIR not in p.relative_to(root).parts:
                data = p.read_bytes()
                assert secret.encode() not in data and access.encode() not in data, p
                checked += 1
    assert checked >= 8


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spnas")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    register(sub)
    return parser


def _cli(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.func(args)


def test_cli_data_commands(s3env, tmp_path, capsys):
    files = _tree(tmp_path / "ds", seed=4)
    assert _cli("data", "upload", str(tmp_path / "ds"), f"s3://{BUCKET}/cli/ds") == 0
    assert "uploaded 5 file(s)" in capsys.readouterr().out
    assert _cli("data", "fetch", f"s3://{BUCKET}/cli/ds", "--cache", str(tmp_path / "c")) == 0
    path = Path(capsys.readouterr().out.strip())
    assert _read_tree(path) == files
    with pytest.raises(SpnasError, match="s3://no-such-bucket/x"):
        _cli("data", "upload", str(tmp_path / "ds"), "s3://no-such-bucket/x")
    assert _cli("data", "upload", str(tmp_path / "ds" / "empty.txt"), "s3://cli-made/x/", "--create-bucket") == 0
    assert storage.exists("s3://cli-made/x/empty.txt")


def test_server_goes_away_then_restarts(s3env, server, tmp_path, capsys, caplog, monkeypatch):
    """A second server, driven through the CLI: stopped mid-run, fetches retry with backoff and
    fail clearly; restarted on the same ports, the data is still there."""
    d = tmp_path / "store2"
    port = objectstore.free_port_block(exclude={server["port"]})
    try:
        assert _cli("objectstore", "start", "--dir", str(d), "--port", str(port), "--bucket", "runs") == 0
        assert f"http://127.0.0.1:{port}" in capsys.readouterr().out
        assert _cli("objectstore", "env", "--dir", str(d)) == 0
        lines = capsys.readouterr().out.splitlines()
        env = dict(line.strip().removeprefix("export ").split("=", 1) for line in lines if line.strip())
        assert set(env) == {"SPNAS_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert env["SPNAS_S3_ENDPOINT"] == f"http://127.0.0.1:{port}"
        (tmp_path / "w.pth").write_bytes(b"weights" * 1000)
        storage.upload(tmp_path / "w.pth", "s3://runs/r1/w.pth")
        storage.upload(tmp_path / "w.pth", "s3://runs/r1/w2.pth")
        assert storage.fetch("s3://runs/r1/w.pth", tmp_path / "c").read_bytes() == b"weights" * 1000

        assert _cli("objectstore", "stop", "--dir", str(d)) == 0
        assert "stopped" in capsys.readouterr().out
        assert _cli("objectstore", "status", "--dir", str(d)) == 0
        assert "object store stopped" in capsys.readouterr().out
        waits: list[float] = []
        with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="spnas.storage"), \
                pytest.raises(StorageError) as err:
            m.setattr(storage.client.time, "sleep", waits.append)  # the backoff, recorded rather than slept
            storage.fetch("s3://runs/r1/w2.pth", tmp_path / "c")
        msg = str(err.value)
        assert f"http://127.0.0.1:{port}" in msg and "s3://runs/r1/w2.pth" in msg and "4 attempt" in msg
        assert sum("retrying in" in r.getMessage() for r in caplog.records) == 3
        assert waits == [0.01, 0.02, 0.04]  # SPNAS_S3_RETRY_DELAY=0.01, doubled after each failed attempt

        with pytest.raises(StorageError, match=f"uses port {port}"):
            objectstore.start(d, port=port + 20)
        info = objectstore.start(d, ready_timeout=30)  # same ports, same credentials, same data
        assert info["port"] == port and not info["already_running"]
        assert objectstore.env(d) == env
        assert storage.fetch("s3://runs/r1/w2.pth", tmp_path / "c").read_bytes() == b"weights" * 1000
        assert objectstore.start(d)["already_running"]
        assert _cli("objectstore", "status", "--dir", str(d)) == 0
        assert "running (ready)" in capsys.readouterr().out
    finally:
        objectstore.stop(d, grace=5)
    assert not objectstore.status(d)["running"]
    assert objectstore.stop(d)["stopped"] is False
