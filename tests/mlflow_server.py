"""A real MLflow tracking server for tests: SQLite backend, artifacts proxied to S3 (the
embedded SeaweedFS store of :mod:`spnas.devtools.objectstore`).

Use the context manager (one server per module is enough; each pytest-xdist worker starts its
own on its own free ports)::

    from mlflow_server import mlflow_server

    @pytest.fixture(scope="module")
    def mlflow(tmp_path_factory):
        with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
            yield server          # server.uri = "http://127.0.0.1:<port>"

``mlflow_server(tmp_dir, s3_env=None)`` starts its own object store in ``tmp_dir/objectstore``
(bucket ``mlflow``) unless ``s3_env`` (:func:`spnas.devtools.objectstore.env`'s dict) names a
running one, where it creates the bucket when missing. :func:`start_mlflow` is the server alone.

The server binds 127.0.0.1 only, runs in its own process group with job execution off, is
ready when ``/health`` answers (within ``ready_timeout`` seconds, else it is stopped and the
error shows its log's tail) and is stopped by PID: SIGTERM to its group, ``grace`` seconds,
then SIGKILL. Clients need no S3 credentials: the server proxies artifacts.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spnas.devtools import objectstore
from spnas.storage import ENV_ACCESS_KEY, ENV_ENDPOINT, ENV_SECRET_KEY, RetryPolicy, Store

BUCKET = "mlflow"
_ENV_DROP = ("AWS_", "MLFLOW_", "SPNAS_S3_")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class MlflowServer:
    """A running ``mlflow server``: ``uri`` (http://127.0.0.1:port), ``pid`` (its process
    group), ``log`` (its output), ``db`` (the SQLite file), ``s3_env`` (the object store's
    client variables) and ``artifacts`` (``s3://mlflow/artifacts``); also readable as a
    mapping (``server["uri"]``)."""

    uri: str
    port: int
    pid: int
    log: Path
    db: Path
    s3_env: dict[str, str]
    artifacts: str
    proc: subprocess.Popen = field(repr=False)

    def __getitem__(self, key: str) -> object:
        """The fields also read as a mapping: ``server["uri"]``, ``server["s3_env"]``, ..."""
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> str:
        """SIGTERM the server's process group, wait up to ``grace`` s, then SIGKILL; returns the
        last signal sent ("" when it had already exited)."""
        if self.proc.poll() is not None and not _alive_group(self.pid):
            return ""
        sent = "SIGTERM"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self.proc.poll()
            if self.proc.returncode is not None and not _alive_group(self.pid):
                return sent
            time.sleep(0.1)
        sent = "SIGKILL"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive_group(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive_group(self.pid):
            raise RuntimeError(f"mlflow server process group {self.pid} survived SIGKILL")
        return sent


def _server_env(s3_env: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP)}
    env.update({"MLFLOW_S3_ENDPOINT_URL": s3_env[ENV_ENDPOINT], "AWS_ACCESS_KEY_ID": s3_env[ENV_ACCESS_KEY],
                "AWS_SECRET_ACCESS_KEY": s3_env[ENV_SECRET_KEY], "AWS_DEFAULT_REGION": objectstore.REGION,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner and huey consumers to start
    return env


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_mlflow(tmp_dir: str | os.PathLike, s3_env: Mapping[str, str], *, bucket: str = BUCKET,
                 ready_timeout: float = 60.0, tries: int = 3) -> MlflowServer:
    """Start ``mlflow server`` with ``tmp_dir/mlflow.db`` and artifacts in
    ``s3://<bucket>/artifacts`` of the object store ``s3_env`` names (the bucket must exist);
    on a free port (``tries`` ports, in case another process takes the one picked first)."""
    d = Path(tmp_dir)
    d.mkdir(parents=True, exist_ok=True)
    last = ""
    for attempt in range(tries):
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        log = d / f"mlflow-server-{attempt}.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{bucket}/artifacts", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=d,
                                    env=_server_env(s3_env), start_new_session=True, close_fds=True)
        server = MlflowServer(uri=uri, port=port, pid=proc.pid, log=log, db=d / "mlflow.db", s3_env=dict(s3_env),
                              artifacts=f"s3://{bucket}/artifacts", proc=proc)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(uri):
                return server
            time.sleep(0.2)
        last = server.log_tail()
        server.stop(grace=5)
        if "address already in use" not in last.lower():
            break
    raise RuntimeError(f"mlflow server did not become healthy within {ready_timeout:.0f} s; last lines of its log:\n"
                       f"{last}")


def _start_store(d: Path) -> dict[str, str]:
    last: Exception | None = None
    for _ in range(3):  # another process may grab a port of the block: try another block
        try:
            objectstore.start(d, port=objectstore.free_port_block(), ready_timeout=30, buckets=[BUCKET])
            return objectstore.env(d)
        except Exception as exc:
            last = exc
            objectstore.stop(d, grace=2)
            for f in (objectstore.STATE_FILE, objectstore.PID_FILE):
                (d / f).unlink(missing_ok=True)
    raise RuntimeError(f"could not start the object store for mlflow: {last}")


@contextlib.contextmanager
def mlflow_server(tmp_dir: str | os.PathLike, s3_env: Mapping[str, str] | None = None, *,
                  ready_timeout: float = 60.0) -> Iterator[MlflowServer]:
    """A running :class:`MlflowServer` for the ``with`` block, then stopped (and its own object
    store, when it started one). See the module docstring."""
    d = Path(tmp_dir)
    store_dir = d / "objectstore"
    own_store = s3_env is None
    server: MlflowServer | None = None
    try:
        if own_store:
            s3_env = _start_store(store_dir)
        else:
            with Store(s3_env[ENV_ENDPOINT], s3_env[ENV_ACCESS_KEY], s3_env[ENV_SECRET_KEY], region=objectstore.REGION,
                       retry=RetryPolicy(tries=3, delay=0.2)) as st:
                st.make_bucket(BUCKET)
        server = start_mlflow(d / "mlflow", s3_env, ready_timeout=ready_timeout)
        yield server
    finally:
        if server is not None:
            server.stop()
        if own_store:
            objectstore.stop(store_dir, grace=5)
