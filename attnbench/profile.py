"""Where a call's time and memory go: one call under ``torch.profiler``, its artefacts,
and the breakdown of implementations by category of work.

The profiled call is the measurement pipeline's last step (``profile=true``): after the
warm-up, the timed calls and the memory pass, so no timed call ever runs under a
profiler. It writes, in a folder per result row (``results/profiles/<study>/...``,
the row's ``profile`` column):

* ``trace.json.gz``: the trace, for Perfetto (ui.perfetto.dev) or ``chrome://tracing``;
* ``ops.csv``: operator, category, calls, self time, % of the call, self memory
  (printed on the console too);
* ``memory.png``: memory over the call. CUDA: allocated bytes from
  ``torch.cuda.memory._record_memory_history``, whose snapshot is kept as
  ``memory_snapshot.pickle`` for PyTorch's memory viewer (pytorch.org/memory_viz).
  CPU: the process's resident set, sampled every millisecond.

Categories (:data:`RULES`, one table for every implementation): matrix multiply,
softmax and exp, masking and elementwise, copy, index and layout, a fused kernel
(compiled FlexAttention, Triton, CuPy, SDPA's fused paths: one kernel, named as such),
outside operators (the call's own time outside every operator: Python, launches, and
returning large buffers to the system), other.

    python -m attnbench experiment=breakdown                 # profile every implementation, draw the breakdown
    python -m attnbench.plot results/breakdown-cpu.csv --figure breakdown   # draw it again

The breakdown's figure is drawn by :mod:`attnbench.plot` (``figure=breakdown``), from
the table :func:`breakdown` computes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import torch

log = logging.getLogger("attnbench")

__all__ = ["CATEGORIES", "RULES", "category", "profile_call", "profile_dir", "breakdown"]

#: the call's own time outside every operator (the record_function around it)
CALL = "attnbench::call"

#: (category, pattern on the operator or CUDA kernel name); the first match wins
RULES: list[tuple[str, str]] = [
    ("outside operators", rf"^{CALL}$"),
    (
        "fused kernel",
        r"CompiledFxGraph|Torch-Compiled Region|TorchDynamo|AOTDispatcher|triton|_fwd_|_bwd_|band_qk|band_av|band_tv"
        r"|flash|scaled_dot_product|_efficient_attention|fmha|cudnn.*attention",
    ),
    ("matrix multiply", r"^aten::(mm|bmm|matmul|addmm|baddbmm|linear|einsum|dot|_addmm_activation)$|gemm|cutlass|xmma"),
    ("softmax and exp", r"^aten::(_?softmax|_?log_softmax|_safe_softmax|exp|exp2|logsumexp)$|softmax"),
    (
        "masking and elementwise",
        r"^aten::(masked_fill_?|where|mul_?|add_?|sub_?|rsub|div_?|neg|eq|ne|ge|gt|le|lt|bitwise_\w+|logical_\w+"
        r"|__and__|__or__|__iand__|__ior__|remainder|floor_divide|clamp\w*|maximum|minimum|max|min|sum|mean|abs"
        r"|sqrt|rsqrt|pow|isfinite|isnan|any|all|nonzero|tril|triu)$|elementwise|reduce_kernel",
    ),
    (
        "copy, index and layout",
        r"^aten::(copy_|to|_to_copy|contiguous|clone|cat|stack|index\w*|gather|scatter\w*|pad|constant_pad_nd"
        r"|as_strided\w*|unfold|transpose|permute|reshape|view|_unsafe_view|_reshape_alias|expand\w*|select|slice"
        r"|empty\w*|resize_|unsqueeze|squeeze|flatten|t|narrow|split\w*|chunk|unbind|fill_|zero_|zeros\w*|ones\w*"
        r"|full\w*|new_\w+|arange|lift_fresh|detach_?|alias|flip|roll|repeat\w*|tile|movedim|diagonal|unflatten"
        r"|masked_select|take|_index_put_impl_|index_put_|resolve_conj|resolve_neg)$|^detach_?$"
        r"|copy|Memcpy|Memset|fill|gather|scatter|index|cat",
    ),
]
CATEGORIES = tuple(dict.fromkeys([c for c, _ in RULES] + ["other"]))
_COMPILED = [(c, re.compile(p)) for c, p in RULES]


def category(name: str) -> str:
    """The category of an operator or kernel name (:data:`RULES`), else "other"."""
    for cat, pattern in _COMPILED:
        if pattern.search(name):
            return cat
    return "other"


# ---------------------------------------------------------------------- one profiled call
def profile_dir(row: Mapping, results_dir: str | Path) -> Path:
    """``<results_dir>/profiles/<study>/<impl>-<pattern>-n<n>-<dtype>-<mode>-<digest>``:
    one folder per measurement (the digest is of its identity)."""
    from .results import identity

    digest = hashlib.sha1(repr(identity(row)).encode()).hexdigest()[:8]
    label = f"{row['impl']}-{row['pattern']}-n{row['seq_len']}-{row['dtype']}-{row['mode']}"
    return Path(results_dir) / "profiles" / str(row["study"]) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}-{digest}"


class _RssSampler:
    """The process's resident set, sampled every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.001):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                pages = int(f.read().split()[1])
            self.samples.append((time.perf_counter() - t0, pages * 4096))
            time.sleep(self.period)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a moment (C++ code writes there directly)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _self_time(event, cuda: bool) -> float:
    return float(event.self_device_time_total if cuda else event.self_cpu_time_total)


