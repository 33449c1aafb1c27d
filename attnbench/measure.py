"""One measurement in this process, as a one-way pipeline:

    case -> first call -> verify -> time -> memory -> (profile) -> row

given a resolved :class:`~attnbench.config.BenchConfig` and the resolved
:class:`~attnbench.registry.Impl`. The case (:class:`~attnbench.case.Case`: the
attention call alone, or a whole model of :mod:`attnbench.model`) draws the inputs once,
on the device, and every step uses them. The guards (should this run at all?) and the
process isolation live in :mod:`attnbench.sweep`; this module never decides to skip.

1. **first call**: one forward call, timed alone (compilation and autotuning land
   here); the implementation's :meth:`~attnbench.registry.Impl.last_call` says what
   per-shape set-up it built (``setup_ms``).
2. **verify** (:mod:`attnbench.verify`): that output against the float64 reference,
   every row where the dense reference fits ``exact_verify_bytes``, else sampled rows;
   the bwd modes check the gradients the same way, at the measured size (so the kernels
   verified are the ones timed, autotuned choices included). A failure is ``wrong`` and
   gets no time.
3. **time** (:func:`time_fn`): first the noise probe (:func:`noise_probe`, the row's
   ``noise``), then repeated calls for ``time_budget_s``; CUDA through
   ``triton.testing.do_bench`` (L2 flushed before each call), else the engine's loop;
   the median with the 95% interval of the calls (:func:`attnbench.stats.interval`).
4. **memory**, in a call of its own: CUDA ``max_memory_allocated`` minus what was
   allocated before the call; CPU the resident-set high-water mark, reset just before
   the call, minus the resident set before it (exact in a fresh process with large
   allocations mmapped, which the sweep's isolation arranges).
5. **profile** (``profile=true``): one more call under ``torch.profiler``, its trace,
   operator table and memory timeline written beside the results (:mod:`attnbench.profile`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .case import Case, Wrong, runner_for
from .config import BenchConfig
from .model import ModelCase
from .pattern import Pattern
from .profile import profile_call, profile_dir
from .reference import default_scale
from .registry import Impl, UnsupportedError
from .results import base_row
from .stats import interval, spread
from .verify import check_grads, check_output, sample_rows

__all__ = ["AttentionCase", "case_for", "measure_here", "noise_probe", "status_of", "time_fn"]

log = logging.getLogger("attnbench")
#: the clock of the engine's own timing loop and of the noise probe (seconds); a test
#: may put a noisy one here
clock = time.perf_counter


@dataclass
class AttentionCase:
    """The attention call alone: its inputs, drawn once, and the call (a :class:`Case`)."""

    config: BenchConfig
    impl: Impl
    pattern: Pattern
    q: torch.Tensor  # (B, H, n, D)
    k: torch.Tensor  # (B, H_kv, n, D)
    v: torch.Tensor
    dout: torch.Tensor | None  # output cotangent, bwd modes only
    scale: float

    @classmethod
    def build(cls, c: BenchConfig, impl: Impl) -> AttentionCase:
        """Seeded normal inputs drawn on the device, one generator call per tensor."""
        dev = torch.device(c.device)
        gen = torch.Generator(device=dev).manual_seed(c.seed)
        shape = (c.batch, c.heads, c.seq_len, c.head_dim)
        kv_shape = (c.batch, c.heads if c.kv_heads is None else c.kv_heads, c.seq_len, c.head_dim)
        grad = c.mode != "fwd"

        def draw(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=dev, dtype=c.torch_dtype())

        q, k, v = (draw(s).requires_grad_(grad) for s in (shape, kv_shape, kv_shape))
        dout = draw(shape) if grad else None
        return cls(c, impl, c.pattern(), q, k, v, dout, default_scale(c.head_dim))

    @property
    def device(self) -> torch.device:
        return self.q.device

    def forward(self) -> torch.Tensor:
        return self.impl.call(self.q, self.k, self.v, self.pattern, self.scale)

    def contract(self, out: torch.Tensor) -> None:
        """The registry's contract, checked on the first call (plugins too)."""
        if out.shape != self.q.shape or out.dtype != self.q.dtype:
            raise RuntimeError(
                f"impl={self.impl.name!r} returned shape {tuple(out.shape)} dtype {out.dtype}; "
                f"expected {tuple(self.q.shape)} {self.q.dtype}"
            )

    def verify(self, out: torch.Tensor) -> dict:
        return verify(self, out)

    def runner(self) -> tuple[Callable[[], object], list[torch.Tensor]]:
        """(the timed call, the tensors whose gradient is cleared before each call)."""
        return runner_for(self.config.mode, self.forward, self.dout, [self.q, self.k, self.v])


def case_for(c: BenchConfig, impl: Impl) -> Case:
    """The case of a resolved configuration: inside a model (``model_layers``) or the
    attention call alone."""
    return (ModelCase if c.model_layers else AttentionCase).build(c, impl)


