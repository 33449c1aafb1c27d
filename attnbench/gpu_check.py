"""One command to verify and measure everything on a CUDA GPU.

    python -m attnbench.gpu_check OUTDIR            # or: scripts/gpu_check.sh OUTDIR
    python -m attnbench.gpu_check OUTDIR --dry-run  # print the plan, touch no GPU
    python -m attnbench.gpu_check OUTDIR --stages targets,tests,scaling --budget 580

Needs only what a GPU machine usually has (torch; triton, cupy, pytest, pandas and
matplotlib where installed); no Hydra, no network. In one run it

1. prints the GPU, driver and library versions;
2. measures the ceilings results are quoted against: the bf16 matrix-multiply rate
   (8192^3) and the device-to-device copy bandwidth;
3. (stage "tests") runs the whole test suite on CUDA (Triton compiled, CuPy enabled),
   as parallel pytest shards: its time is kernel compilation (Triton per head_dim
   and dtype, FlexAttention per shape), which one process would do on one core;
4. (stage "targets", on request) times "triton" against FlexAttention where the
   Triton kernel's targets are set: B=1, H=16, n=32768, window 512, bf16, head_dim
   64 and 128, dilation 1 and 2, forward and forward + backward;
5. (stage "scaling") runs a short scaling study of every available implementation
   over n = 1024 ... 32768 (forward; forward + backward at the largest n),
   Longformer-base shape (heads 12, head_dim 64, window 512), bf16 then fp32;
6. writes the results tables, the figure and a log to OUTDIR as it goes (a run
   stopped early keeps what it measured), a summary at the largest n, and the verdict
   on every performance target it has rows for (verdict.csv: measured, required,
   pass / FAIL / missing).

Timing and memory go through the benchmark engine (attnbench.sweep), as everywhere
else. The run is held to --budget seconds (default 450, for "within 8 minutes").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SEQ_LENS = [1024, 2048, 4096, 8192, 16384, 32768]
#: the whole run, seconds (the issue's "within 8 minutes", with some margin)
BUDGET_S = 450.0
#: kept back from the scaling study for the figure, the summary and a job in flight
RESERVE_S = 30.0
DTYPES = ["bf16", "fp32"]
PATTERNS = {"w512": {}}


class Log:
    """Print and append to OUTDIR/gpu_check.log at once."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, *parts: object) -> None:
        msg = " ".join(str(p) for p in parts)
        print(msg, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def environment(log: Log) -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "host": platform.node(),
    }
    for mod in ("triton", "cupy", "transformers", "flash_attn", "pandas", "matplotlib", "pytest", "hydra"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # absent or broken: say which
            info[mod] = f"not available ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
        with contextlib.suppress(Exception):
            q = "--query-gpu=driver_version,clocks.max.sm,power.limit"
            r = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = r.stdout.strip()
    for k, v in info.items():
        log(f"  {k}: {v}")
    return info


def ceilings(log: Log) -> dict:
    """bf16 matmul TFLOP/s and device-to-device copy GB/s (median of timed repeats)."""
    import torch

    from attnbench.measure import time_fn

    def timed(fn, reps: int) -> float:  # the engine's timing loop, L2 not flushed: these stream far more
        return time_fn(fn, lambda: None, torch.device("cuda"), 3, reps, reps, 0.0, flush_l2=False)["time_ms_median"]

    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: torch.matmul(x, y), 10)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms_copy = timed(lambda: dst.copy_(src), 10)
    gbs = 2 * src.numel() / (ms_copy * 1e-3) / 1e9  # bytes read + written
    x = y = src = dst = None
    torch.cuda.empty_cache()
    log(f"  bf16 matmul 8192^3: {tflops:.0f} TFLOP/s;  device copy: {gbs:.0f} GB/s (read + write)")
    return {"bf16_matmul_tflops": tflops, "copy_gbs": gbs}


