"""Check and time the ``cupy`` implementation on a CUDA machine.

    python scripts/gpu_cupy_check.py results/cupy_check.csv

1. Correctness: ``attnbench.attention(..., impl="cupy")`` against the float64
   ``attnbench.reference`` for fp32, fp16 and bf16, forward and backward (dQ, dK, dV for
   a random output gradient), over windows, dilation 2 and 3 (n not divisible by d),
   per-head dilation (1, 1, 2, 3), global tokens at the start / middle / end, causal with
   globals and dilation, a band wider than 64 columns and head_dim 80, at n = 97, 257,
   1000. A case passes when every max-abs error is at most twice that of a plain
   PyTorch dense masked attention in the same dtype plus a small atol.
2. Timing at B=1, H=12, D=64, w=512, n=32768 in fp32 and bf16: cupy vs chunked, forward
   and forward+backward (``triton.testing.do_bench``, median), the peak extra memory of
   each (``max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
   allocated before), and agreement with the reference on a few rows.

Every case is guarded: a failure becomes an ERROR row and the script goes on. Rows are
written to the CSV (argv[1]) as they come, and the table is printed at the end.
"""

from __future__ import annotations

import csv
import math
import sys
import time
import traceback

import torch

import attnbench
from attnbench import Pattern

COLUMNS = ["kind", "case", "impl", "dtype", "n", "quantity", "value", "baseline", "limit", "status", "note"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# atol, relative to max(1, max |reference|), added to the 2x-dense-error allowance
ATOL = {"fp32": 2e-5, "fp16": 2e-3, "bf16": 1.6e-2}
CHECK_BUDGET_S = 110.0  # correctness section; the timing section gets the rest
CHECK_SIZES = (97, 257, 1000)
TIME_SHAPE = {"B": 1, "H": 12, "D": 64, "n": 32768, "w": 512}
START = time.perf_counter()


class Table:
    def __init__(self, path: str):
        self.rows: list[dict] = []
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        self.w.writeheader()
        self.f.flush()

    def add(self, **row) -> None:
        row = {c: row.get(c, "") for c in COLUMNS}
        for c in ("value", "baseline", "limit"):
            if isinstance(row[c], float):
                row[c] = f"{row[c]:.3e}" if row[c] and abs(row[c]) < 1e-2 else f"{row[c]:.4g}"
        row["note"] = " ".join(str(row["note"]).split())[:400]
        self.rows.append(row)
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def short_error(e: BaseException) -> str:
    """The exception on one line (a compiler log keeps its first lines)."""
    lines = [line.strip() for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
    return " | ".join(lines)[:400]


def sync() -> None:
    torch.cuda.synchronize()


# ---------------------------------------------------------------- correctness


def dense_masked(q, k, v, pattern: Pattern, scale: float) -> torch.Tensor:
    """Plain PyTorch dense masked attention in the inputs' dtype (the error yardstick)."""
    B, H, n, D = q.shape
    mask = pattern.mask(n, heads=H).to(q.device)  # (H, n, n)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.float().masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


def run_with_grads(fn, q, k, v, go):
    """out and (dq, dk, dv) of fn on fresh leaves, all in float64 for comparison."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(go.to(out.dtype))
    sync()
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def check_patterns(n: int) -> list[tuple[str, Pattern, int]]:
    ends = (0, n // 2, n - 1)
    return [
        ("w32", Pattern(window=32), 64),
        ("w32 d2", Pattern(window=32, dilation=2), 64),
        ("w32 d3", Pattern(window=32, dilation=3), 64),
        ("w32 d(1,1,2,3)", Pattern(window=32, dilation=(1, 1, 2, 3)), 64),
        ("w32 globals start/mid/end", Pattern(window=32, global_tokens=ends), 64),
        ("w32 causal", Pattern(window=32, causal=True), 64),
        (
            "w32 causal d(1,1,2,3) globals",
            Pattern(window=32, causal=True, dilation=(1, 1, 2, 3), global_tokens=ends),
            64,
        ),
        ("w256 d2 global 3 (W>64)", Pattern(window=256, dilation=2, global_tokens=(3,)), 64),
        ("w0 global 0", Pattern(window=0, global_tokens=(0,)), 64),
        ("w32 d2 D=80", Pattern(window=32, dilation=2), 80),
    ]


def check_case(table: Table, n: int, name: str, pattern: Pattern, D: int, dname: str) -> None:
    """One (pattern, n, dtype) case: forward and gradients against the float64 reference."""
    B, H, dtype = 2, 4, DTYPES[dname]
    row = {"kind": "check", "case": f"{name} B{B} H{H} D{D}", "impl": "cupy", "dtype": dname, "n": n}
    if time.perf_counter() - START > CHECK_BUDGET_S:
        table.add(**row, status="SKIPPED", note="time budget of the correctness section spent")
        return
    scale = 1.0 / math.sqrt(D)

    def ref_fn(a, b, c):
        return attnbench.reference(a, b, c, pattern, scale)

    def dense_fn(a, b, c):
        return dense_masked(a, b, c, pattern, scale)

    def cupy_fn(a, b, c):
        return attnbench.attention(a, b, c, pattern, impl="cupy", scale=scale)

    try:
        g = torch.Generator(device="cuda").manual_seed(1000 * n + D)
        q, k, v, go = (torch.randn(B, H, n, D, device="cuda", generator=g).to(dtype) for _ in range(4))
        # the reference sees the same (rounded) inputs, so the error is the kernels' alone
        ref = run_with_grads(ref_fn, q.double(), k.double(), v.double(), go.double())
        base = run_with_grads(dense_fn, q, k, v, go)
        got = run_with_grads(cupy_fn, q, k, v, go)
    except Exception as e:
        table.add(**row, status="ERROR", note=short_error(e))
        return
    for lab, r, b_, c_ in zip(("out", "dq", "dk", "dv"), ref, base, got):
        err = (c_ - r).abs().max().item()  # NaN propagates into err and fails the case
        berr = (b_ - r).abs().max().item()
        limit = 2.0 * berr + ATOL[dname] * max(1.0, r.abs().max().item())
        ok = math.isfinite(err) and err <= limit
        table.add(
            **row,
            quantity=f"maxabs_err_{lab}",
            value=err,
            baseline=berr,
            limit=limit,
            status="PASS" if ok else "FAIL",
            note="baseline = dense masked torch attention in the same dtype",
        )


def correctness(table: Table) -> None:
    for n in CHECK_SIZES:
        for name, pattern, D in check_patterns(n):
            for dname in DTYPES:
                check_case(table, n, name, pattern, D, dname)


# ---------------------------------------------------------------- timing


def bench_ms(fn) -> float:
    try:
        from triton.testing import do_bench
    except Exception:
        do_bench = None
    if do_bench is not None:
        try:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:  # an older triton without return_mode
            return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5]))
    # fallback: CUDA events, median of 20 after 3 warm-ups
    for _ in range(3):
        fn()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        sync()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def peak_extra_mib(fn) -> float:
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def time_impl(table: Table, impl: str, pattern: Pattern, dname: str, qkv, go, rows, ref_rows):
    """Forward and forward+backward time and peak extra memory of one implementation;
    returns its forward output (or None)."""
    q, k, v = qkv
    B, H, n, D = q.shape
    row = {"kind": "time", "case": f"{pattern.describe()} B{B} H{H} D{D}", "impl": impl, "dtype": dname, "n": n}
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in qkv)

    def fwd():
        with torch.no_grad():
            return attnbench.attention(q, k, v, pattern, impl=impl)

    def fwd_bwd():
        out = attnbench.attention(qg, kg, vg, pattern, impl=impl)
        return torch.autograd.grad(out, (qg, kg, vg), go)

    out = None
    for label, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        try:
            if label == "fwd":
                out = fn()
                sync()
                err = (out.index_select(2, rows).double() - ref_rows).abs().max().item()
                table.add(
                    **row,
                    quantity="maxabs_err_vs_reference_rows",
                    value=err,
                    status="INFO",
                    note=f"{rows.numel()} rows vs the float64 reference",
                )
            mib = peak_extra_mib(fn)
            ms = bench_ms(fn)
            table.add(**row, quantity=f"{label}_ms_median", value=ms, status="OK", note="median")
            table.add(
                **row,
                quantity=f"{label}_peak_extra_MiB",
                value=mib,
                status="OK",
                note="max_memory_allocated after reset_peak_memory_stats, minus allocated before",
            )
        except Exception as e:
            table.add(**row, quantity=label, status="ERROR", note=short_error(e))
        finally:
            torch.cuda.empty_cache()
    return out


def timing(table: Table) -> None:
    B, H, D, n, w = (TIME_SHAPE[x] for x in ("B", "H", "D", "n", "w"))
    pattern = Pattern(window=w)
    for dname in ("fp32", "bf16"):
        dtype = DTYPES[dname]
        try:
            rows = torch.tensor(sorted({0, 1, w // 2, w // 2 + 1, n // 2, n - w // 2 - 1, n - 2, n - 1}), device="cuda")
            g = torch.Generator(device="cuda").manual_seed(7)
            q, k, v, go = (torch.randn(B, H, n, D, device="cuda", generator=g).to(dtype) for _ in range(4))
            ref_rows = attnbench.reference_rows(q, k, v, pattern, rows)  # float64 (B, H, R, D)
        except Exception as e:
            table.add(kind="time", case=pattern.describe(), dtype=dname, n=n, status="ERROR", note=short_error(e))
            continue
        outs = {
            impl: time_impl(table, impl, pattern, dname, (q, k, v), go, rows, ref_rows) for impl in ("cupy", "chunked")
        }
        if all(o is not None for o in outs.values()):
            diff = (outs["cupy"].double() - outs["chunked"].double()).abs().max().item()
            table.add(
                kind="time",
                case=pattern.describe(),
                impl="cupy-vs-chunked",
                dtype=dname,
                n=n,
                quantity="maxabs_diff_out",
                value=diff,
                status="INFO",
            )
        del outs, q, k, v, go
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- main


def environment(table: Table) -> bool:
    notes = [f"torch {torch.__version__}"]
    try:
        import cupy

        notes.append(f"cupy {cupy.__version__}")
    except Exception as e:
        notes.append(f"cupy import failed: {short_error(e)}")
    try:
        import triton

        notes.append(f"triton {triton.__version__}")
    except Exception:
        notes.append("no triton: CUDA-event timer")
    if torch.cuda.is_available():
        notes.append(torch.cuda.get_device_name())
    why = attnbench.get_impl("cupy").unavailable_reason()
    table.add(
        kind="env",
        case="environment",
        impl="cupy",
        status="OK" if why is None else "UNAVAILABLE",
        note="; ".join(notes + ([why] if why else [])),
    )
    if why is not None:
        return False
    try:  # first call compiles the kernels (NVRTC): time it and surface compile errors
        t0 = time.perf_counter()
        x = torch.randn(1, 1, 8, 16, device="cuda")
        attnbench.attention(x, x, x, Pattern(window=2), impl="cupy")
        sync()
        table.add(
            kind="env",
            case="first call (compile)",
            impl="cupy",
            quantity="seconds",
            value=time.perf_counter() - t0,
            status="OK",
        )
    except Exception as e:
        table.add(kind="env", case="first call (compile)", impl="cupy", status="ERROR", note=short_error(e))
        traceback.print_exc()
    return True


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "cupy_check.csv"
    table = Table(path)
    try:
        for section in (environment, correctness, timing):
            try:
                if section(table) is False:  # cupy unavailable: nothing to check or time
                    break
            except Exception as e:  # never abort: record and go on
                table.add(kind=section.__name__, case="section", status="ERROR", note=short_error(e))
                traceback.print_exc()
    finally:
        table.close()
    width = {c: max([len(c)] + [len(str(r[c])) for r in table.rows]) for c in COLUMNS if c != "note"}
    print("  ".join(c.ljust(width[c]) for c in width) + "  note")
    for r in table.rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in width) + "  " + r["note"])
    counts: dict[str, int] = {}
    for r in table.rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"\n{path}: {len(table.rows)} rows; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"elapsed {time.perf_counter() - START:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
