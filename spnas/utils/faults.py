"""Fail points: named places where a test can kill the process, to prove resume loses nothing.

``SPNAS_FAILPOINT=name:n`` (``n`` defaults to 1) makes the ``n``-th call of
``failpoint(name)`` in this process kill the process with SIGKILL, exactly as a node failure or
the OOM killer would: no ``finally`` block, no atexit handler runs. ``name:n:detail`` counts
only the calls whose ``detail`` is exactly ``detail`` (one candidate among many). With
``SPNAS_FAILPOINT_ONCE=FILE`` a fail point fires only while ``FILE`` does not exist and creates
it first: one kill per test, whichever process gets there first (a retried task then passes).
Unset (the normal case), a fail point costs one environment lookup. Names used by the library:

* ``train_iter``   after each optimizer step of any training (inside fine_tune, a candidate...)
* ``candidate``    after a search candidate's result file is written (mid-round)
* ``phase``        after a phase's completion file is written (between phases)
* ``candidate_child``  in a pod's training child process, before a candidate trains (detail
                   ``<step>/<candidate id>``)
* ``write``        inside an atomic write, after the temporary file is complete and before it
                   is renamed over the target (during a write)
"""
from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "SPNAS_FAILPOINT"
ENV_ONCE = "SPNAS_FAILPOINT_ONCE"
_hits: Counter = Counter()


def failpoint(name: str, detail: str = "") -> None:
    """Kill this process with SIGKILL when ``SPNAS_FAILPOINT`` names this point and call count."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, rest = spec.partition(":")
    count, _, only = rest.partition(":")
    if want != name or (only and only != detail):
        return
    _hits[name] += 1
    if _hits[name] == int(count or 1):
        once = os.environ.get(ENV_ONCE)
        if once:
            try:  # O_EXCL: of two processes reaching the point, one kills itself
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        sys.stderr.write(f"{ENV}: killing pid {os.getpid()} at {name} #{_hits[name]} {detail}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
