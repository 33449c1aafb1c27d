"""One measurement in this process, as a one-way pipeline:

    case -> first call -> verify -> time -> memory -> (profile) -> row

given a resolved :class:`~attnbench.config.BenchConfig` and the resolved
:class:`~attnbench.registry.Impl`. The inputs are drawn once, on the device, and every
step uses them. The guards (should this run at all?) and the process isolation live in
:mod:`attnbench.sweep`; this module never decides to skip.

1. **first call**: one forward call, timed alone (compilation and autotuning land
   here); the implementation's :meth:`~attnbench.registry.Impl.last_call` says what
   per-shape set-up it built (``setup_ms``).
2. **verify** (:mod:`attnbench.verify`): that output against the float64 reference,
   every row where the dense reference fits ``exact_verify_bytes``, else sampled rows;
   the bwd modes also check gradients on the first ``grad_check_seq_len`` tokens. A
   failure is ``wrong`` and gets no time.
3. **time**: warm-up, then repeated calls until ``time_budget_s`` or ``max_reps``.
   CUDA: events, the L2 cache flushed outside the timed region; CPU: ``perf_counter``.
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
import dataclasses
import gc
import json
import logging
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import BenchConfig
from .pattern import Pattern
from .profile import profile_call, profile_dir
from .reference import default_scale
from .registry import Impl, UnsupportedError
from .results import base_row
from .verify import check_grads, check_output, sample_rows

__all__ = ["Case", "Wrong", "measure_here", "status_of", "runner_for", "time_fn"]

log = logging.getLogger("attnbench")


class Wrong(Exception):
    """The implementation's answer failed verification; ``fields`` go into the row."""

    def __init__(self, msg: str, fields: dict):
        super().__init__(msg)
        self.fields = fields


@dataclass
class Case:
    """The inputs of one measurement, drawn once, and the call."""

    config: BenchConfig
    impl: Impl
    pattern: Pattern
    q: torch.Tensor  # (B, H, n, D)
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor | None  # output cotangent, bwd modes only
    scale: float

    @classmethod
    def build(cls, c: BenchConfig, impl: Impl) -> Case:
        """Seeded normal inputs drawn on the device, one generator call per tensor."""
        dev = torch.device(c.device)
        gen = torch.Generator(device=dev).manual_seed(c.seed)
        shape = (c.batch, c.heads, c.seq_len, c.head_dim)
        grad = c.mode != "fwd"

        def draw() -> torch.Tensor:
            return torch.randn(shape, generator=gen, device=dev, dtype=c.torch_dtype())

        q, k, v = (draw().requires_grad_(grad) for _ in range(3))
        dout = draw() if grad else None
        return cls(c, impl, c.pattern(), q, k, v, dout, default_scale(c.head_dim))

    @property
    def device(self) -> torch.device:
        return self.q.device

    def forward(self) -> torch.Tensor:
        return self.impl.fn(self.q, self.k, self.v, self.pattern, self.scale)

    def contract(self, out: torch.Tensor) -> None:
        """The registry's contract, checked on the first call (plugins too)."""
        if out.shape != self.q.shape or out.dtype != self.q.dtype:
            raise RuntimeError(
                f"impl={self.impl.name!r} returned shape {tuple(out.shape)} dtype {out.dtype}; "
                f"expected {tuple(self.q.shape)} {self.q.dtype}"
            )

    def verify(self, out: torch.Tensor) -> dict:
        return verify(self, out)

    def zero_grad(self) -> None:
        for t in (self.q, self.k, self.v):
            t.grad = None

    def runner(self) -> tuple[Callable[[], object], Callable[[], None]]:
        """(the timed call, an untimed set-up run before each timed call) for the mode."""
        return runner_for(self.config.mode, self.forward, self.dout, self.zero_grad)


def runner_for(mode: str, forward: Callable[[], torch.Tensor], cotangent, zero_grad: Callable[[], None]):
    """(the timed call, an untimed set-up before each) of ``forward`` in ``mode``: fwd
    without autograd; fwd_bwd the forward and the backward of ``cotangent``; bwd the
    backward alone, its forward graph built once outside the timed region."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return forward()

        return fwd, lambda: None
    if mode == "fwd_bwd":
        return (lambda: forward().backward(cotangent)), zero_grad
    state: dict = {}

    def setup():
        zero_grad()
        if "out" not in state:
            state["out"] = forward()

    return (lambda: state["out"].backward(cotangent, retain_graph=True)), setup


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


def verify(case: Case, out: torch.Tensor) -> dict:
    """``out`` against the reference (every row, or sampled rows), then the gradients in
    the bwd modes. Returns the row's verification fields; raises :class:`Wrong`."""
    c = case.config
    B, H, n, D = case.q.shape
    exact = B * H * n * n * 8 * 3 <= c.exact_verify_bytes
    rows = None if exact else sample_rows(n, case.pattern, c.verify_rows, c.seed + 1)
    verdict = check_output(out, case.q, case.k, case.v, case.pattern, case.scale, rows)
    fields = {
        "verified": "exact" if exact else f"rows ({len(rows)})",
        "max_abs_err": verdict.max_err,
        "mean_abs_err": verdict.mean_err,
        "tol": verdict.tol,
    }
    if not verdict.ok:
        raise Wrong(f"{verdict} ({fields['verified']})", fields)
    if c.mode != "fwd":
        fields.update(_verify_grads(case))
    return fields