def op_table(prof, cuda: bool) -> pd.DataFrame:
    """One row per operator (CUDA: per kernel): category, calls, self time (ms), % of the
    call, self memory (bytes), most time first."""
    rows = []
    for e in prof.key_averages():
        self_us = _self_time(e, cuda)
        if cuda and e.key == CALL:  # the call's own CPU time is launch overhead, on the host
            self_us = float(e.self_cpu_time_total)
        mem = e.self_device_memory_usage if cuda else e.self_cpu_memory_usage
        rows.append({"operator": e.key, "category": category(e.key), "calls": e.count, "self_ms": self_us / 1e3,
                     "self_memory_bytes": int(mem)})  # fmt: skip
    table = pd.DataFrame(rows)
    total = table["self_ms"].sum()
    table.insert(4, "percent", 100 * table["self_ms"] / total if total > 0 else 0.0)
    return table[table["self_ms"] > 0].sort_values("self_ms", ascending=False, ignore_index=True)


def _memory_png(path: Path, times_s: list[float], used: list[float], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([t * 1e3 for t in times_s], [u / 2**20 for u in used], lw=1.2, color="#0072B2")
    ax.set(xlabel="time in the call (ms)", ylabel="MiB", title=title)
    ax.grid(True, color="#e0e0e0")
    fig.tight_layout()
    fig.savefig(path)


def _cuda_timeline(snapshot: dict) -> tuple[list[float], list[float]]:
    """Allocated bytes over time from a ``_record_memory_history`` snapshot."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    events = [e for e in events if e.get("action") in ("alloc", "free_completed")]
    if not events:
        return [], []
    t0, used, times, levels = events[0]["time_us"], 0, [], []
    for e in sorted(events, key=lambda e: e["time_us"]):
        used += e["size"] if e["action"] == "alloc" else -e["size"]
        times.append((e["time_us"] - t0) / 1e6)
        levels.append(used)
    return times, levels


def profile_call(fn, grads: list, device: torch.device, folder: Path, label: str) -> dict:
    """Clear the ``grads`` then run one call of ``fn`` under the profiler; write the artefacts to
    ``folder``. Returns the row's ``profile`` field."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for t in grads:
        t.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    sampler = _RssSampler() if not cuda else None
    prof = profile(activities=activities, record_shapes=True, profile_memory=True)
    try:
        with _quiet_stderr():  # the tracer's start and stop lines
            prof.start()
        try:
            with sampler or contextlib.nullcontext(), record_function(CALL):
                fn()
                if cuda:
                    torch.cuda.synchronize()
        finally:
            with _quiet_stderr():
                prof.stop()
        if cuda:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._dump_snapshot(str(folder / "memory_snapshot.pickle"))
    finally:
        if cuda:
            torch.cuda.memory._record_memory_history(enabled=None)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(folder / "trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    table = op_table(prof, cuda)
    table.to_csv(folder / "ops.csv", index=False)
    if cuda:
        times, used = _cuda_timeline(snapshot)
        _memory_png(folder / "memory.png", times, used, f"{label}: allocated (CUDA)")
    else:
        times, used = zip(*sampler.samples) if sampler.samples else ((), ())
        base = used[0] if used else 0
        _memory_png(folder / "memory.png", list(times), [u - base for u in used], f"{label}: resident set growth")
    shown = table.head(12).to_string(index=False, float_format=lambda x: f"{x:.3g}")
    log.info("%s: where the time goes (%s):\n%s", label, folder, shown)
    return {"profile": str(folder)}


# ---------------------------------------------------------------------- the breakdown of a study
def breakdown(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Time by category for every profiled row: impl, pattern, dtype, mode, seq_len,
    category, ms, percent (of the row's profiled call), peak_mem_bytes."""
    out = []
    for r in rows:
        path = Path(str(r.get("profile") or "")) / "ops.csv"
        if not r.get("profile") or not path.is_file():
            continue
        ops = pd.read_csv(path)
        total = ops["self_ms"].sum()
        for cat in CATEGORIES:
            ms = float(ops.loc[ops["category"] == cat, "self_ms"].sum())
            out.append({**{k: r.get(k) for k in ("impl", "pattern", "dtype", "mode", "seq_len", "peak_mem_bytes")},
                        "category": cat, "ms": ms, "percent": 100 * ms / total if total else 0.0})  # fmt: skip
    return pd.DataFrame(out)
