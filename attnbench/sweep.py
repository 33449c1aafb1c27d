"""Measuring many configurations: guards, prediction, process isolation, and the sweep.

Plain Python, no Hydra needed::

    from attnbench.config import BenchConfig
    from attnbench.sweep import measure, sweep
    row = measure(BenchConfig(impl="chunked", seq_len=8192, device="cpu"))
    rows = sweep([BenchConfig(impl=i, seq_len=n) for i in ("naive", "chunked") for n in (1024, 2048)])

Before a job runs, its **guards** may turn it into a ``skipped`` row with the reason:
the implementation is unavailable or does not support the case; the memory it needs
(predicted from the same series' measured peaks at smaller n where there are some, else
the implementation's estimate) is over the budget; the series already ran out of
memory or time at a smaller n, or its measured times predict a job longer than
``job_timeout_s``; Triton's interpreter is asked for a size it cannot finish.

With ``isolate`` (the default) each job runs in a child process of its own, so a crash,
an out-of-memory kill or a hang (``job_timeout_s``) costs one row, never the sweep. The
child dies with its parent, and it imports the module that registered the
implementation (the parent's script too, as ``multiprocessing`` does: guard a script's
own measurements with ``if __name__ == "__main__":``).

With ``repeats=N`` each configuration is measured N times, each in a fresh child (in
this process with ``isolate=false``), interleaved with the configurations it is
compared with (:func:`_measure_groups`); :func:`combine` makes their one row, with the
95% interval of :mod:`attnbench.stats`, and a noisy machine is named in one warning.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import pickle
import signal
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import spawn
from pathlib import Path

import torch

from .config import BenchConfig
from .measure import PROBE_KEY, calls_per_job, measure_here
from .registry import Impl, get_impl
from .results import base_row, identity, number, unmeasured
from .stats import NOISE_WARN, interval, spread
from .tables import append_row, check_writable, done, rows_dir, table_path, write_row_file

__all__ = ["measure", "sweep", "combine", "expand", "row_files_enabled", "memory_budget"]

log = logging.getLogger("attnbench")

#: the series history of this process (every sweep shares it unless given its own), so
#: Hydra's basic launcher, which runs a multirun's jobs one after another in one process,
#: gets the same predictive guards as the internal ``sweep=`` grid
HISTORY: dict[tuple, list[dict]] = {}
ROW_MARK = "ATTNBENCH_ROW "
#: the child takes its parent's sys.path before it imports attnbench (as multiprocessing's
#: spawn does), so it runs the same attnbench and finds the same modules
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.stdin.buffer.readline()); "
    "from attnbench._worker import main; main()"
)
WORKER_ENV = "ATTNBENCH_WORKER_PARENT"


# ---------------------------------------------------------------------- guards
def _free_memory_bytes(device: str) -> int:
    if device == "cuda":  # what the caching allocator holds unused is free to this process
        return int(torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated())
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def memory_budget(c: BenchConfig) -> int:
    if c.mem_budget_gb is not None:
        return int(c.mem_budget_gb * 2**30)
    return int(_free_memory_bytes(c.device) * c.mem_budget_fraction)


def _inputs_bytes(c: BenchConfig) -> float:
    esize = torch.empty(0, dtype=c.torch_dtype()).element_size()
    heads = c.heads + 2 * (c.heads if c.kv_heads is None else c.kv_heads)  # q, and the smaller k, v
    return heads * c.batch * c.seq_len * c.head_dim * esize * (3 if c.mode != "fwd" else 1)


def _exponent(points: list[tuple[int, float]], default: float, high: float) -> float:
    """Growth exponent between the two largest points, clamped to [1, high]."""
    if len(points) >= 2 and points[-2][0] < points[-1][0] and points[-2][1] > 0 and points[-1][1] > 0:
        (n0, y0), (n1, y1) = points[-2:]
        return min(high, max(1.0, math.log(y1 / y0) / math.log(n1 / n0)))
    return default


def _ok_points(series: list[dict], n: int, column: str) -> list[tuple[int, float]]:
    pts = []
    for r in series:
        if r["status"] == "ok" and int(r["seq_len"]) < n and r.get(column) not in (None, ""):
            pts.append((int(r["seq_len"]), float(r[column])))
    return sorted(pts)


def predict_memory(c: BenchConfig, impl: Impl, series: list[dict]) -> tuple[float | None, str]:
    """Bytes the job needs beyond nothing (inputs included), and where the figure
    comes from. With measured peaks at smaller n in the series: the largest one, grown
    as the implementation's estimate grows (which knows where a window stops growing
    with n), else with the exponent of the last two points; without: the estimate
    (None: it gives none)."""
    est = None if c.model_layers else _estimate(c, impl, c.seq_len)  # the estimate is of the attention call
    pts = _ok_points(series, c.seq_len, "peak_mem_bytes")
    if pts:
        n1, m1 = pts[-1]
        at_n1 = None if est is None else _estimate(c, impl, n1)
        if at_n1:
            return m1 * est / at_n1 + _inputs_bytes(c), f"from n={n1}, grown as the estimate"
        e = _exponent(pts, 2.0, high=2.0)  # attention needs at most quadratic memory
        return m1 * (c.seq_len / n1) ** e + _inputs_bytes(c), f"from n={n1}, exponent {e:.1f}"
    return (None, "") if est is None else (est + _inputs_bytes(c), "estimate")


def _estimate(c: BenchConfig, impl: Impl, n: int) -> float | None:
    """The implementation's estimate for ``c`` at sequence length ``n``."""
    esize = torch.empty(0, dtype=c.torch_dtype()).element_size()
    kv = c.heads if c.kv_heads is None else c.kv_heads
    return impl.estimate_memory(c.batch, c.heads, kv, n, c.head_dim, esize, c.pattern(), c.mode != "fwd")


