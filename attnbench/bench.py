"""The benchmark engine: verify, time and memory-profile one configuration, or sweep many.

Plain Python, no Hydra needed::

    from attnbench.bench import BenchConfig, measure, sweep
    row = measure(BenchConfig(impl="chunked", seq_len=8192, device="cpu"))
    rows = sweep([BenchConfig(impl=i, seq_len=n) for i in ("naive", "chunked") for n in (1024, 2048)])

One measurement, in order (each step can end it with a status):

1. guards: the implementation supports the case (else ``skipped: unsupported`` or
   ``skipped: unavailable``), the memory estimate fits the budget (else ``skipped:
   over the memory budget``), an interpreted kernel is not asked for a size it
   cannot finish (else ``skipped: over the time budget``);
2. verification against the float64 reference (exact where n is small, selected
   rows where it is large; gradients at a small n for the bwd modes): a failure is
   ``wrong`` and gets no timing;
3. timing: the first call is recorded separately; then warm-up and repeated calls
   until a time budget or a count; median, IQR and min;
4. peak memory in its own pass: CUDA ``max_memory_allocated`` minus what was
   allocated before the call; CPU the resident-set high-water mark, reset just
   before the call, minus the resident set before it (exact in a fresh process with
   large allocations mmapped, which ``isolate`` arranges);
5. work: useful FLOPs = 4 * head_dim * pattern pairs * batch (forward), backward
   2.5x forward.

With ``isolate`` (the default) each configuration runs in its own child process, so
a crash, an out-of-memory kill or a hang costs one row, never the sweep.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import datetime as _dt
import fcntl
import gc
import hashlib
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .pattern import Pattern
from .reference import default_scale, reference, reference_rows
from .registry import UnsupportedError, get_impl

__all__ = [
    "BenchConfig",
    "COLUMNS",
    "STATUSES",
    "measure",
    "sweep",
    "append_row",
    "read_rows",
    "rows_dir",
    "write_row_file",
    "read_row_files",
    "config_key",
    "format_rows",
]

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}
MODES = ("fwd", "bwd", "fwd_bwd")
DEVICES = ("auto", "cpu", "cuda")
STATUSES = ("ok", "wrong", "oom", "skipped", "error")

#: forward tolerance (max abs error against the float64 reference, unit-variance inputs).
#: fp32 allows TF32 tensor-core products; bf16/fp16 allow one rounding of scores/probabilities.
TOL = {"fp64": 1e-8, "fp32": 2e-3, "fp16": 1e-2, "bf16": 6e-2}
#: gradient tolerance (gradients of a random output cotangent, checked at a small n)
GRAD_TOL = {"fp64": 1e-7, "fp32": 5e-3, "fp16": 5e-2, "bf16": 2e-1}

COLUMNS = [
    "study",
    "impl",
    "pattern",
    "window",
    "dilation",
    "causal",
    "global_tokens",
    "global_positions",
    "batch",
    "heads",
    "seq_len",
    "head_dim",
    "dtype",
    "device",
    "device_name",
    "mode",
    "status",
    "reason",
    "time_ms_median",
    "time_ms_iqr",
    "time_ms_min",
    "first_call_ms",
    "setup_ms",
    "n_timed",
    "peak_mem_bytes",
    "mem_estimate_bytes",
    "flops",
    "tflops",
    "verified",
    "max_abs_err",
    "mean_abs_err",
    "tol",
    "grad_max_abs_err",
    "tunables",
    "threads",
    "torch_version",
    "triton_version",
    "cupy_version",
    "git_commit",
    "host",
    "timestamp",
]


@dataclass
class BenchConfig:
    """One measurement. ``None`` / ``"auto"`` fields are resolved for the machine at hand.

    Shape convention: q, k, v are ``(batch, heads, seq_len, head_dim)``.
    """

    impl: str = "chunked"
    seq_len: int | None = None  # auto: 16384 on CUDA, 4096 on the CPU
    window: int = 512
    dilation: int | tuple[int, ...] = 1
    global_tokens: tuple[int, ...] = ()
    causal: bool = False
    batch: int = 1
    heads: int = 12
    head_dim: int = 64
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    device: str = "auto"  # auto: cuda when present
    mode: str = "fwd"
    seed: int = 0
    study: str = "default"
    results_dir: str = "results"
    # verification
    verify: bool = True
    exact_verify_bytes: float = 2**30  # dense reference up to this size, else sampled rows
    verify_rows: int = 32
    grad_check_seq_len: int = 256
    # timing
    time_budget_s: float = 2.0  # repeated calls stop after this long ...
    min_reps: int = 3
    max_reps: int = 100  # ... or this many calls
    warmup: int = 1
    threads: int | None = None  # CPU threads; default: torch's current setting
    flush_l2: bool = True
    # guards
    memory: bool = True  # measure peak memory
    mem_budget_gb: float | None = None  # default: mem_budget_fraction of free memory
    mem_budget_fraction: float = 0.6
    job_timeout_s: float = 900.0  # a job running longer is stopped: skipped (time budget)
    interpreter_max_seq: int = 256  # Triton interpreter on the CPU: larger n is skipped...
    allow_slow: bool = False  # ... unless allowed
    isolate: bool | str = "auto"  # child process per job: auto = yes
    tunables: dict = field(default_factory=dict)

    # ------------------------------------------------------------------
    def resolved(self) -> BenchConfig:
        """A copy with auto fields filled in and every field validated."""
        c = dataclasses.replace(self)
        if c.device not in DEVICES:
            raise ValueError(f"device={c.device!r}: unknown; choose one of: {', '.join(DEVICES)}")
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        dt = DTYPE_ALIASES.get(str(c.dtype), str(c.dtype))
        if dt == "auto":
            dt = "bf16" if c.device == "cuda" else "fp32"
        if dt not in DTYPES:
            raise ValueError(f"dtype={c.dtype!r}: unknown; choose one of: auto, {', '.join(DTYPES)}")
        c.dtype = dt
        if c.mode not in MODES:
            raise ValueError(f"mode={c.mode!r}: unknown; choose one of: {', '.join(MODES)}")
        if c.seq_len is None:
            c.seq_len = 16384 if c.device == "cuda" else 4096
        for name in ("seq_len", "batch", "heads", "head_dim"):
            val = getattr(c, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}={val!r}: must be an int >= 1")
        if isinstance(c.dilation, list):
            c.dilation = tuple(c.dilation)
        c.global_tokens = tuple(c.global_tokens or ())
        get_impl(c.impl)  # unknown impl -> ValueError naming the choices
        self_pattern = c.pattern()
        self_pattern.validate(c.seq_len, c.heads)
        return c

    def pattern(self) -> Pattern:
        return Pattern(self.window, self.dilation, self.causal, self.global_tokens)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[DTYPE_ALIASES.get(self.dtype, self.dtype)]

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        """Build from a mapping (e.g. a Hydra config), ignoring keys it does not know."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("dilation", "global_tokens"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        if isinstance(kw.get("dilation"), tuple) and len(kw["dilation"]) == 1:
            kw["dilation"] = kw["dilation"][0]
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dilation"] = list(d["dilation"]) if isinstance(d["dilation"], tuple) else d["dilation"]
        d["global_tokens"] = list(d["global_tokens"])
        return d