# ---------------------------------------------------------------------- steps
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def first_call(case: Case) -> tuple[torch.Tensor, dict]:
    """The process's first forward call, timed alone; its output (for verification)."""
    dev = case.device
    _sync(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = case.forward()
    _sync(dev)
    fields = {"first_call_ms": (time.perf_counter() - t0) * 1e3, "setup_ms": case.impl.last_call().get("setup_ms")}
    case.contract(out)
    return out, fields


def verify(case: AttentionCase, out: torch.Tensor) -> dict:
    """``out`` against the reference (every row, or sampled rows), then the gradients in
    the bwd modes. Returns the row's verification fields; raises :class:`Wrong`."""
    c = case.config
    B, H, n, D = case.q.shape
    dense = B * H * n * n * 8 * 3  # the float64 scores, probabilities and mask (k, v repeated: O(n))
    sampled = sample_rows(n, case.pattern, c.verify_rows, c.seed + 1)
    exact = dense <= c.exact_verify_bytes
    rows = None if exact else sampled
    verdict = check_output(out, case.q, case.k, case.v, case.pattern, case.scale, rows)
    fields = {
        "verified": "exact" if exact else f"rows ({len(rows)})",
        "max_abs_err": verdict.max_err,
        "mean_abs_err": verdict.mean_err,
        "tol": verdict.tol,
    }
    if not verdict.ok:
        raise Wrong(f"{verdict} ({fields['verified']})", fields)
    if c.mode != "fwd":  # autograd keeps about 4x as much of the dense reference
        _verify_grads(case, None if 4 * dense <= c.exact_verify_bytes else sampled, fields)
    return fields


def _verify_grads(case: AttentionCase, rows: list[int] | None, fields: dict) -> None:
    """The gradients at the measured size: every entry, or those the sampled ``rows``
    reach (one more forward and backward of the implementation); into ``fields``."""
    p = case.pattern
    verdicts = check_grads(lambda *x: case.impl.call(*x, p, case.scale), case.q, case.k, case.v, p, case.dout,
                           case.scale, f"n={case.config.seq_len}", rows)  # fmt: skip
    worst = max(verdicts, key=lambda x: (not x.ok, x.max_err))
    fields["grad_max_abs_err"] = max(x.max_err for x in verdicts)
    if not worst.ok:
        raise Wrong(f"gradient {worst}", fields)


def time_calls(case: Case) -> dict:
    """The timed calls of the case's mode (see :func:`time_fn`)."""
    c = case.config
    fn, grads = case.runner()
    return time_fn(fn, case.device, c.time_budget_s, warmup=c.warmup, min_reps=c.min_reps, max_reps=c.max_reps,
                   flush_l2=c.flush_l2, grad_to_none=grads)  # fmt: skip


def _do_bench():
    """``triton.testing.do_bench``, or None where Triton is not installed."""
    try:
        from triton.testing import do_bench
    except Exception:
        return None
    return do_bench


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    budget_s: float,
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 100,
    flush_l2: bool = True,
    grad_to_none: list[torch.Tensor] = (),
) -> dict:
    """Median, interquartile range and minimum, in ms, of calls of ``fn`` repeated for
    ``budget_s`` seconds (at most ``max_reps`` kept); the ``.grad`` of ``grad_to_none``
    is cleared before each call, untimed. ``timer`` says which loop measured.

    Why two loops: on CUDA, ``triton.testing.do_bench`` is the loop kernel authors quote
    (per-call events, the L2 cache flushed before each call, repetitions chosen by time),
    so our numbers compare with theirs; it needs a GPU, so elsewhere (or without Triton,
    or with ``flush_l2`` off, which do_bench cannot do) the engine's own loop runs:
    ``warmup`` calls, then timed calls until the budget has passed with ``min_reps``."""
    do_bench = _do_bench() if device.type == "cuda" and flush_l2 else None
    if do_bench is not None:
        times = do_bench(fn, rep=max(1.0, budget_s * 1e3), grad_to_none=list(grad_to_none), return_mode="all")
        times, timer = list(times)[:max_reps], "do_bench"
    else:
        times, timer = _loop(fn, device, warmup, min_reps, max_reps, budget_s, grad_to_none), "loop"
    qs = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    low, high = interval(times) or (None, None)
    return {
        "time_ms_median": statistics.median(times),
        "time_ms_iqr": qs[2] - qs[0],
        "time_ms_min": min(times),
        "time_ms_ci_low": low,  # from the calls of this one process (attnbench.stats)
        "time_ms_ci_high": high,
        "n_timed": len(times),
        "timer": timer,
    }


def _loop(fn, device: torch.device, warmup: int, min_reps: int, max_reps: int, budget_s: float, grads) -> list[float]:
    def clear() -> None:
        for t in grads:
            t.grad = None

    for _ in range(warmup):
        clear()
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        clear()
        if device.type == "cuda":  # no L2 flush here (flush_l2=false)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t = clock()
            fn()
            times.append((clock() - t) * 1e3)
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return times