def _declared_exponent(c: BenchConfig, impl: Impl, n1: int) -> float:
    """How the implementation says its time grows from ``n1`` to ``c.seq_len``: as n^2
    when it computes every (query, key) score (:attr:`Impl.dense`), else as the
    pattern's pair count (about linear for a window shorter than n)."""
    if impl.dense or c.seq_len <= n1:
        return 2.0
    p = c.pattern()
    grown = p.pairs(c.seq_len, c.heads) / max(1, p.pairs(n1, c.heads))
    return min(2.0, max(1.0, math.log(grown) / math.log(c.seq_len / n1)))


def _predict_time(c: BenchConfig, impl: Impl, series: list[dict], fwd: list[dict]) -> tuple[str, str] | None:
    """Within one series, do not start what cannot finish: after an OOM or a time-budget
    stop at a smaller n, or when the measured times predict a job over ``job_timeout_s``.
    The growth: from the series' two largest points; with one, from the forward series
    of the same configuration (``fwd``) where it has two (fwd_bwd grows as fwd does),
    else as the implementation declares (:func:`_declared_exponent`).
    (kind, reason) of a refusal, or None."""
    for r in series:
        if int(r["seq_len"]) >= c.seq_len:
            continue
        if r["status"] == "oom":
            return "memory", f"over the memory budget: ran out of memory at seq_len={r['seq_len']}"
        if r["status"] == "skipped" and r.get("reason_kind") == "time":
            return "time", f"over the time budget: already over it at seq_len={r['seq_len']}"
    pts = _ok_points(series, c.seq_len, "time_ms_median")
    if not pts:
        return None
    n1, t1 = pts[-1]
    declared = _declared_exponent(c, impl, n1)
    e = _exponent(pts, _exponent(_ok_points(fwd, c.seq_len, "time_ms_median"), declared, high=2.5), high=2.5)
    per_call = t1 * (c.seq_len / n1) ** e / 1e3
    job = per_call * calls_per_job(c)
    if job > c.job_timeout_s:
        return "time", (
            f"over the time budget: predicted ~{job:.0f} s for this job (~{per_call:.1f} s a call, "
            f"from n={n1}, exponent {e:.1f}) > job_timeout_s={c.job_timeout_s:g}"
        )
    return None


def guard(
    c: BenchConfig, impl: Impl, series: list[dict], fwd: Sequence[dict] = ()
) -> tuple[tuple[str, str] | None, float | None]:
    """((the kind of reason, the reason) this job must not run, or None; the memory figure
    the guard used). ``series``: the rows measured so far in this job's series; ``fwd``:
    in its forward one."""
    # every reason, as the Python API lists them: missing packages, device, dtype, features
    reasons = impl.not_supported_reasons(c.pattern(), device=c.device, dtype=c.torch_dtype(), backward=c.mode != "fwd")
    if impl.unavailable_reason():
        return ("unavailable", "unavailable: " + "; ".join(reasons)), None
    if not reasons and impl.check is not None:
        # on the real device (its checks may depend on it), allocating one element
        probe = torch.empty((), dtype=c.torch_dtype(), device=c.device).expand(c.batch, c.heads, c.seq_len, c.head_dim)
        reasons = impl.check(probe.requires_grad_(c.mode != "fwd"), c.pattern())
    if reasons:
        return ("unsupported", "unsupported: " + "; ".join(reasons)), None
    need, source = predict_memory(c, impl, series)
    budget = memory_budget(c)
    if need is not None and need > budget:
        return (
            "memory",
            f"over the memory budget: needs ~{need / 2**30:.1f} GiB ({source}), budget {budget / 2**30:.1f} GiB",
        ), need
    if impl.interpreted_on_cpu and c.device == "cpu" and not c.allow_slow and c.seq_len > c.interpreter_max_seq:
        return (
            "interpreter",
            f"over the time budget: Triton runs in its interpreter on the CPU; seq_len > "
            f"{c.interpreter_max_seq} is skipped unless allow_slow=true",
        ), need
    return _predict_time(c, impl, series, list(fwd)), need