# ---------------------------------------------------------------------- environment
def _versions() -> dict:
    out = {"torch_version": torch.__version__, "triton_version": "", "cupy_version": ""}
    from importlib.metadata import PackageNotFoundError, version

    for key, dists in (("triton_version", ("triton",)), ("cupy_version", ("cupy", "cupy-cuda12x", "cupy-cuda13x"))):
        for dist in dists:
            with contextlib.suppress(PackageNotFoundError):
                out[key] = version(dist)
                break
    return out


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() if r.returncode == 0 else ""
    except Exception:
        return ""


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with contextlib.suppress(Exception):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def _base_row(c: BenchConfig) -> dict:
    p = c.pattern()
    d = c.dilation
    return {
        **dict.fromkeys(COLUMNS),  # measured fields stay None (an empty cell) unless measured
        "study": c.study,
        "impl": c.impl,
        "pattern": p.describe(),
        "window": c.window,
        "dilation": "/".join(map(str, d)) if isinstance(d, tuple) else str(d),
        "causal": bool(c.causal),
        "global_tokens": len(p.global_tokens),
        "global_positions": " ".join(map(str, p.global_tokens[:16])) + (" ..." if len(p.global_tokens) > 16 else ""),
        "batch": c.batch,
        "heads": c.heads,
        "seq_len": c.seq_len,
        "head_dim": c.head_dim,
        "dtype": c.dtype,
        "device": c.device,
        "device_name": device_name(c.device),
        "mode": c.mode,
        "status": "",
        "reason": "",
        "tunables": json.dumps(c.tunables, sort_keys=True) if c.tunables else "",
        "threads": torch.get_num_threads() if c.threads is None else c.threads,
        **_versions(),
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def config_key(row: dict) -> tuple:
    """What identifies a configuration (for ``resume``): the measured case, not its outcome."""
    keys = ("impl", "window", "dilation", "causal", "global_positions", "batch", "heads", "seq_len", "head_dim")
    keys += ("dtype", "device", "mode")
    out = []
    for k in keys:
        v = row.get(k, "")
        if k == "causal":
            v = str(v).strip().lower() in ("true", "1")
        elif k in ("window", "batch", "heads", "seq_len", "head_dim"):
            v = int(float(v))
        else:
            v = str(v)
        out.append(v)
    return tuple(out)


# ---------------------------------------------------------------------- memory helpers
def _free_memory_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    with contextlib.suppress(Exception):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def memory_budget(c: BenchConfig) -> int:
    if c.mem_budget_gb is not None:
        return int(c.mem_budget_gb * 2**30)
    return int(_free_memory_bytes(c.device) * c.mem_budget_fraction)


def estimate_memory(c: BenchConfig) -> float | None:
    """Bytes the call will need beyond its inputs (None: the implementation gives no estimate)."""
    im = get_impl(c.impl)
    if im.memory is None:
        return None
    esize = torch.empty(0, dtype=c.torch_dtype()).element_size()
    backward = c.mode != "fwd"
    est = float(im.memory(c.batch, c.heads, c.seq_len, c.head_dim, esize, c.pattern(), backward))
    inputs = 3 * c.batch * c.heads * c.seq_len * c.head_dim * esize * (3 if backward else 1)
    return est + inputs


def _status_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{name} not in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------------- the call
class _Case:
    """Inputs and the callable for one configuration."""

    def __init__(self, c: BenchConfig, seq_len: int | None = None):
        self.c = c
        n = seq_len or c.seq_len
        self.n = n
        self.pattern = c.pattern()
        self.dev = torch.device(c.device)
        dtype = c.torch_dtype()
        g = torch.Generator(device="cpu").manual_seed(c.seed)
        shape = (c.batch, c.heads, n, c.head_dim)
        # seeded normal inputs (never zeros), made on the CPU so every device sees the same numbers
        self.q, self.k, self.v = (torch.randn(shape, generator=g).to(self.dev, dtype) for _ in range(3))
        self.dout = torch.randn(shape, generator=g).to(self.dev, dtype)
        self.grad = c.mode != "fwd"
        if self.grad:
            for t in (self.q, self.k, self.v):
                t.requires_grad_(True)
        im = get_impl(c.impl)
        self.fn = im.fn
        self.scale = default_scale(c.head_dim)

    def forward(self) -> torch.Tensor:
        return self.fn(self.q, self.k, self.v, self.pattern, self.scale)

    def zero_grad(self) -> None:
        for t in (self.q, self.k, self.v):
            t.grad = None

    def runner(self) -> tuple[Callable[[], object], Callable[[], None]]:
        """(timed function, untimed set-up run before each timed call)."""
        mode = self.c.mode
        if mode == "fwd":

            def fwd():
                with torch.no_grad():
                    return self.forward()

            return fwd, lambda: None
        if mode == "fwd_bwd":

            def fwd_bwd():
                out = self.forward()
                out.backward(self.dout)

            return fwd_bwd, self.zero_grad
        # bwd: the forward graph is built outside the timed region and reused
        state = {}

        def setup():
            self.zero_grad()
            if "out" not in state:
                state["out"] = self.forward()

        def bwd():
            state["out"].backward(self.dout, retain_graph=True)

        return bwd, setup


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _verify(c: BenchConfig) -> dict:
    """Compare with the float64 reference. Returns error fields; raises _Wrong."""
    case = _Case(c)
    _sync(case.dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = case.forward()  # the process's first call: compilation and autotuning land here
    _sync(case.dev)
    first_ms = (time.perf_counter() - t0) * 1e3
    if not torch.isfinite(out).all():
        raise _Wrong("non-finite values in the output", {"verified": "exact"})
    B, H, n, D = case.q.shape
    dense_bytes = B * H * n * n * 8 * 3
    if dense_bytes <= c.exact_verify_bytes:
        ref = reference(case.q.detach(), case.k.detach(), case.v.detach(), case.pattern)
        got = out.double()
        how = "exact"
    else:
        gen = torch.Generator().manual_seed(c.seed + 1)
        picks = set(range(min(4, n))) | set(range(max(0, n - 4), n)) | set(case.pattern.global_tokens[:8])
        picks |= set(torch.randint(0, n, (c.verify_rows,), generator=gen).tolist())
        rows = sorted(picks)
        ref = reference_rows(case.q.detach(), case.k.detach(), case.v.detach(), case.pattern, rows)
        got = out[:, :, rows].double()
        how = f"rows ({len(rows)})"
    diff = (got - ref.to(got.device)).abs()
    res = {
        "first_call_ms": first_ms,
        "verified": how,
        "max_abs_err": diff.max().item(),
        "mean_abs_err": diff.mean().item(),
        "tol": TOL[c.dtype],
    }
    if res["max_abs_err"] > res["tol"]:
        raise _Wrong(f"max abs error {res['max_abs_err']:.3g} > tol {res['tol']:.3g} ({how})", res)
    del out, ref, got, diff, case
    if c.mode != "fwd":
        res.update(_verify_grad(c))
    return res


def _verify_grad(c: BenchConfig) -> dict:
    n = min(c.seq_len, c.grad_check_seq_len)
    p = c.pattern()
    if p.global_tokens and p.global_tokens[-1] >= n:  # keep the globals that fit, and one near the end
        keep = [g for g in p.global_tokens if g < n] or [n - 1]
        c = dataclasses.replace(c, global_tokens=tuple(keep))
    case = _Case(dataclasses.replace(c, seq_len=n), seq_len=n)
    out = case.forward()
    grads = torch.autograd.grad(out, (case.q, case.k, case.v), case.dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (case.q, case.k, case.v))
    ref = reference(q64, k64, v64, case.pattern)
    want = torch.autograd.grad(ref, (q64, k64, v64), case.dout.double())
    err = max((a.double() - b.to(a.device)).abs().max().item() for a, b in zip(grads, want))
    res = {"grad_max_abs_err": err}
    if not math.isfinite(err) or err > GRAD_TOL[c.dtype]:
        raise _Wrong(f"gradient max abs error {err:.3g} > tol {GRAD_TOL[c.dtype]:.3g} (n={n})", res)
    return res


class _Wrong(Exception):
    def __init__(self, msg: str, fields: dict):
        super().__init__(msg)
        self.fields = fields


def _time(c: BenchConfig) -> dict:
    case = _Case(c)
    fn, setup = case.runner()
    dev = case.dev
    setup()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(c.warmup):
        setup()
        fn()
    _sync(dev)
    times: list[float] = []
    flush = None
    if dev.type == "cuda" and c.flush_l2:
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=dev)  # larger than any L2
    start_all = time.perf_counter()
    while len(times) < c.max_reps:
        setup()
        if dev.type == "cuda":
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
        if len(times) >= c.min_reps and time.perf_counter() - start_all > c.time_budget_s:
            break
    qs = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "time_ms_median": statistics.median(times),
        "time_ms_iqr": qs[2] - qs[0],
        "time_ms_min": min(times),
        "first_call_ms": first_ms,
        "n_timed": len(times),
    }


