"""Child processes with hard time limits (gpu_check's measuring worker and its warm-up
pools).

Every child is spawned (a fresh interpreter: no CUDA state comes from this process),
leads a process group of its own (a kill reaches what it started: inductor's compile
workers, ptxas) and dies with this process. Two shapes:

* :class:`Worker`: one child kept between calls, so compiled kernels, autotuning
  results and CUDA state stay warm in it; a call that passes its limit, or a child
  that dies, costs that call, and the next call starts a new child.
* :func:`run_pool`: independent tasks on several children, stopped at a deadline.

Functions and arguments cross by pickle: a function is sent by its module and name,
which the child imports (with this process's ``sys.path``, as multiprocessing's
spawn arranges).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["Worker", "Stopped", "Died", "run_pool", "sigint_default"]


class Stopped(Exception):
    """A call passed its time limit; its child was killed."""


class Died(Exception):
    """The child died during a call (a crash, or killed from outside)."""


def sigint_default() -> None:
    """A ``preexec_fn`` for a child that is to be stopped with SIGINT (Ctrl-C): it
    handles the signal even where this process ignores it. A non-interactive shell
    starts its background commands with SIGINT ignored, and exec keeps that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this child and what it started


def _init(parent: int, log_file: str | None) -> None:
    """In each child, first: its own process group, death with the parent (a thread
    that watches it: the kernel's parent-death signal follows the thread that started
    a child, and children are started from any thread here), and attnbench's log
    lines into ``log_file`` (appended) rather than the console."""
    with contextlib.suppress(OSError):
        os.setsid()
    threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{os.getpid()}] %(message)s", "%H:%M:%S"))
        root = logging.getLogger("attnbench")
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        root.propagate = False


def _executor(procs: int, log_file: str | None) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_init,
                                  initargs=(os.getpid(), log_file))  # fmt: skip


def _kill_groups(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _pids(ex: cf.ProcessPoolExecutor) -> list[int]:
    # no public way to reach a pool's processes before Python 3.14's kill_workers(),
    # which would not reach their process groups either
    return list(getattr(ex, "_processes", None) or {})


def _close(ex: cf.ProcessPoolExecutor, kill: bool) -> None:
    if kill:
        _kill_groups(_pids(ex))
    ex.shutdown(wait=not kill, cancel_futures=True)


class Worker:
    """One child process that runs calls one at a time, kept between them.

    ``call(fn, *args, timeout=s)`` returns ``fn(*args)`` as run in the child, raises
    :class:`Stopped` when it passes ``timeout`` seconds (counting the child's start
    when it had to start one) and :class:`Died` when the child dies; either way the
    child is gone and the next call starts another. An exception raised by ``fn``
    comes back as itself and keeps the child. ``starts`` counts the children started."""

    def __init__(self, log_file: str | None = None):
        self.log_file = log_file
        self.starts = 0
        self.pid: int | None = None
        self._ex: cf.ProcessPoolExecutor | None = None

    @property
    def alive(self) -> bool:
        return self._ex is not None

    def start(self, timeout: float) -> float:
        """Start the child unless it runs; the seconds it took (0 when it was running)."""
        if self._ex is not None:
            return 0.0
        t0 = time.perf_counter()
        self._ex = _executor(1, self.log_file)
        self.pid = self._wait(self._ex.submit(os.getpid), timeout, "starting the worker")
        self.starts += 1
        return time.perf_counter() - t0

    def call(self, fn: Callable, *args: Any, timeout: float) -> Any:
        t0 = time.perf_counter()
        self.start(timeout)
        return self._wait(self._ex.submit(fn, *args), timeout - (time.perf_counter() - t0), getattr(fn, "__name__", ""))

    def _wait(self, fut: cf.Future, timeout: float, what: str) -> Any:
        try:
            return fut.result(timeout=max(0.01, timeout))
        except cf.TimeoutError:
            self.stop()
            raise Stopped(f"{what}: stopped after its limit of {max(0.0, timeout):.0f} s") from None
        except BrokenProcessPool:
            self.stop()
            raise Died(f"{what}: the worker process died") from None

    def stop(self) -> None:
        """Kill the child (and everything it started) now; no-op when none runs."""
        if self._ex is not None:
            _kill_groups([self.pid] if self.pid else _pids(self._ex))
            self._ex.shutdown(wait=False, cancel_futures=True)
        self._ex, self.pid = None, None


def _timed(fn: Callable, arg: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(arg), time.perf_counter() - t0


def run_pool(fn: Callable, tasks: Iterable, procs: int, deadline: float,
             log_file: str | None = None) -> list[tuple[Any, Any, float | None]]:  # fmt: skip
    """``fn(task)`` for every task on up to ``procs`` children, until ``deadline`` (a
    ``time.time()``). ``tasks`` may be a generator: each task is handed out as soon as
    it comes. Returns ``(task, result, seconds)`` per task, in order: result is the
    exception where ``fn`` raised, None (and seconds None) where the deadline came
    first; then every child is killed."""
    ex: cf.ProcessPoolExecutor | None = None
    submitted: list[tuple[Any, cf.Future]] = []
    try:
        for task in tasks:
            if time.time() >= deadline:
                break
            ex = ex or _executor(max(1, procs), log_file)
            submitted.append((task, ex.submit(_timed, fn, task)))
    except BaseException:  # the tasks' generator failed: nothing is left running
        if ex is not None:
            _close(ex, kill=True)
        raise
    if ex is None:
        return []
    done, pending = cf.wait([f for _, f in submitted], timeout=max(0.0, deadline - time.time()))
    _close(ex, kill=bool(pending))
    out = []
    for task, fut in submitted:
        if fut not in done or fut.cancelled():
            out.append((task, None, None))
        elif fut.exception() is not None:
            out.append((task, fut.exception(), None))
        else:
            out.append((task, *fut.result()))
    return out
