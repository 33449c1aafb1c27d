"""The child process of an isolated measurement (started by :mod:`attnbench.sweep`).

Reads the parent's ``sys.path`` (one JSON line, taken before attnbench is imported),
then a pickled job on stdin: the resolved configuration, the implementation's name and
module, and the parent's ``multiprocessing`` preparation data (its working folder and
main script). It dies with its parent, imports what registered the
implementation, measures, and prints the row as one ``ATTNBENCH_ROW {json}`` line."""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import pickle
import signal
import sys


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's timeout still holds
        pass
    if os.getppid() != parent:
        os._exit(1)


def _impl(name: str, module: str):
    """The implementation, after importing the module that registered it."""
    from attnbench.registry import list_impls

    if name not in list_impls() and module not in ("__main__", "__mp_main__", ""):
        importlib.import_module(module)
    if name not in list_impls():
        raise ValueError(
            f"impl={name!r} is not registered in the worker process: it was registered by {module!r}, which "
            "registers it only when it runs (an interactive session, python -c, or a function); register it "
            "when a module or script is imported, or measure with isolate=false"
        )
    from attnbench.registry import get_impl

    return get_impl(name)


def main() -> None:
    from multiprocessing import spawn

    from attnbench.sweep import ROW_MARK, WORKER_ENV

    _die_with_parent(int(os.environ[WORKER_ENV]))
    job = pickle.load(sys.stdin.buffer)
    c = job["config"]
    signal.alarm(int(c.job_timeout_s) + 60)  # a second limit, should the parent's fail
    logging.basicConfig(level=job["log_level"], format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from attnbench.measure import measure_here
    from attnbench.results import unmeasured

    try:
        spawn.prepare(job["prep"])  # the parent's sys.path and folder; its script as __mp_main__
        row = measure_here(c, _impl(job["impl"], job["module"]))
    except Exception as e:  # before the measurement itself: the worker could not set up
        row = unmeasured(c, "error", "error", f"{type(e).__name__}: {e}".replace("\n", " ")[:500])
    sys.stdout.write(ROW_MARK + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()