def _peak_memory(c: BenchConfig, warm: bool = False) -> dict:
    case = _Case(c)
    fn, setup = case.runner()
    dev = case.dev
    if not warm:
        setup()
        fn()  # compile / autotune / allocator warm-up outside the measured call
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
    if not _reset_rss_peak():
        return {"peak_mem_bytes": float("nan")}
    before = _status_field("VmRSS")
    result = fn()
    peak = _status_field("VmHWM")
    del result
    return {"peak_mem_bytes": int(max(0, peak - before))}


def _guards(c: BenchConfig) -> tuple[str, str, float | None] | None:
    """(status, reason, estimate) when the job must not run; None when it may."""
    im = get_impl(c.impl)
    why = im.unavailable_reason()
    if why:
        return "skipped", f"unavailable: {why}", None
    reasons = im.not_supported_reasons(c.pattern(), device=c.device, dtype=c.torch_dtype(), backward=c.mode != "fwd")
    if reasons:
        return "skipped", "unsupported: " + "; ".join(reasons), None
    if im.check is not None:
        probe_q = torch.empty(c.batch, c.heads, c.seq_len, c.head_dim, dtype=c.torch_dtype(), device="meta")
        probe_q.requires_grad_(c.mode != "fwd")
        extra = im.check(probe_q, c.pattern())
        if extra:
            return "skipped", "unsupported: " + "; ".join(extra), None
    est = estimate_memory(c)
    budget = memory_budget(c)
    if est is not None and est > budget:
        return (
            "skipped",
            f"over the memory budget: needs ~{est / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB",
            est,
        )
    if getattr(im, "interpreted_on_cpu", False) and c.device == "cpu" and not c.allow_slow:
        if c.seq_len > c.interpreter_max_seq:
            return (
                "skipped",
                f"over the time budget: Triton runs in its interpreter on the CPU; seq_len > "
                f"{c.interpreter_max_seq} is skipped unless allow_slow=true",
                est,
            )
    return None