# ---------------------------------------------------------------------- isolation
def _echo(line: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever it started
    proc.wait()


def _measure_isolated(c: BenchConfig, impl: Impl) -> dict:
    """Measure in a fresh child process (:mod:`attnbench._worker`), stopped at
    ``job_timeout_s`` and never outliving this process. Its log lines are shown as they
    come; the row comes back as one JSON line on its stdout."""
    env = dict(os.environ)
    # large allocations through mmap, returned at free: the resident-set peak then counts
    # what the call allocated, not what glibc kept from earlier steps
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if c.threads is not None:
        env["OMP_NUM_THREADS"] = str(c.threads)
    env[WORKER_ENV] = str(os.getpid())
    prep = spawn.get_preparation_data("attnbench-worker")  # sys.path, cwd, the main script
    prep.pop("authkey", None)  # multiprocessing's own connections only; not ours to send
    job = {"config": c, "impl": impl.name, "module": impl.module, "prep": prep, "log_level": log.getEffectiveLevel()}
    proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: a stop reaches what it started
    )
    out: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=5)

    def pump_out() -> None:
        out.extend(line.decode(errors="replace") for line in proc.stdout)

    def pump_err() -> None:
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            tail.append(line)
            _echo(line)

    pumps = [threading.Thread(target=f, daemon=True) for f in (pump_out, pump_err)]
    for t in pumps:
        t.start()
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps(sys.path).encode() + b"\n" + pickle.dumps(job))
            proc.stdin.close()
        rc = proc.wait(timeout=c.job_timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return unmeasured(
            c, "skipped", "time", f"over the time budget: stopped after job_timeout_s={c.job_timeout_s:g} s"
        )
    except BaseException:  # Ctrl-C, SIGTERM, ...: the child goes too
        _kill(proc)
        raise
    for t in pumps:
        t.join(timeout=5)
    for line in reversed(out):
        if line.startswith(ROW_MARK):
            return json.loads(line[len(ROW_MARK) :])
    if rc in (-9, 137):
        return unmeasured(c, "oom", "oom", "killed by the operating system (SIGKILL), most likely out of memory")
    return unmeasured(c, "error", "error", f"worker exited with code {rc}: " + " | ".join(tail)[:500])


# ---------------------------------------------------------------------- measuring
def _series_key(c: BenchConfig, mode: str | None = None) -> tuple:
    """What a series shares (all but n); ``mode`` to name a sibling series."""
    return (str(table_path(c)), c.impl, c.model_layers, c.pattern(), c.dtype, mode or c.mode, c.device, c.batch,
            c.heads, c.kv_heads, c.head_dim, c.threads)  # fmt: skip


def _measure(c: BenchConfig, impl: Impl, series: list[dict], fwd: list[dict] = (), guarded: bool = True) -> dict:
    why, need = guard(c, impl, series, fwd) if guarded else (None, None)
    if why:
        row = unmeasured(c, "skipped", *why)
    elif c.isolate:
        row = _measure_isolated(c, impl)
    else:
        row = measure_here(c, impl)
    if guarded:
        row["mem_estimate_bytes"] = need
    return row


def combine(rows: Sequence[dict], repeats: int) -> dict:
    """One row from the repeats of one configuration, in the order they ran: the first
    that is not ``ok`` (its reason says which repeat; no time of another repeat is
    kept), else the first row with the time of them all: the median of the per-repeat
    medians, each of them (``time_ms_repeats``) and the 95% interval they give
    (:func:`attnbench.stats.interval`); one repeat keeps the interval of its calls."""
    probes = [x for r in rows for x in r.pop(PROBE_KEY, None) or []]
    bad = next((r for r in rows if r["status"] != "ok"), None)
    if bad is not None:
        if rows.index(bad):  # after ok repeats (a refusal by the guards comes first, before any repeat)
            bad = {**bad, "reason": f"repeat {rows.index(bad) + 1} of {repeats}: {bad['reason']}"}
        return bad
    medians = [float(r["time_ms_median"]) for r in rows]  # (repeats,)
    row = dict(rows[0], time_ms_repeats=" ".join(f"{m:.6g}" for m in medians))
    if len(rows) > 1:
        low, high = interval(medians) or (None, None)
        peaks = [r["peak_mem_bytes"] for r in rows if r.get("peak_mem_bytes") not in (None, "")]
        row.update(
            time_ms_median=statistics.median(medians),
            time_ms_ci_low=low,
            time_ms_ci_high=high,
            time_ms_min=min(float(r["time_ms_min"]) for r in rows),
            time_ms_iqr=statistics.median(float(r["time_ms_iqr"]) for r in rows),  # within one process
            n_timed=sum(int(r["n_timed"]) for r in rows),
            first_call_ms=statistics.median(float(r["first_call_ms"]) for r in rows),
            peak_mem_bytes=max(peaks) if peaks else None,
            noise=spread(probes),  # pooled: the drift between the repeats counts too
        )
        if row.get("flops"):
            row["tflops"] = row["flops"] / (row["time_ms_median"] * 1e-3) / 1e12
    return row


def _group_key(c: BenchConfig) -> tuple:
    """What the configurations compared with each other share: all but the implementation."""
    return (*_series_key(c)[:1], *_series_key(c)[2:], c.seq_len)


def _warn_noise(row: dict, warned: list[bool]) -> None:
    """One warning line, the first time in a sweep that a row's noise passes the threshold."""
    noise = number(row.get("noise"))
    if noise is not None and noise > NOISE_WARN and not warned:
        warned.append(True)
        log.warning(
            "attnbench: this machine is noisy: a fixed matrix product timed beside %s n=%s spread %.0f%% (IQR / "
            "median; warns above %.0f%%): stop other programs, pin threads (threads=, taskset) or raise repeats= "
            "(now %s), and read the intervals, not the medians", row["impl"], row["seq_len"], 100 * noise,
            100 * NOISE_WARN, row.get("repeats") or 1,
        )  # fmt: skip


def _measure_groups(
    todo: list[BenchConfig],
    impls: dict[str, Impl],
    history: dict,
    done: Callable[[BenchConfig, dict], None],
    step: Callable[[BenchConfig, int], None] = lambda c, r: None,
) -> None:
    """Measure ``todo``, ``repeats`` times each, interleaved: the configurations that
    differ only in the implementation form a group, and a group runs round by round
    (A B C A B C, not A A B B C C), so a slow minute hits every implementation of it
    alike; groups run in the order of their first configuration. The guards run on
    the first round; a repeat that is not ``ok`` ends its configuration's repeats.
    ``done(c, row)`` gets each configuration's row as soon as its last repeat is
    measured; ``step(c, r)`` is called before each measurement."""
    groups: dict[tuple, list[BenchConfig]] = {}
    for c in todo:
        groups.setdefault(_group_key(c), []).append(c)
    warned: list[bool] = []
    for group in groups.values():
        runs: dict[int, list[dict]] = {i: [] for i in range(len(group))}
        for r in range(max(c.repeats for c in group)):
            for i, c in enumerate(group):
                if r >= c.repeats or (runs[i] and runs[i][-1]["status"] != "ok"):
                    continue
                step(c, r)
                series = history.setdefault(_series_key(c), [])
                fwd = history.get(_series_key(c, "fwd"), [])
                how = c if r == 0 else dataclasses.replace(c, profile=False)  # one profile, the first repeat's
                runs[i].append(_measure(how, impls[c.impl], series, fwd, guarded=r == 0))
                if r == c.repeats - 1 or runs[i][-1]["status"] != "ok":  # its last: its row, written now
                    row = combine(runs[i], c.repeats)
                    _warn_noise(row, warned)
                    series.append(row)  # the group's other configurations are other series
                    done(c, row)


def measure(config: BenchConfig) -> dict:
    """Guard, verify, time and profile one configuration (``repeats`` times); one result
    row (the columns of :data:`attnbench.results.SCHEMA`). Never raises for a failing
    implementation: the failure is the row's status. Raises ``ValueError`` for an
    invalid configuration."""
    c = config.resolved()
    _refuse_nested(c)
    out: list[dict] = []
    _measure_groups([c], {c.impl: get_impl(c.impl)}, {}, lambda c, row: out.append(row))
    return out[0]


def _refuse_nested(c: BenchConfig) -> None:
    if c.isolate and os.environ.get(WORKER_ENV):
        raise RuntimeError(
            "attnbench: a measurement started while a worker process imported your script; "
            "guard the script's own measurements with `if __name__ == '__main__':` (as multiprocessing requires)"
        )


def row_files_enabled(row_files: object) -> bool:
    """Whether ``row_files`` (true, false or auto: inside a submitit job) means a file per row."""
    v = str(row_files).strip().lower()
    if v == "auto":
        return bool(os.environ.get("SUBMITIT_EXECUTOR"))
    if v in ("true", "false"):
        return v == "true"
    raise ValueError(f"row_files={row_files!r}: unknown; choose one of: auto, true, false")


def sweep(
    configs: Iterable[BenchConfig],
    *,
    resume: bool = False,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    history: dict | None = None,
    row_files: bool | str = False,
) -> list[dict]:
    """Measure every configuration, writing each row as soon as it is measured: appended
    to ``<results_dir>/<study>.csv``, or with ``row_files`` (true, or auto inside a
    submitit job) to a file of its own in ``<results_dir>/<study>.rows/`` (merge them with
    ``python -m attnbench.merge``). Every configuration is validated, and every
    destination checked, before the first job runs. With ``resume``, what the table or its
    row files already hold for this machine and these libraries is skipped (``error``
    rows are tried again). A failing job is a row, never the end of the sweep."""
    todo = [c.resolved() for c in configs]
    impls = {c.impl: get_impl(c.impl) for c in todo}
    use_row_files = row_files_enabled(row_files)

    def destination(c: BenchConfig) -> Path:
        return rows_dir(c) / "row.csv" if use_row_files else table_path(c)

    for path in {destination(c) for c in todo}:
        check_writable(path)
    for c in todo:
        _refuse_nested(c)
    if resume:
        todo = _not_done(todo)
    history = HISTORY if history is None else history
    bar = None
    if progress and len(todo) > 1:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="attnbench", unit="job", file=sys.stderr)
    rows: dict[int, dict] = {}

    def step(c: BenchConfig, r: int) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{c.impl} n={c.seq_len} {c.dtype} {c.mode}"
                                + (f" repeat {r + 1}/{c.repeats}" if c.repeats > 1 else ""))  # fmt: skip

    def done(c: BenchConfig, row: dict) -> None:
        if use_row_files:
            write_row_file(rows_dir(c), row)
        else:
            append_row(table_path(c), row)
        rows[id(c)] = row
        if on_row:
            on_row(row)
        if bar is not None:
            bar.update(1)

    try:
        _measure_groups(todo, impls, history, done, step)
    finally:
        if bar is not None:
            bar.close()
    return [rows[id(c)] for c in todo if id(c) in rows]