def _verify_grads(case: Case) -> dict:
    """Gradients on the first ``grad_check_seq_len`` tokens of the same inputs."""
    m = min(case.config.seq_len, case.config.grad_check_seq_len)
    p = case.pattern
    if p.global_tokens and p.global_tokens[-1] >= m:  # keep the globals that fit, or one at the end
        p = dataclasses.replace(p, global_tokens=[g for g in p.global_tokens if g < m] or [m - 1])
    q, k, v, dout = (t.detach()[:, :, :m] for t in (case.q, case.k, case.v, case.dout))
    verdicts = check_grads(lambda *x: case.impl.fn(*x, p, case.scale), q, k, v, p, dout, case.scale, f"n={m}")
    worst = max(verdicts, key=lambda x: (not x.ok, x.max_err))
    fields = {"grad_max_abs_err": max(x.max_err for x in verdicts)}
    if not worst.ok:
        raise Wrong(f"gradient {worst}", fields)
    return fields


def time_calls(case: Case) -> dict:
    """Warm-up, then timed calls until the time budget or the count is reached."""
    c = case.config
    fn, setup = case.runner()
    return time_fn(fn, setup, case.device, c.warmup, c.min_reps, c.max_reps, c.time_budget_s, c.flush_l2)


def time_fn(
    fn: Callable[[], object],
    setup: Callable[[], None],
    device: torch.device,
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    flush_l2: bool = True,
) -> dict:
    """The one timing loop (the engine's, and gpu_check's ceilings'): ``warmup`` calls,
    then ``fn`` timed until ``budget_s`` has passed with at least ``min_reps`` calls, or
    ``max_reps`` calls; ``setup`` runs untimed before each. CUDA: events around the call,
    the L2 cache flushed before it, outside the timed region; CPU: ``perf_counter``."""
    for _ in range(warmup):
        setup()
        fn()
    _sync(device)
    flush = None
    if device.type == "cuda" and flush_l2:
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)  # larger than any L2
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps:
        setup()
        if device.type == "cuda":
            if flush is not None:
                flush.zero_()  # evict the inputs from L2, outside the timed region
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    qs = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "time_ms_median": statistics.median(times),
        "time_ms_iqr": qs[2] - qs[0],
        "time_ms_min": min(times),
        "n_timed": len(times),
    }


def _status_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{name} not in /proc/self/status")


def peak_memory(case: Case) -> dict:
    """Peak bytes one (warm) call allocates beyond what was allocated before it."""
    fn, setup = case.runner()
    dev = case.device
    setup()
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
def status_of(e: BaseException) -> tuple[str, str]:
    """(status, reason) of a failed measurement: an allocation that failed (on a GPU or
    the CPU) is ``oom``, so a series stops there; anything else is ``error``."""
    if isinstance(e, UnsupportedError):
        return "skipped", "unsupported: " + "; ".join(e.reasons)
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
    low = msg.lower()
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in low or "allocate memory" in low:
        return "oom", msg
    return "error", msg


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
        if c.model_layers:  # inside a Longformer encoder (attnbench.model)
            from .model import ModelCase

            case = ModelCase.build(c, impl)
        else:
            case = Case.build(c, impl)
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
        row.update(time_calls(case))
        if c.memory:
            _trim()
            log.info("%s: peak memory", label)
            row.update(peak_memory(case))
        if c.profile:  # after every timed call: no timed call runs under a profiler
            log.info("%s: profiling", label)
            fn, setup = case.runner()
            row.update(profile_call(fn, setup, case.device, profile_dir(row, c.results_dir), label))
        if row["flops"]:
            row["tflops"] = row["flops"] / (row["time_ms_median"] * 1e-3) / 1e12
        tunables = case.impl.last_call().get("tunables")
        row["tunables"] = json.dumps(tunables, sort_keys=True) if tunables else ""
        row["status"] = "ok"
    except Wrong as e:
        row.update(e.fields)
        row["status"], row["reason"] = "wrong", str(e)
    except Exception as e:  # one failure is one row
        row["status"], row["reason"] = status_of(e)
        if row["status"] == "error":
            log.warning("%s: %s", label, traceback.format_exc(limit=6).rstrip())
    log.info("%s: %s", label, row["status"])
    return row