def _measure_here(c: BenchConfig) -> dict:
    """Measure in this process (no isolation). Never raises for a failing implementation."""
    row = _base_row(c)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    p = c.pattern()
    fwd_flops = 4.0 * c.head_dim * p.pairs(c.seq_len, c.heads) * c.batch
    row["flops"] = fwd_flops * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[c.mode]
    blocked = _guards(c)
    if blocked:
        row["status"], row["reason"], row["mem_estimate_bytes"] = blocked
        return row
    row["mem_estimate_bytes"] = estimate_memory(c)
    torch.manual_seed(c.seed)
    try:
        if c.verify:
            row.update(_verify(c))
        else:
            row["verified"] = "no"
        row["setup_ms"] = _setup_ms(c.impl)  # e.g. FlexAttention's block mask, built once per shape
        _trim()
        timing = _time(c)
        if c.verify:  # the verification made the first call; keep its time
            timing.pop("first_call_ms")
        row.update(timing)
        _trim()
        if c.memory:
            row.update(_peak_memory(c, warm=True))  # the timing pass compiled and warmed it up
        row["tflops"] = row["flops"] / (row["time_ms_median"] * 1e-3) / 1e12
        row["status"] = "ok"
        tun = _impl_config(c.impl)
        if tun:
            row["tunables"] = json.dumps(tun, sort_keys=True)
    except _Wrong as e:
        row.update(e.fields)
        row["status"], row["reason"] = "wrong", str(e)
    except torch.OutOfMemoryError as e:
        row["status"], row["reason"] = "oom", f"out of memory: {str(e).splitlines()[0][:300]}"
    except MemoryError as e:
        row["status"], row["reason"] = "oom", f"out of memory (MemoryError) {e}"[:300]
    except UnsupportedError as e:
        row["status"], row["reason"] = "skipped", "unsupported: " + "; ".join(e.reasons)
    except Exception as e:  # one failure is one row
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
        if "out of memory" in msg.lower():
            row["status"], row["reason"] = "oom", msg
        else:
            row["status"], row["reason"] = "error", msg
            row["traceback"] = traceback.format_exc(limit=6)
    return row