#: the noise probe: a fixed matrix product (n x n, dtype) per device, timed PROBE_CALLS times
PROBE = {"cpu": (768, torch.float32), "cuda": (8192, torch.bfloat16)}
PROBE_CALLS = 9
#: the probe's times travel with a row to the sweep (which pools a row's repeats), not into tables
PROBE_KEY = "_probe_ms"


def noise_probe(device: str) -> list[float]:
    """Times in ms of :data:`PROBE_CALLS` calls of a fixed matrix product on ``device``
    (the sweep's noise meter: how steady the machine is, apart from any implementation)."""
    dev = torch.device(device)
    n, dtype = PROBE[dev.type]
    a = torch.ones(n, n, device=dev, dtype=dtype)
    a @ a  # untimed: the library's first call
    times = []
    for _ in range(PROBE_CALLS):
        _sync(dev)
        t = clock()
        a @ a
        _sync(dev)
        times.append((clock() - t) * 1e3)
    return times


def _probe(device: str) -> list[float]:
    """:func:`noise_probe`, or no times where it fails (its failure is not the row's)."""
    try:
        return noise_probe(device)
    except Exception as e:  # e.g. no memory left for its matrices beside the case's inputs
        log.info("noise probe failed (%s: %s); the row has no noise figure", type(e).__name__, e)
        return []
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def calls_per_job(c: BenchConfig) -> int:
    """About how many calls one measurement makes beyond its timed ones: the first call,
    verification (and its backward), the warm-up (do_bench's estimate: 5 more), memory."""
    cuda_warmup = 7 if c.device == "cuda" and c.flush_l2 else c.warmup
    return 3 + (c.mode != "fwd") + cuda_warmup + c.min_reps


def _status_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{name} not in /proc/self/status")


def peak_memory(case: Case) -> dict:
    """Peak bytes one (warm) call allocates beyond what was allocated before it."""
    fn, grads = case.runner()
    dev = case.device
    for t in grads:
        t.grad = None
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated() - before)}
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the resident-set high-water mark
    except OSError:
        return {"peak_mem_bytes": None}
    before = _status_field("VmRSS")
    result = fn()
    peak = _status_field("VmHWM")
    del result
    return {"peak_mem_bytes": int(max(0, peak - before))}


# ---------------------------------------------------------------------- the pipeline
def status_of(e: BaseException) -> tuple[str, str, str]:
    """(status, kind of reason, reason) of a failed measurement: an allocation that failed
    (on a GPU or the CPU) is ``oom``, so a series stops there; anything else is ``error``."""
    if isinstance(e, UnsupportedError):
        return "skipped", "unsupported", "unsupported: " + "; ".join(e.reasons)
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
    low = msg.lower()  # the allocator's own words: PyTorch raises a RuntimeError for some
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in low or "allocate memory" in low:
        return "oom", "oom", msg
    return "error", "error", msg


def measure_here(c: BenchConfig, impl: Impl) -> dict:
    """Measure the resolved ``c`` with ``impl`` in this process; the row. Never raises for
    a failing implementation: the failure is the row's status."""
    row = base_row(c)
    label = f"{c.impl} n={c.seq_len} {c.dtype} {c.mode}" + (
        f" in {c.model_layers}-layer model" if c.model_layers else ""
    )
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    torch.manual_seed(c.seed)
    try:
        case = case_for(c, impl)
        log.info("%s: first call", label)
        out, fields = first_call(case)
        row.update(fields)
        if c.verify:
            log.info("%s: verifying", label)
            row.update(case.verify(out))
        else:
            row["verified"] = "no"
        del out
        _trim()
        log.info("%s: timing", label)
        probe = _probe(c.device)  # the machine's steadiness, just before the timed calls
        row.update(time_calls(case), noise=spread(probe), **{PROBE_KEY: probe})
        if c.memory:
            _trim()
            log.info("%s: peak memory", label)
            row.update(peak_memory(case))
        if c.profile:  # after every timed call: no timed call runs under a profiler
            log.info("%s: profiling", label)
            fn, grads = case.runner()
            row.update(profile_call(fn, grads, case.device, profile_dir(row, c.results_dir), label))
        if row["flops"]:
            row["tflops"] = row["flops"] / (row["time_ms_median"] * 1e-3) / 1e12
        tunables = case.impl.last_call().get("tunables")
        row["tunables"] = json.dumps(tunables, sort_keys=True) if tunables else ""
        row["status"] = "ok"
    except Wrong as e:
        row.update(e.fields)
        row["status"], row["reason_kind"], row["reason"] = "wrong", "wrong", str(e)
    except Exception as e:  # one failure is one row
        row["status"], row["reason_kind"], row["reason"] = status_of(e)
        if row["status"] == "error":
            log.warning("%s: %s", label, traceback.format_exc(limit=6).rstrip())
    log.info("%s: %s", label, row["status"])
    return row