def default_shards() -> int:
    """Parallel pytest processes for the test stage: its time goes into compiling
    kernels (Triton, FlexAttention), one CPU core each; half the cores, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


_COUNTS = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)\b")
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?$")


def run_tests(
    outdir: Path, log: Log, limit_s: float, shards: int = 1, targets: tuple[str, ...] = ("tests",), device: str = "cuda"
) -> dict:
    """The test suite on ``device`` as ``shards`` parallel pytest processes (disjoint
    parts, see ATTNBENCH_SHARD in tests/conftest.py), each with its own log and JUnit
    file in OUTDIR; all are stopped at ``limit_s``. Returns the summed counts, the
    failed test ids and one return code (0 only if every shard passed)."""
    env = dict(os.environ, ATTNBENCH_TEST_DEVICE=device, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    # a module that cannot be imported there (a package the GPU machine lacks) is an
    # error in the counts, not the end of the suite
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, "-rfEs", "--tb=short",
           "--continue-on-collection-errors"]  # fmt: skip
    log(f"  $ ATTNBENCH_TEST_DEVICE={device} " + " ".join(cmd[1:]) + (f"  (x {shards} shards)" if shards > 1 else ""))
    t0 = time.time()
    procs = []
    for i in range(shards):
        name = "tests" if shards == 1 else f"tests-{i}"
        env_i = dict(env, ATTNBENCH_SHARD=f"{i}/{shards}") if shards > 1 else env
        f = open(outdir / f"{name}.log", "w")
        # own process group: a timeout also stops the compile workers a shard started
        p = subprocess.Popen([*cmd, "--junitxml", str(outdir / f"{name}.xml")], cwd=ROOT, env=env_i, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        procs.append((name, p, f))
    rcs: list = []
    for _, p, f in procs:
        try:
            rcs.append(p.wait(timeout=max(0.0, t0 + limit_s - time.time())))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rcs.append("timeout")
        f.close()
    counts: dict[str, int] = {}
    failed: list[str] = []
    for name, _, _ in procs:
        lines = (outdir / f"{name}.log").read_text(errors="replace").splitlines()
        failed += [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        final = next((ln for ln in reversed(lines) if _COUNTS.search(ln) and " in " in ln), "")  # "3 passed in 2.1s"
        if final:
            for n, what in _COUNTS.findall(final):
                what = "errors" if what.startswith("error") else what
                counts[what] = counts.get(what, 0) + int(n)
        else:  # stopped before its summary: count its progress marks ("..s.F  [ 40%]")
            marks = "".join(m.group(1) for ln in lines if (m := _PROGRESS.match(ln)))
            for ch, what in ((".", "passed"), ("F", "failed"), ("E", "errors"), ("s", "skipped")):
                if marks.count(ch):
                    counts[what] = counts.get(what, 0) + marks.count(ch)
    rc = 0 if all(r == 0 for r in rcs) else next(r for r in rcs if r != 0)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line"
    if "timeout" in rcs:
        summary += " (so far: a shard was stopped at the time limit)"
    log(
        f"  tests: exit {rc} after {time.time() - t0:.0f} s: {summary}"
        + (f"  (shard exits {rcs})" if shards > 1 else "")
    )
    for ln in failed:
        log("    " + ln[:300])
    return {"rc": rc, "counts": counts, "failed": failed, "summary": summary}


def plan(quick: bool = False) -> list:
    """The scaling configurations, in the order they run."""
    from attnbench.config import BenchConfig

    lens = SEQ_LENS[::2] if quick else SEQ_LENS
    base = BenchConfig(
        device="cuda",
        heads=12,
        head_dim=64,
        window=512,
        study="gpu-scaling",
        isolate=False,  # one process: CUDA start-up per job would cost more than the jobs
        time_budget_s=0.3,
        min_reps=3,
        max_reps=50,
        warmup=1,
        job_timeout_s=20,  # predictive guard: a series stops when a job would exceed this
    )
    import attnbench

    impls = [im.name for im in attnbench.available_impls()]
    out = []
    # bf16 first, its forward + backward right after its forward: if the time budget
    # runs out, what is cut is the fp32 repeat, not the figures the targets quote
    for dtype in DTYPES:
        for extra in PATTERNS.values():
            for impl in impls:
                for n in lens:
                    out.append(dataclasses.replace(base, impl=impl, dtype=dtype, seq_len=n, mode="fwd", **extra))
        for impl in impls:
            out.append(dataclasses.replace(base, impl=impl, dtype=dtype, seq_len=lens[-1], mode="fwd_bwd"))
    return out


def targets_plan() -> list:
    """The configurations the Triton kernel's targets are quoted at: B=1, H=16,
    n=32768, window 512, bf16, head_dim 64 and 128, dilation 1 and 2, forward and
    forward + backward, for "triton" and for FlexAttention ("flex") on the same pattern."""
    from attnbench.config import BenchConfig

    base = BenchConfig(
        device="cuda",
        batch=1,
        heads=16,
        seq_len=32768,
        window=512,
        dtype="bf16",
        study="targets",
        isolate=False,
        time_budget_s=0.5,
        min_reps=5,
        max_reps=100,
        warmup=2,
        job_timeout_s=60,
    )
    out = []
    for head_dim in (64, 128):
        for dilation in (1, 2):
            for mode in ("fwd", "fwd_bwd"):
                for impl in ("triton", "flex"):
                    out.append(dataclasses.replace(base, impl=impl, head_dim=head_dim, dilation=dilation, mode=mode))
    return out


def run_stage(name: str, configs: list, outdir: Path, log: Log, limit_s: float, ceil: dict) -> Path:
    """Measure ``configs`` one by one with the benchmark engine into OUTDIR/<name>.csv
    (each row written as it comes); those left when ``limit_s`` is spent become rows
    marked skipped. Logs a line per job, then the rows at the largest n."""
    from attnbench.results import base_row, format_rows
    from attnbench.sweep import sweep
    from attnbench.tables import append_row

    csv_path = outdir / f"{name}.csv"
    configs = [dataclasses.replace(c, results_dir=str(outdir), study=name) for c in configs]
    deadline = time.time() + limit_s
    rows = []
    for i, c in enumerate(configs):
        if time.time() > deadline:
            try:
                row = base_row(c.resolved())
            except ValueError:
                continue
            row["status"], row["reason"] = "skipped", f"over the time budget: gpu_check's {name} stage ran out of time"
            append_row(csv_path, row)
            continue
        # one at a time so the stage deadline holds (the sweeps of a process share the
        # series history the predictive guards use)
        try:
            r = sweep([c], progress=False)[0]
        except Exception as e:  # an invalid configuration: say so, go on with the rest
            log(f"  [{i + 1}/{len(configs)}] {c.impl} n={c.seq_len}: not run: {type(e).__name__}: {e}"[:240])
            continue
        rows.append(r)
        t = r.get("time_ms_median")
        log(
            f"  [{i + 1}/{len(configs)}] {c.impl:14s} {c.dtype} {r['pattern']:8s} D={c.head_dim:<3d} n={c.seq_len:6d} "
            f"{c.mode:7s} {r['status']:7s} {f'{t:.3f} ms' if t else '':>12s} {r['reason'] or ''}"[:240]
        )
    peak = ceil.get("bf16_matmul_tflops")
    if peak:
        log(f"  (fractions below are of the measured bf16 matmul rate, {peak:.0f} TFLOP/s)")
    big = [r for r in rows if r["seq_len"] == max(c.seq_len for c in configs)]
    if big:
        log(format_rows(big))
    return csv_path


def scaling(outdir: Path, log: Log, limit_s: float, quick: bool, ceil: dict) -> Path:
    return run_stage("scaling", plan(quick), outdir, log, limit_s, ceil)


# ---------------------------------------------------------------- verdict
def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict | None, col: str) -> float | None:
    try:
        return float(row[col]) if row else None
    except (TypeError, ValueError):  # an empty cell
        return None


def verdict(outdir: Path, log: Log, ceil: dict) -> list[dict]:
    """Each performance target of the Triton and CuPy kernels, from the rows in OUTDIR
    (targets.csv, scaling.csv; the latest row of each configuration): measured,
    required, and pass, FAIL or missing (no ok row). Written to OUTDIR/verdict.csv."""

    def pick(rows, **want):
        for r in reversed(rows):  # the latest, if OUTDIR holds earlier runs too
            if r.get("status") == "ok" and all(str(r.get(k)) == str(v) for k, v in want.items()):
                return r
        return None

    out: list[dict] = []

    def add(issue, target, measured, op, required, note=""):
        if measured is None:
            status = "missing"
        else:
            status = "pass" if (measured >= required if op == ">=" else measured <= required) else "FAIL"
        out.append({"issue": issue, "target": target, "measured": "" if measured is None else f"{measured:.3g}",
                    "required": f"{op} {required:g}", "status": status, "note": note})  # fmt: skip

    def speedup(slow, fast):
        a, b = _num(slow, "time_ms_median"), _num(fast, "time_ms_median")
        return a / b if a and b else None

    tg = _read(outdir / "targets.csv")
    mm = ceil.get("bf16_matmul_tflops")
    for D in (64, 128):
        for dil, need_fwd in ((1, 1.2), (2, 1.5)):
            for mode, need in (("fwd", need_fwd), ("fwd_bwd", 1.0)):
                t = pick(tg, impl="triton", head_dim=D, dilation=dil, mode=mode)
                f = pick(tg, impl="flex", head_dim=D, dilation=dil, mode=mode)
                tf = _num(t, "tflops")
                note = f"triton {tf:.0f} TFLOP/s" + (f" ({tf / mm:.0%} of bf16 matmul)" if mm else "") if tf else ""
                add("triton", f"speed-up over flex, bf16 D={D} dilation {dil} {mode}", speedup(f, t), ">=", need, note)
            t = pick(tg, impl="triton", head_dim=D, dilation=dil, mode="fwd")
            mem = _num(t, "peak_mem_bytes")
            if t is not None and mem is not None:
                B, H, n = int(t["batch"]), int(t["heads"]), int(t["seq_len"])
                allowed = B * H * n * D * 2 + 8 * B * H * n  # bf16 output + fp32 log-sum-exp (+ slack of as much)
                add(
                    "triton", f"extra peak memory / (output + O(n)), D={D} dilation {dil} fwd", mem / allowed, "<=", 1.0
                )
            else:
                add("triton", f"extra peak memory / (output + O(n)), D={D} dilation {dil} fwd", None, "<=", 1.0)

    sc = _read(outdir / "scaling.csv")
    n_max = max((int(r["seq_len"]) for r in sc if r.get("status") == "ok"), default=None)
    for dtype in ("fp32", "bf16"):
        for mode in ("fwd", "fwd_bwd"):
            cu = pick(sc, impl="cupy", dtype=dtype, mode=mode, seq_len=n_max)
            ch = pick(sc, impl="chunked", dtype=dtype, mode=mode, seq_len=n_max)
            add("cupy", f"speed-up over chunked, {dtype} n={n_max} {mode}", speedup(ch, cu), ">=", 2.0)
            a, b = _num(cu, "peak_mem_bytes"), _num(ch, "peak_mem_bytes")
            add("cupy", f"peak memory / chunked's, {dtype} n={n_max} {mode}", a / b if a and b else None, "<=", 0.999)
        tr = pick(sc, impl="triton", dtype=dtype, mode="fwd", seq_len=n_max)
        cu = pick(sc, impl="cupy", dtype=dtype, mode="fwd", seq_len=n_max)
        add("cupy", f"time / triton's, {dtype} n={n_max} fwd", speedup(cu, tr), "<=", 4.0)

    with open(outdir / "verdict.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0]))
        w.writeheader()
        w.writerows(out)
    log(f"\nTargets, from the rows in {outdir}/ (missing: no ok row for it):")
    for r in out:
        log(
            f"  {r['status']:7s} {r['issue']:6s} {r['target']:58s} {r['measured']:>7s} {r['required']:>7s}  {r['note']}"
        )
    return out


def summary(csv_path: Path, outdir: Path, log: Log, ceil: dict) -> None:
    try:
        import pandas as pd
    except ImportError:
        log("  pandas not installed: no summary table")
        return
    df = pd.read_csv(csv_path)
    nmax = df["seq_len"].max()
    sub = df[df["seq_len"] == nmax].copy()
    sub["peak_mem_MiB"] = sub["peak_mem_bytes"] / 2**20
    if ceil.get("bf16_matmul_tflops"):
        sub["frac_of_bf16_mm"] = sub["tflops"] / ceil["bf16_matmul_tflops"]
    cols = ["impl", "pattern", "dtype", "mode", "status", "time_ms_median", "peak_mem_MiB", "tflops"]
    cols += [c for c in ("frac_of_bf16_mm",) if c in sub]
    table = sub[cols].sort_values(["dtype", "mode", "pattern", "impl"]).to_string(index=False, float_format="%.4g")
    (outdir / "summary.txt").write_text(table + "\n")
    log(f"\nSummary at n = {nmax}:\n{table}")


def figure(csv_path: Path, outdir: Path, log: Log) -> None:
    try:
        from attnbench import plot
    except Exception as e:
        log(f"  no figure: {type(e).__name__}: {e}")
        return
    try:
        paths = plot.plot_scaling(plot.load_results([csv_path]), outdir / "scaling.png")
        log("  figure: " + ", ".join(str(p.name) for p in paths))
    except Exception as e:
        log(f"  figure failed: {type(e).__name__}: {e}")


STAGES = ("tests", "targets", "scaling")


def _stages(text: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in STAGES]
    if bad or not got:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are a comma-separated list of {', '.join(STAGES)}")
    return [x for x in STAGES if x in got]  # always in this order


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m attnbench.gpu_check",
        description="Verify and measure every attnbench implementation on this CUDA GPU in one run. "
        "The environment and the ceilings (bf16 matmul rate, copy bandwidth) are always measured; "
        "then the chosen stages run: tests (the suite on CUDA), targets (triton against FlexAttention "
        "at the configurations its performance targets name), scaling (every implementation over n). "
        "Every stage ends with the verdict on the performance targets it has rows for.",
    )
    ap.add_argument("outdir", nargs="?", default="gpu-check", help="where the log, tables and figure go")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--quick", action="store_true", help="every other sequence length")
    ap.add_argument(
        "--stages",
        type=_stages,
        default=["tests", "scaling"],
        help=f"comma-separated, from {', '.join(STAGES)} (default tests,scaling)",
    )
    ap.add_argument("--skip-tests", action="store_true", help="leave out the tests stage")
    ap.add_argument("--tests-limit", type=float, default=200, help="seconds for the test suite (default 200)")
    ap.add_argument(
        "--test-shards",
        type=int,
        default=default_shards(),
        help=f"parallel pytest processes for the tests (default here {default_shards()}: half the cores, at most 8)",
    )
    ap.add_argument("--targets-limit", type=float, default=180, help="seconds for the targets stage (default 180)")
    ap.add_argument(
        "--scaling-limit",
        type=float,
        default=None,
        help="seconds for the scaling study (default: what remains of --budget)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help=f"seconds for the whole run (default {BUDGET_S:.0f}); the scaling study gets what the stages "
        "before it left, less a reserve for the figure and summary",
    )
    a = ap.parse_args(argv)
    stages = [x for x in a.stages if not (a.skip_tests and x == "tests")]

    if a.dry_run:
        import attnbench

        configs = plan(a.quick)
        print(f"gpu_check plan: {len(configs)} scaling configurations, {len(targets_plan())} target configurations")
        print(f"  lengths {sorted({c.seq_len for c in configs})}, dtypes {DTYPES}, patterns {list(PATTERNS)}")
        print("  implementations (only available ones are measured):")
        for row in attnbench.describe():
            state = "available" if row["available"] else f"not available here: {row['reason']}"
            print(f"    {row['name']:14s} {row['devices']:9s} {state}")
        shards = f"{a.test_shards} shard{'s' if a.test_shards != 1 else ''}"
        scal = f"<= {a.scaling_limit:.0f} s" if a.scaling_limit is not None else f"the rest of {a.budget:.0f} s"
        limits = {
            "tests": f"tests ({shards}, <= {a.tests_limit:.0f} s)",
            "targets": f"targets (<= {a.targets_limit:.0f} s)",
            "scaling": f"scaling ({scal})",
        }
        print(f"  stages: environment, ceilings, {', '.join(limits[x] for x in stages)}, verdict")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to check the plan)", file=sys.stderr)
        return 2
    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    log = Log(outdir / "gpu_check.log")
    t0 = time.time()

    def left() -> float:
        return a.budget - (time.time() - t0) - RESERVE_S

    log("== environment")
    env = environment(log)
    log("== ceilings")
    ceil = ceilings(log)
    (outdir / "environment.json").write_text(json.dumps({**env, **ceil}, indent=2, default=str))
    if "tests" in stages:
        log("== tests on CUDA")
        run_tests(outdir, log, min(a.tests_limit, left()), shards=a.test_shards)
    if "targets" in stages:
        limit = min(a.targets_limit, left())
        log(f"== targets: triton against FlexAttention (<= {limit:.0f} s)")
        run_stage("targets", targets_plan(), outdir, log, limit, ceil)
    if "scaling" in stages:
        limit = left() if a.scaling_limit is None else min(a.scaling_limit, left())
        log(f"== scaling study (<= {limit:.0f} s)")
        csv_path = scaling(outdir, log, limit, a.quick, ceil)
        figure(csv_path, outdir, log)
        summary(csv_path, outdir, log, ceil)
    verdict(outdir, log, ceil)
    log(f"== done in {time.time() - t0:.0f} s; results in {outdir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