def _setup_ms(name: str) -> float | None:
    """Time an implementation spent on per-shape set-up in its last call (cached
    afterwards, so the timed calls exclude it), where it reports one."""
    mod = sys.modules.get(get_impl(name).module)
    timing = getattr(mod, "last_timing", None)
    if isinstance(timing, dict) and "block_mask_ms" in timing:
        return float(timing["block_mask_ms"])
    return None


def _impl_config(name: str) -> dict:
    """The configuration an implementation chose in its last call (autotuned block sizes)."""
    im = get_impl(name)
    mod = sys.modules.get(im.module)
    getter = getattr(mod, "last_config", None)
    if callable(getter):
        with contextlib.suppress(Exception):
            return dict(getter() or {})
    return dict(im.tunables)


def _isolated(c: BenchConfig) -> bool:
    return c.isolate is True or str(c.isolate).lower() in ("auto", "true", "1", "yes")


def measure(config: BenchConfig) -> dict:
    """Verify, time and profile one configuration; returns one result row (a dict with
    the keys of :data:`COLUMNS`). Never raises for a failing implementation: the
    failure is the row's status. Raises ``ValueError`` for an invalid configuration."""
    c = config.resolved()
    if not _isolated(c):
        return _measure_here(c)
    return _measure_child(c)


