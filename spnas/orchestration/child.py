"""One training in a child process, so that its crash is data, not a failed pod.

A Kubeflow pod whose process is killed (the OOM killer at the pod's memory limit, a segfault in
a native kernel, a hung step cut by a time limit) fails its ParallelFor iteration, and the
round's collecting task never runs. :func:`run_isolated` runs the training in a child process
of the pod instead: under a memory limit the kernel's OOM killer picks the largest process of
the pod's cgroup (the training), the parent survives and turns the child's end into a
:class:`ChildFailed` naming the signal or exit status. The child inherits the environment
(credentials, ``SPNAS_CACHE``) and writes to the pod's log.

    python -m spnas.orchestration.child CALL.json RESULT.json

runs ``pods.<function>(**kwargs)`` of ``CALL.json`` (only the functions in :data:`CALLABLE`)
and writes its JSON result atomically to ``RESULT.json``. No torch here: the child imports it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..utils.errors import SpnasError
from ..utils.fileio import atomic_write_json

log = logging.getLogger(__name__)

#: The functions of :mod:`.pods` a child may run.
CALLABLE = frozenset({"train_candidate_here"})


class ChildFailed(SpnasError):
    """The child process ended without a result: killed by a signal, a non-zero exit or over
    its time limit. The message names which."""


def describe_exit(returncode: int, what: str) -> str:
    """A sentence for a child's exit status (negative: the signal that killed it)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = (" (most often the out-of-memory killer at the pod's memory limit; a node failure or "
               "`kill -9` look the same)") if -returncode == signal.SIGKILL else ""
        return f"{what}: the training process was killed by {name}{why}"
    return f"{what}: the training process exited with status {returncode} without a result (its error is in the task's log)"


def run_isolated(function: str, kwargs: dict[str, Any], *, what: str, timeout: float | None = None) -> Any:
    """``pods.<function>(**kwargs)`` in a child Python process; its JSON result. Raises
    :class:`ChildFailed` when the child is killed, exits non-zero or runs longer than
    ``timeout`` seconds (then its whole process group, data-loader workers included, is
    killed). ``kwargs`` must be JSON."""
    if function not in CALLABLE:
        raise ValueError(f"{function!r} cannot run in a child process; allowed: {sorted(CALLABLE)}")
    with tempfile.TemporaryDirectory(prefix="spnas-child-") as tmp:
        call, result = Path(tmp) / "call.json", Path(tmp) / "result.json"
        atomic_write_json(call, {"function": function, "kwargs": kwargs})
        proc = subprocess.Popen([sys.executable, "-m", __name__, str(call), str(result)], start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ChildFailed(f"{what}: the training ran over its time limit of {timeout:g} s and was "
                              "stopped") from None
        except BaseException:  # the pod is stopping (SIGTERM, Ctrl-C): take the child with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if rc == 0 and result.is_file():
            return json.loads(result.read_text(encoding="utf-8"))
        raise ChildFailed(describe_exit(rc, what))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m spnas.orchestration.child CALL.json RESULT.json\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    call = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    if call.get("function") not in CALLABLE:
        sys.stderr.write(f"{args[0]}: function {call.get('function')!r} is not one of {sorted(CALLABLE)}\n")
        return 2
    from . import pods
    out = getattr(pods, call["function"])(**call["kwargs"])
    atomic_write_json(Path(args[1]), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
