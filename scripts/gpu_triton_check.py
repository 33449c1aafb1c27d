"""Check the fused Triton implementation on a CUDA GPU, then time it against FlexAttention.

    python scripts/gpu_triton_check.py OUT.csv [BUDGET_SECONDS]

1. Correctness, per dtype (fp16, bf16, fp32): forward and the gradients of q, k, v
   against the float64 reference over several patterns (window, window 0, window >= n,
   dilation, per-head dilation, global tokens, causal), with the test suite's tolerance
   (twice the error of dense attention in the same dtype, plus a small atol). One
   longer case (n = 4096) goes through the autotuned kernels.
2. Timing, bf16, B=1, H=16, n=32768, w=512, D in (64, 128), dilation 1 and 2: forward
   and forward+backward, median of triton.testing.do_bench, for "triton" and for
   FlexAttention (compiled; its BlockMask built once, outside the timing). Useful
   TFLOP/s = 4 * D * pattern.pairs(n, H) * B / time (forward), 3.5x that for
   forward+backward. Peak extra memory = max_memory_allocated during one call minus
   memory_allocated before it. Sampled rows of each output are checked against the
   reference first.

Every case runs under try/except: a failure prints its traceback and becomes a row
with status "error"; the run goes on. Cases left when the time budget (default 170 s)
is spent are recorded as "skipped". The table is printed and written as CSV to OUT.csv.
"""

from __future__ import annotations

import csv
import sys
import time
import traceback

import torch

import attnbench
from attnbench import Pattern, reference, reference_rows

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FIELDS = ["section", "impl", "dtype", "B", "H", "n", "D", "pattern", "mode", "ms", "tflops", "peak_mb", "max_err",
          "tol", "status", "note"]  # fmt: skip

T0 = time.time()
ROWS: list[dict] = []


def elapsed() -> float:
    return time.time() - T0


def record(**kw) -> None:
    row = {f: kw.get(f, "") for f in FIELDS}
    ROWS.append(row)
    shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v != ""}
    print(f"[{elapsed():6.1f}s] " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def rand(B: int, H: int, n: int, D: int, dtype: torch.dtype, seed: int, grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(B, H, n, D, device="cuda", dtype=torch.float32, generator=g).to(dtype).requires_grad_(grad)
        for _ in range(3)
    ]


# ---------------------------------------------------------------------------- correctness
def _errors(impl: str, q, k, v, p: Pattern, dout: torch.Tensor) -> list[float]:
    """max |impl - reference| for out, dq, dk, dv."""
    out = attnbench.attention(q, k, v, p, impl=impl)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(q.dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, p)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout)
    errs = [(out.double() - ref).abs().max().item()]
    errs += [(a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads)]
    finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
    return errs if finite else [float("inf")] * 4


def correctness(budget: float) -> None:
    cases = [
        (2, 4, 200, 64, Pattern(16)),
        (2, 4, 200, 64, Pattern(0)),
        (1, 4, 130, 64, Pattern(400)),
        (2, 4, 200, 64, Pattern(16, 2)),
        (1, 4, 211, 64, Pattern(10, 3)),
        (1, 4, 200, 64, Pattern(8, (1, 1, 2, 3))),
        (2, 4, 200, 64, Pattern(16, global_tokens=(0, 77, 199))),
        (1, 4, 200, 64, Pattern(4, global_tokens=tuple(range(0, 200, 7)))),
        (1, 4, 200, 64, Pattern(16, causal=True)),
        (1, 4, 203, 64, Pattern(8, (1, 2, 3, 1), True, (0, 100))),
        (1, 2, 150, 40, Pattern(12, 2, True, (5, 149))),  # head_dim padded to 64
    ]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for i, (B, H, n, D, p) in enumerate(cases):
            if D != 64 and dtype != torch.bfloat16:
                continue  # other head dims once: each is another compile
            common = dict(section="correctness", impl="triton", dtype=DTYPE_NAME[dtype], B=B, H=H, n=n, D=D,
                          pattern=p.describe(), mode="fwd+bwd")  # fmt: skip
            if elapsed() > budget:
                record(**common, status="skipped", note="time budget")
                continue
            try:
                q, k, v = rand(B, H, n, D, dtype, seed=i, grad=True)
                g = torch.Generator(device="cuda").manual_seed(100 + i)
                dout = torch.randn(B, H, n, D, device="cuda", dtype=torch.float64, generator=g)
                errs = _errors("triton", q, k, v, p, dout)
                base = _errors("naive", q, k, v, p, dout)
                tols = [2 * b + ATOL[dtype] for b in base]
                ok = all(e <= t for e, t in zip(errs, tols))
                worst = max(range(4), key=lambda j: errs[j] / tols[j])
                record(**common, max_err=max(errs), tol=tols[worst], status="pass" if ok else "FAIL",
                       note="out/dq/dk/dv err " + "/".join(f"{e:.2e}" for e in errs))  # fmt: skip
            except Exception as e:
                traceback.print_exc()
                record(**common, status="error", note=f"{type(e).__name__}: {e}"[:300])