def _measure_child(c: BenchConfig) -> dict:
    env = dict(os.environ)
    # Large allocations through mmap, returned at free: the resident-set peak then
    # counts what the call allocated, not what glibc kept from earlier passes.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if c.threads is not None:
        env["OMP_NUM_THREADS"] = str(c.threads)
    payload = json.dumps(c.to_dict())
    try:
        r = subprocess.run(
            [sys.executable, "-m", "attnbench._worker"],
            input=payload,
            capture_output=True,
            text=True,
            env=env,
            timeout=c.job_timeout_s,
        )
    except subprocess.TimeoutExpired:
        row = _base_row(c)
        row["status"] = "skipped"
        row["reason"] = f"over the time budget: stopped after job_timeout_s={c.job_timeout_s:g} s"
        return row
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("ATTNBENCH_ROW "):
            return json.loads(line[len("ATTNBENCH_ROW ") :])
    row = _base_row(c)
    tail = (r.stderr or "").strip().splitlines()[-3:]
    if r.returncode in (-9, 137):
        row["status"] = "oom"
        row["reason"] = "killed by the operating system (SIGKILL), most likely out of memory"
    else:
        row["status"] = "error"
        row["reason"] = f"worker exited with code {r.returncode}: " + " | ".join(tail)[:500]
    return row


# ---------------------------------------------------------------------- results table
def results_path(c: BenchConfig) -> Path:
    return Path(c.results_dir) / f"{c.study}.csv"