def _not_done(todo: list[BenchConfig]) -> list[BenchConfig]:
    """``resume``: the configurations whose measurement (same configuration, device and
    libraries) is not in their study yet; one line per study on what is skipped and
    when and where it was measured."""
    finished: dict[Path, dict] = {}
    kept, found, fewer = [], collections.defaultdict(list), collections.Counter()
    for c in todo:
        path = table_path(c)
        if path not in finished:  # each study's table and row files read once
            finished[path] = done(c)
        row = finished[path].get(identity(base_row(c)))
        if row is None:
            kept.append(c)
        else:
            found[path].append(row)
            fewer[path] += (number(row.get("repeats")) or 1) < c.repeats
    for path, rows in found.items():
        asked = sum(table_path(c) == path for c in todo)
        stamps = sorted(str(r.get("timestamp") or "")[:10] for r in rows if r.get("timestamp"))
        when = stamps[0] if stamps and stamps[0] == stamps[-1] else f"{stamps[0]} to {stamps[-1]}" if stamps else "?"
        hosts = ", ".join(sorted({str(r.get("host") or "?") for r in rows}))
        log.warning(
            "resume: %d of %d jobs already in %s, measured %s on %s%s; skipped (run without resume=true to measure "
            "them again)", len(rows), asked, path, when, hosts,
            f", {fewer[path]} of them with fewer repeats than asked" if fewer[path] else "",
        )  # fmt: skip
    return kept


def expand(base: BenchConfig, grid: dict[str, Sequence]) -> list[BenchConfig]:
    """The cartesian product of ``grid`` (field -> values) over ``base``; an unknown
    field is a ``ValueError``."""
    names = [f.name for f in dataclasses.fields(base)]
    for k in grid:
        if k not in names:
            raise ValueError(f"sweep.{k}: unknown setting; a sweep varies one of: {', '.join(names)}")
    keys = list(grid)
    return [dataclasses.replace(base, **dict(zip(keys, vals))) for vals in itertools.product(*grid.values())]