def correctness_tuned(budget: float) -> None:
    """n >= AUTOTUNE_MIN_SEQ: the autotuned kernels, at head_dim 128 (the small cases
    cover 64 and 40). Same tuning key as the timed D=128, w=512 cases: tuned once."""
    B, H, n, D, dtype = 1, 2, 4096, 128, torch.bfloat16
    p = Pattern(512, 2, False, (0, 2047))
    common = dict(section="correctness", impl="triton", dtype="bf16", B=B, H=H, n=n, D=D, pattern=p.describe(),
                  mode="fwd+bwd")  # fmt: skip
    if elapsed() > budget:
        record(**common, status="skipped", note="time budget")
        return
    try:
        q, k, v = rand(B, H, n, D, dtype, seed=7, grad=True)
        dout = torch.randn(B, H, n, D, device="cuda", dtype=torch.float64)
        errs = _errors("triton", q, k, v, p, dout)
        base = _errors("naive", q, k, v, p, dout)
        tols = [2 * b + ATOL[dtype] for b in base]
        ok = all(e <= t for e, t in zip(errs, tols))
        cfg = _triton_config()
        record(**common, max_err=max(errs), tol=max(tols), status="pass" if ok else "FAIL",
               note="out/dq/dk/dv err " + "/".join(f"{e:.2e}" for e in errs) + f"; {cfg}")  # fmt: skip
    except Exception as e:
        traceback.print_exc()
        record(**common, status="error", note=f"{type(e).__name__}: {e}"[:300])


# ---------------------------------------------------------------------------- timing
def _triton_config() -> str:
    try:
        from impls.triton_fused import last_config

        c = last_config()
        fwd = (
            f"fwd BLOCK_M={c.get('BLOCK_M')} BLOCK_N={c.get('BLOCK_N')}"
            f" warps={c.get('num_warps')} stages={c.get('num_stages')}"
        )
        bwd = c.get("backward")
        if bwd:
            kv, qq = bwd.get("kv", {}), bwd.get("q", {})
            fwd += (
                f"; bwd kv {kv.get('BLOCK_M')}x{kv.get('BLOCK_N')}/w{kv.get('num_warps')}/s{kv.get('num_stages')}"
                f" q {qq.get('BLOCK_M')}x{qq.get('BLOCK_N')}/w{qq.get('num_warps')}/s{qq.get('num_stages')}"
            )
        return fwd + f" autotuned={c.get('autotuned')}"
    except Exception as e:  # the table matters more than this note
        return f"config unknown ({type(e).__name__})"


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


_FLEX: dict = {}