def append_row(path: str | Path, row: dict) -> None:
    """Append one row and flush it to disk at once. Safe with several writers on one
    machine (an exclusive lock around header check and append)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            first = f.readline()
            if not first:
                header = COLUMNS
                w = csv.writer(f)
                w.writerow(header)
            else:
                header = next(csv.reader([first]))
                missing = [k for k in COLUMNS if k not in header]
                if missing:
                    raise ValueError(
                        f"{path}: its header lacks columns {missing}; it was written by another version. "
                        f"Use another study= name or move the file away."
                    )
            f.seek(0, os.SEEK_END)
            csv.DictWriter(f, fieldnames=header, extrasaction="ignore").writerow(
                {k: _fmt(row.get(k, "")) for k in header}
            )
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fmt(v: object) -> object:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------- row files (one per job)
ROWS_SUFFIX = ".rows"


def rows_dir(c: BenchConfig) -> Path:
    """Where a sweep in row-file mode writes: ``<results_dir>/<study>.rows/``, one file per row."""
    return Path(c.results_dir) / f"{c.study}{ROWS_SUFFIX}"


def row_file_name(row: dict) -> str:
    """``<host>-<pid>-<hash of study and configuration>.csv``: unique per writer and configuration,
    so concurrent jobs on any number of machines never write the same file."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", str(row.get("host") or socket.gethostname()))
    digest = hashlib.sha1(repr((str(row.get("study", "")), *config_key(row))).encode()).hexdigest()[:12]
    return f"{host}-{os.getpid()}-{digest}.csv"


def write_row_file(directory: str | Path, row: dict) -> Path:
    """Write one row as its own small CSV file (the header of :data:`COLUMNS` and the row),
    atomically: a hidden temporary name, flushed to disk, then renamed into place. Needs no
    lock, so it is safe with concurrent writers on a shared (NFS) filesystem, where
    ``fcntl`` locks are not to be relied on. Returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / row_file_name(row)
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return final


def row_file_paths(directory: str | Path) -> list[Path]:
    """The finished row files in ``directory`` (temporary files of writers still at work excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".csv" and not p.name.startswith("."))


def read_row_files(directory: str | Path) -> list[dict]:
    """Every row of the row files in ``directory``."""
    return [r for p in row_file_paths(directory) for r in read_rows(p)]


def row_files_enabled(row_files: bool | str) -> bool:
    """Whether a sweep's ``row_files`` setting (true, false or auto) means row files here."""
    v = str(row_files).strip().lower()
    if v == "auto":  # inside a job started by submitit (local or SLURM)
        return bool(os.environ.get("SUBMITIT_EXECUTOR"))
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(f"row_files={row_files!r}: unknown; choose one of: auto, true, false")


