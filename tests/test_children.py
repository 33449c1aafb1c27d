"""Child processes with hard time limits: a kept worker whose overrunning call is
killed with what it started, a crash, and a pool stopped at its deadline."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from attnbench.children import Died, Stopped, Worker, run_pool


def ready() -> bool:
    return True


def start_and_hang(marker: str) -> None:
    """In a worker: start a grandchild (as inductor and ptxas are started), write its
    pid to ``marker``, then hang."""
    proc = subprocess.Popen(["sleep", "600"])
    Path(marker).write_text(str(proc.pid))
    time.sleep(600)


def test_a_worker_call_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    """A call past its limit: the child and the grandchild it started are killed;
    a crash: Died; either way the next call starts a new child."""
    w = Worker()
    try:
        pid = w.call(os.getpid, timeout=60)
        assert w.call(ready, timeout=60)  # this module imported there too
        assert w.call(os.getpid, timeout=60) == pid  # kept between calls
        marker = tmp_path / "grandchild"
        with pytest.raises(Stopped):  # the child runs already: the limit is the call's
            w.call(start_and_hang, str(marker), timeout=5)
        grandchild = int(marker.read_text())
        for _ in range(300):  # a killed process may take a while to go on a loaded machine
            if not (_alive(grandchild) or _alive(pid)):
                break
            time.sleep(0.1)
        assert not _alive(grandchild) and not _alive(pid)
        with pytest.raises(Died):
            w.call(os._exit, 3, timeout=60)
        assert w.call(os.getpid, timeout=60) not in (pid, None) and w.starts == 3
    finally:
        w.stop()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_pool_stops_at_its_deadline():
    """The quick tasks finish (the deadline leaves room for children that import torch
    on a loaded machine); the slow one is cut there, in order, and nothing waits for it."""
    t0 = time.time()
    got = run_pool(time.sleep, [0.01, 600, 0.02], 2, time.time() + 20)
    assert time.time() - t0 < 35
    assert [task for task, _, _ in got] == [0.01, 600, 0.02]
    assert [s is not None for _, _, s in got] == [True, False, True]