def _flex_setup(p: Pattern, n: int):
    """FlexAttention compiled once per head_dim: the mask reads the pattern from tensors
    captured by one mask function, so dilation 1 and 2 share the compiled kernels (the
    BlockMask, built here once per pattern, carries the sparsity)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not _FLEX:
        d_t = torch.ones((), dtype=torch.int32, device="cuda")
        lo_t = torch.zeros((), dtype=torch.int32, device="cuda")
        hi_t = torch.zeros((), dtype=torch.int32, device="cuda")

        def mask_mod(b, h, q_idx, kv_idx):
            diff = kv_idx - q_idx
            return (diff % d_t == 0) & (diff >= lo_t * d_t) & (diff <= hi_t * d_t)

        _FLEX.update(d=d_t, lo=lo_t, hi=hi_t, mask_mod=mask_mod, fn=torch.compile(flex_attention))
    lo, hi = p.offset_range
    _FLEX["d"].fill_(p.dilation)
    _FLEX["lo"].fill_(lo)
    _FLEX["hi"].fill_(hi)
    block_mask = create_block_mask(_FLEX["mask_mod"], B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
    return _FLEX["fn"], block_mask


def _spot_check(out: torch.Tensor, q, k, v, p: Pattern, n: int) -> float:
    rows = sorted({0, 1, 2, 255, 256, 257, n // 2, n // 2 + 1, n - 2, n - 1, 12345 % n})
    ref = reference_rows(q.detach(), k.detach(), v.detach(), p, rows)
    return (out.detach()[:, :, rows].double() - ref).abs().max().item()


def _measure(common: dict, name: str, fwd, q, k, v, dout, p: Pattern, flops_fwd: float, budget: float) -> None:
    import triton.testing

    n = q.shape[2]
    qd, kd, vd = (t.detach() for t in (q, k, v))  # forward-only timing: no autograd state

    def call_fwd():
        with torch.no_grad():
            return fwd(qd, kd, vd)

    def call_fwd_bwd():
        fwd(q, k, v).backward(dout)

    for mode, call, flops in (("fwd", call_fwd, flops_fwd), ("fwd+bwd", call_fwd_bwd, 3.5 * flops_fwd)):
        row = dict(common, mode=mode)
        if elapsed() > budget:
            record(**row, status="skipped", note="time budget")
            continue
        try:
            out = call()  # compile / autotune outside the timing
            err = _spot_check(out, q, k, v, p, n) if mode == "fwd" else ""
            del out
            ms = triton.testing.do_bench(call, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
            peak = _peak_mb(call)
            note = _triton_config() if name == "triton" else "torch.compile; BlockMask built once per pattern"
            status = "FAIL" if mode == "fwd" and not err <= 0.05 else "pass"
            record(**row, ms=ms, tflops=flops / (ms * 1e-3) / 1e12, peak_mb=peak, max_err=err, status=status,
                   note=note)  # fmt: skip
        except Exception as e:
            traceback.print_exc()
            record(**row, status="error", note=f"{type(e).__name__}: {e}"[:300])
        finally:
            for t in (q, k, v):
                t.grad = None


def _time_case(impl: str, D: int, p: Pattern, budget: float) -> None:
    B, H, n, dtype = 1, 16, 32768, torch.bfloat16
    common = dict(section="timing", impl=impl, dtype="bf16", B=B, H=H, n=n, D=D, pattern=p.describe())
    if elapsed() > budget:
        for mode in ("fwd", "fwd+bwd"):
            record(**common, mode=mode, status="skipped", note="time budget")
        return
    try:
        q, k, v = rand(B, H, n, D, dtype, seed=D, grad=True)
        dout = torch.randn_like(q)
        flops_fwd = 4.0 * D * p.pairs(n, H) * B
        if impl == "triton":

            def fwd(q, k, v):
                return attnbench.attention(q, k, v, p, impl="triton")
        else:
            flex, block_mask = _flex_setup(p, n)

            def fwd(q, k, v):
                return flex(q, k, v, block_mask=block_mask, scale=D**-0.5)
    except Exception as e:
        traceback.print_exc()
        record(**common, status="error", note=f"setup: {type(e).__name__}: {e}"[:300])
        return
    _measure(common, impl, fwd, q, k, v, dout, p, flops_fwd, budget)


def timing(budget: float) -> None:
    """Every triton case first, then FlexAttention's: a spent budget costs the baseline."""
    for impl in ("triton", "flex"):
        for D in (64, 128):
            for p in (Pattern(512), Pattern(512, 2)):
                _time_case(impl, D, p, budget)
                try:
                    torch.cuda.empty_cache()
                except Exception:  # a poisoned context fails every later case anyway
                    pass


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    out_path = sys.argv[1]
    budget = float(sys.argv[2]) if len(sys.argv) > 2 else 170.0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "missing"
    print(f"torch {torch.__version__}, triton {tv}, {torch.cuda.get_device_name()}", flush=True)
    for attr in ("cache_size_limit", "recompile_limit"):  # one FlexAttention compile per mask
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 64)
    try:
        im = attnbench.get_impl("triton")
        why = im.unavailable_reason()
        if why:
            print(f"triton implementation unavailable: {why}")
            record(section="setup", impl="triton", status="error", note=why)
        else:
            # compiles dominate the correctness share of the budget
            correctness(budget * 0.35)
            correctness_tuned(budget * 0.5)
            timing(budget)
    except BaseException as e:  # e.g. a CUDA error that poisons the context: keep the rows so far
        traceback.print_exc()
        record(section="run", status="error", note=f"aborted: {type(e).__name__}: {e}"[:300])
    finally:
        with open(out_path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=FIELDS)
            wr.writeheader()
            wr.writerows(ROWS)
    print()
    print(f"{'section':12s} {'impl':7s} {'dtype':5s} {'D':>4s} {'pattern':22s} {'mode':8s} {'ms':>9s} "
          f"{'TFLOP/s':>8s} {'peak MB':>8s} status")  # fmt: skip
    for r in ROWS:
        ms = f"{r['ms']:.3f}" if isinstance(r["ms"], float) else ""
        tf = f"{r['tflops']:.1f}" if isinstance(r["tflops"], float) else ""
        pk = f"{r['peak_mb']:.1f}" if isinstance(r["peak_mb"], float) else ""
        print(f"{r['section']:12s} {r['impl']:7s} {r['dtype']:5s} {r['D']!s:>4s} {r['pattern']!s:22s} "
              f"{r['mode']:8s} {ms:>9s} {tf:>8s} {pk:>8s} {r['status']}")  # fmt: skip
    fails = sum(r["status"] in ("FAIL", "error") for r in ROWS)
    print(f"\n{len(ROWS)} rows, {fails} failed or errored, {elapsed():.0f}s; CSV written to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