def format_rows(rows: Sequence[dict]) -> str:
    """A readable table of result rows."""
    cols = ["impl", "pattern", "seq_len", "dtype", "mode", "status", "time_ms_median", "peak_mem_bytes", "tflops"]
    cells = []
    for r in rows:
        line = []
        for k in cols:
            v = r.get(k, "")
            if v is None or (isinstance(v, float) and math.isnan(v)):
                v = ""
            if k == "peak_mem_bytes" and v not in ("", None) and not (isinstance(v, float) and math.isnan(v)):
                v = _human_bytes(float(v))
            elif k == "time_ms_median" and v not in ("", None):
                v = f"{float(v):.3f}"
            elif k == "tflops" and v not in ("", None):
                v = f"{float(v):.4f}"
            line.append(str(v))
        cells.append(line)
    heads = ["impl", "pattern", "n", "dtype", "mode", "status", "median ms", "peak mem", "TFLOP/s"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    for r, line in zip(rows, cells):
        out.append("  ".join(x.ljust(w) for x, w in zip(line, widths)))
        if r.get("status") not in ("ok", None) and r.get("reason"):
            out.append("    -> " + str(r["reason"])[:200])
    return "\n".join(out)


def _human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def sweep(
    configs: Iterable[BenchConfig],
    *,
    resume: bool = False,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    history: dict | None = None,
    row_files: bool | str = False,
) -> list[dict]:
    """Measure every configuration, appending each row to ``results/<study>.csv`` as
    soon as it is measured. With ``resume``, configurations already in the table or in
    its row files are skipped. A failing configuration is a row, never the end of the sweep.
    ``history`` carries the predictive time guard's memory across calls.

    With ``row_files`` (``True``, or ``"auto"``: inside a submitit job) each row goes to
    its own file in ``results/<study>.rows/`` instead (see :func:`write_row_file`), for
    many jobs on many machines; ``python -m attnbench.merge <study>`` merges them into the table."""
    configs = [c.resolved() for c in configs]  # every config is validated before anything runs
    use_row_files = row_files_enabled(row_files)
    done: dict[Path, set] = {}
    todo = []
    for c in configs:
        path = results_path(c)
        if resume:
            if path not in done:
                done[path] = {config_key(r) for r in read_rows(path) + read_row_files(rows_dir(c))}
            if config_key(_base_row(c)) in done[path]:
                continue
        todo.append(c)
    skipped = len(configs) - len(todo)
    rows = []
    bar = None
    if progress and len(todo) > 1:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="attnbench", unit="job", file=sys.stderr)
    if skipped:
        print(f"resume: {skipped} configuration(s) already in the results table, skipped", file=sys.stderr)
    history = {} if history is None else history  # series key -> rows, for the predictive guard
    for c in todo:
        if bar is not None:
            bar.set_postfix_str(f"{c.impl} n={c.seq_len} {c.dtype} {c.mode}")
        series = history.setdefault(_series_key(c), [])
        stop = _predict_stop(c, series)
        if stop:
            row = _base_row(c)
            row["status"], row["reason"] = "skipped", stop
        else:
            row = measure(c)
        series.append(row)
        row.pop("traceback", None)
        if use_row_files:
            write_row_file(rows_dir(c), row)
        else:
            append_row(results_path(c), row)
        rows.append(row)
        if on_row:
            on_row(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def _series_key(c: BenchConfig) -> tuple:
    return (c.impl, c.pattern(), c.dtype, c.mode, c.device, c.batch, c.heads, c.head_dim, c.study)


def _predict_stop(c: BenchConfig, series: list[dict]) -> str | None:
    """Within one series (same impl, pattern, dtype, mode, shape but n), do not start
    what cannot finish: after an OOM at a smaller n, or when the measured times
    predict a job longer than ``job_timeout_s``."""
    smaller = [r for r in series if int(r["seq_len"]) < c.seq_len]
    for r in smaller:
        if r["status"] == "oom":
            return f"over the memory budget: ran out of memory at seq_len={r['seq_len']}"
        if r["status"] == "skipped" and str(r["reason"]).startswith("over the time budget"):
            return f"over the time budget: already over it at seq_len={r['seq_len']}"
    ok = sorted((int(r["seq_len"]), float(r["time_ms_median"])) for r in smaller if r["status"] == "ok")
    if not ok:
        return None
    (n1, t1) = ok[-1]
    e = 2.0
    if len(ok) >= 2 and ok[-2][0] < n1 and ok[-2][1] > 0:
        n0, t0 = ok[-2]
        e = min(2.5, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    t_pred = t1 * (c.seq_len / n1) ** e / 1e3  # seconds per call
    calls = 4 + c.warmup + c.min_reps  # verify, first call, warm-up, timed calls, memory pass
    job = t_pred * calls
    if job > c.job_timeout_s:
        return (
            f"over the time budget: predicted ~{job:.0f} s for this job (~{t_pred:.1f} s a call, "
            f"from n={n1}, exponent {e:.1f}) > job_timeout_s={c.job_timeout_s:g}"
        )
    return None


def expand(base: BenchConfig, grid: dict[str, Sequence]) -> list[BenchConfig]:
    """The cartesian product of ``grid`` (field -> values) over ``base``."""
    import itertools

    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        out.append(dataclasses.replace(base, **dict(zip(keys, values))))
    return out
