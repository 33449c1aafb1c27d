"""The first run on a CUDA GPU, in one call (``scripts/gpu_check.sh OUTDIR``;
``--dry-run`` prints the ordered plan and its time estimate without a GPU).

Needs torch, and triton, cupy, pytest, pandas and matplotlib where installed; no Hydra,
no network. What only a GPU can show runs first: the environment checks, the ceilings,
triton and cupy verified at the measured sizes, the targets of ``conf/gpu_targets.csv``,
the scaling study (triton, cupy, chunked first), then the test suite. Every measurement
is the benchmark engine's; each stage's first job per implementation runs in a child
process, and a CUDA error in this process stops the stage and sends later stages' jobs
to children. Each job's time limit comes from what its stage has left. The verdict
judges every target from the rows: pass, FAIL or missing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .config import BenchConfig
from .measure import calls_per_job

ROOT = Path(__file__).resolve().parent.parent
#: the performance targets, as data (attnbench.conf is conf/ in a checkout)
TARGETS = Path(importlib.import_module("attnbench.conf").__file__).parent / "gpu_targets.csv"
STAGES = ("correctness", "targets", "scaling", "tests")
MEASURING = STAGES[:3]
#: the measuring stages' shares of the time; what a stage leaves passes on to the next
ALLOWANCE = {"correctness": 105.0, "targets": 170.0, "scaling": 140.0}
SETUP_S = 15.0  # the environment checks and the ceilings
TESTS_MIN_S = 90.0  # kept for the tests, which get whatever the measuring stages leave
RESERVE_S = 25.0  # the figure, summary and verdict, and a stopped test run's report
FIRST = ("triton", "cupy", "chunked")
#: how each stage times: correctness only verifies; the rest follow the engine's defaults
STAGE_SETTINGS = {
    "correctness": dict(time_budget_s=0.0, warmup=0, min_reps=1, max_reps=1, memory=False, job_timeout_s=120),
    "targets": dict(time_budget_s=0.5, warmup=2, min_reps=5, max_reps=100, job_timeout_s=60),
    "scaling": dict(time_budget_s=0.3, warmup=1, min_reps=3, max_reps=50, job_timeout_s=20),
}
CUDA_FAULTS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
               "illegal instruction", "cuda error", "cudaerror", "cublas_status_execution_failed")  # fmt: skip
log = logging.getLogger("attnbench.gpu_check")


# ---------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Job:
    stage: str
    config: BenchConfig
    child: bool = False  # the stage's first job of this implementation and mode: a process of its own


def targets() -> list[dict]:
    """The rows of ``conf/gpu_targets.csv``: one performance target each, with the
    configuration it is measured at."""
    with open(TARGETS, newline="") as f:
        return list(csv.DictReader(f))


def _config(t: dict, impl: str, **kw) -> BenchConfig:
    fields = {k: int(t[k]) for k in ("batch", "heads", "seq_len", "head_dim", "window", "dilation")}
    fields.update(dtype=t["dtype"], mode=t["mode"], device="cuda", isolate=False)
    return BenchConfig(impl=impl, **{**fields, **kw})


def _first(names: set[str]) -> list[str]:
    return sorted(names, key=lambda s: (FIRST.index(s) if s in FIRST else len(FIRST), s))


def _cuda_impls() -> list[str]:
    from .registry import get_impl, list_impls

    return _first({name for name in list_impls() if "cuda" in get_impl(name).devices})


def plan(stages: list[str]) -> list[Job]:
    """Every measuring job of ``stages``, in the order they run."""
    rows, jobs = targets(), []

    def add(stage: str, configs: list[BenchConfig]) -> None:
        seen, started = set(), set()
        for c in configs:
            c = dataclasses.replace(c, study=stage, **STAGE_SETTINGS[stage])
            key = repr(c)
            if key not in seen:
                seen.add(key)
                jobs.append(Job(stage, c, child=(c.impl, c.mode) not in started))
                started.add((c.impl, c.mode))

    if "correctness" in stages:  # fwd_bwd verifies the output and the gradients
        want = [_config(t, i, mode="fwd_bwd") for t in rows for i in (t["impl"], t["baseline"]) if i in FIRST[:2]]
        add("correctness", sorted(want, key=lambda c: FIRST.index(c.impl)))
    if "targets" in stages:
        mine = [t for t in rows if t["stage"] == "targets"]
        add("targets", [_config(t, t[i]) for i in ("impl", "baseline") for t in mine if t[i]])
    if "scaling" in stages:
        t = next(t for t in rows if t["stage"] == "scaling")  # its shape; n up to its seq_len
        lens = [2**e for e in range(10, int(t["seq_len"]).bit_length())]
        impls = _cuda_impls()
        configs = []
        for impl in impls:  # fp32 and the training step only where a target needs them
            for dtype in ("bf16", "fp32") if impl in FIRST else ("bf16",):
                base = dict(t, dtype=dtype, dilation=1)
                configs += [_config(dict(base, seq_len=n), impl, mode="fwd") for n in lens]
                configs += [_config(base, impl, mode="fwd_bwd")] if impl in FIRST else []
        add("scaling", configs)
    return jobs


# Rough H100-class figures for the dry run's estimate: a child's start (Python, torch,
# the CUDA context), the first compile of each kernel family, and sustained rates.
START_S = 6.0
COMPILE_S = {("triton", "fwd"): 9.0, ("triton", "fwd_bwd"): 27.0, ("flex", "fwd"): 15.0, ("flex", "fwd_bwd"): 45.0,
             ("cupy", "fwd"): 3.0, ("cupy", "fwd_bwd"): 6.0}  # fmt: skip
TFLOPS = {"triton": 150, "flash_attn": 300, "flex": 100, "cupy": 25, "chunked": 30, "hf_longformer": 20,
          "sdpa": 150, "naive": 80, "loop": 0.05}  # fmt: skip
DENSE = {"naive", "sdpa"}  # work n^2, whatever the pattern


def _label(c: BenchConfig) -> str:
    """One job, as the dry run and the log show it."""
    return (f"{c.impl:13s} {c.dtype} B={c.batch} H={c.heads} D={c.head_dim:<3d} w={c.window} d={c.dilation} "
            f"n={c.seq_len:<6d} {c.mode:7s}")  # fmt: skip


def estimate_s(job: Job, compiled: set) -> float:
    """About how long ``job`` takes on an H100-class GPU (the dry run's plan check)."""
    from .registry import get_impl, required_features
    from .results import base_row

    c = job.config
    impl = get_impl(c.impl)  # installed on the GPU machine or not, what it cannot do is a skipped row
    needs = required_features(c.pattern(), backward=c.mode != "fwd")
    if c.torch_dtype() not in impl.dtypes or any(f not in impl.features for f in needs):
        return 0.0
    work = base_row(c)["flops"]  # the pattern's useful work; a dense implementation does all n^2 pairs
    if c.impl in DENSE:
        work *= c.heads * c.seq_len**2 / c.pattern().pairs(c.seq_len, c.heads)
    per_call = work / (TFLOPS.get(c.impl, 30) * 1e12)
    # Triton compiles per head_dim and dtype; flex per pattern (later shapes reuse a dynamic graph)
    key = (c.impl, c.mode, c.head_dim, c.dtype) if c.impl != "flex" else (c.impl, c.mode, c.dilation)
    compile_s = 0.0 if key in compiled else COMPILE_S.get((c.impl, c.mode), 0.0)
    compiled.add(key)
    total = (START_S if job.child else 0.0) + compile_s + per_call * calls_per_job(c) + c.time_budget_s
    return min(total, c.job_timeout_s + (START_S if job.child else 0.0))


# ---------------------------------------------------------------------- environment
def environment() -> dict:
    """Versions, the GPU and the checks that need no GPU; ``checks`` maps a check to ""
    (passed) or what is wrong."""
    import torch

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "cupy", "transformers", "flash_attn", "pandas", "matplotlib", "pytest", "xdist"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as e:  # absent or broken: say which
            info[mod] = f"not available ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1))
    cc = os.environ.get("CC") or next((shutil.which(x) for x in ("cc", "gcc", "clang") if shutil.which(x)), None)
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    info["checks"] = {
        "C compiler": "" if cc else "no C compiler (CC, cc, gcc or clang): Triton and inductor need one",
        "Python headers": "" if headers.exists() else f"{headers} missing: Triton and inductor need it",
    }
    return info


#: run as a file (Triton reads a kernel's source from it): python FILE DEVICE
_LAUNCH = r"""
import json, sys, torch
dev, out = sys.argv[1], {}
try:
    import triton, triton.language as tl
    @triton.jit
    def one(x):
        tl.store(x, tl.load(x) + 1.0)
    x = torch.zeros(1, device=dev); one[(1,)](x)
    out["Triton launch"] = "" if x.item() == 1.0 else f"wrong value {x.item()}"
except Exception as e:
    out["Triton launch"] = f"{type(e).__name__}: {e}"[:300]
try:
    import cupy
    k = cupy.RawKernel('extern "C" __global__ void one(float* x) { x[0] += 1.0f; }', "one")
    y = cupy.zeros(1, dtype=cupy.float32); k((1,), (1,), (y,)); cupy.cuda.runtime.deviceSynchronize()
    out["CuPy compile"] = "" if float(y[0]) == 1.0 else f"wrong value {float(y[0])}"
except Exception as e:
    out["CuPy compile"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(out))
"""


def launch_checks(outdir: Path, device: str = "cuda", timeout_s: float = 120.0) -> dict:
    """A one-element Triton launch and one CuPy compile, in a child process."""
    script = outdir / "launch_check.py"
    script.write_text(_LAUNCH)
    try:
        r = subprocess.run([sys.executable, str(script), device], capture_output=True, text=True, timeout=timeout_s)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # the child crashed or hung: both unknown
        why = f"the check itself failed: {type(e).__name__}: {e}"[:300]
        return {"Triton launch": why, "CuPy compile": why}


#: which implementations a failed check takes down
CHECK_IMPLS = {"C compiler": ("triton", "flex"), "Python headers": ("triton", "flex"),
               "Triton launch": ("triton",), "CuPy compile": ("cupy",)}  # fmt: skip


def ceilings() -> dict:
    """bf16 matmul TFLOP/s (8192^3) and device-to-device copy GB/s, through the engine's
    timing path."""
    import torch

    from .measure import time_fn

    dev, n = torch.device("cuda"), 8192

    def ms(op, *tensors) -> float:  # the tensors are freed on return
        return time_fn(lambda: op(*tensors), dev, 0.2)["time_ms_median"]

    mm = ms(torch.matmul, *(torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2)))
    cp = ms(torch.Tensor.copy_, *(torch.empty(2**30, dtype=torch.uint8, device=dev) for _ in range(2)))
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_gbs": 2 * 2**30 / (cp * 1e-3) / 1e9}


# ---------------------------------------------------------------------- measuring stages
def _skip(c: BenchConfig, reason: str) -> None:
    from .results import base_row
    from .tables import append_row, table_path

    row = base_row(c)  # complete as planned: device="cuda" needs no resolving
    row["status"], row["reason"] = "skipped", reason
    append_row(table_path(c), row)


def run_stage(stage: str, jobs: list[Job], outdir: Path, deadline: float, state: dict) -> None:
    """Measure ``jobs`` into OUTDIR/<stage>.csv by the time ``deadline``; what is left
    then becomes skipped rows. ``state``: ``down`` (impl -> why its environment check
    failed) and ``poisoned`` (a CUDA error hit this process), which this may set."""
    from .sweep import sweep

    history: dict = {}
    stop = ""
    for i, job in enumerate(jobs, 1):
        c = dataclasses.replace(job.config, results_dir=str(outdir))
        left = deadline - time.time()
        if stop or left < 1:
            _skip(c, stop or f"over the time budget: gpu_check's {stage} stage ran out of time")
            continue
        if c.impl in state["down"]:
            _skip(c, f"unavailable: the environment check failed: {state['down'][c.impl]}")
            continue
        child = job.child or state["poisoned"]
        c = dataclasses.replace(c, isolate=child, job_timeout_s=max(5.0, min(c.job_timeout_s, left)))
        row = sweep([c], progress=False, history=history)[0]
        t = row.get("time_ms_median")
        log.info("  [%d/%d] %s %-5s %-7s %10s %s", i, len(jobs), _label(c), "child" if child else "", row["status"],
                 f"{t:.3f} ms" if t else "", str(row["reason"] or "")[:160])  # fmt: skip
        fault = row["status"] == "error" and any(f in str(row["reason"]).lower() for f in CUDA_FAULTS)
        if fault and not child:
            state["poisoned"] = True
            stop = f"not run: a CUDA error in {c.impl} left this process's GPU context unusable"
            log.error("  CUDA error in this process: the rest of %s is skipped; later stages run in children", stage)


# ---------------------------------------------------------------------- the tests
def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """(counts by outcome, "id: message" of each failure and error) from a JUnit file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name"):  # the test an interrupt stopped: no outcome
            continue
        tags = {child.tag: child for child in case}
        kind = next((k for k in ("failure", "error", "skipped") if k in tags), None)
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[kind]] += 1
        if kind in ("failure", "error"):
            msg = " ".join(str(tags[kind].get("message", "")).split())
            failed.append(f"{case.get('classname')}::{case.get('name')}: {msg}"[:300])
    return counts, failed


def run_tests(outdir: Path, limit_s: float, workers: int, paths: tuple[str, ...] = ("tests",),
              device: str = "cuda", grace_s: float = 20.0) -> dict:  # fmt: skip
    """The suite on ``device``, with ``workers`` pytest-xdist processes (``--dist
    loadgroup``: tests/conftest.py groups Triton's tests by head_dim and dtype, so one
    worker compiles each kernel set). At ``limit_s`` it is interrupted, which still
    writes the JUnit file of what ran; counts and failures come from that file."""
    env = dict(os.environ, ATTNBENCH_TEST_DEVICE=device)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("TRITON_INTERPRET", None)
    xml = outdir / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, "--tb=short",
           "--continue-on-collection-errors", f"--junitxml={xml}"]  # fmt: skip
    if workers > 1 and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(workers), "--dist", "loadgroup"]
        # each worker's inductor compiles with a share of the cores, not all of them
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // workers)))
    elif workers > 1:
        log.warning("  pytest-xdist is not installed: the tests run in one process")
    log.info("  $ %s", " ".join(cmd[1:]))
    t0 = time.time()
    with open(outdir / "tests.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = False
        try:
            rc = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGINT)  # pytest stops its workers and reports what ran
            try:
                rc = proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    counts, failed = junit_counts(xml) if xml.exists() else ({}, [])
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no JUnit report"
    summary += " (stopped at the time limit)" if stopped else ""
    log.info("  tests: exit %s after %.0f s: %s", rc, time.time() - t0, summary)
    for line in failed:
        log.info("    FAILED %s", line)
    return {"rc": rc, "counts": counts, "failed": failed, "stopped": stopped}


# ---------------------------------------------------------------------- the verdict
def _ok_row(rows: list[dict], t: dict, impl: str) -> dict | None:
    """The latest row of ``impl`` at target ``t``'s configuration, if it is ok."""
    from .results import base_row, identity

    want = identity(base_row(dataclasses.replace(_config(t, impl), study=t["stage"])))
    mine = [r for r in rows if identity(r) == want]
    return mine[-1] if mine and mine[-1]["status"] == "ok" else None


def _value(t: dict, rows: list[dict]) -> float | None:
    """Target ``t``'s measure from ``rows``; None where a row it needs is missing."""
    col = "time_ms_median" if t["measure"] in ("speedup", "time_ratio") else "peak_mem_bytes"
    got = [_ok_row(rows, t, t[k]) if t[k] else None for k in ("impl", "baseline")]
    a, b = (float(r[col]) if r and r.get(col) not in (None, "") else None for r in got)
    if t["measure"] == "extra_memory":  # the peak over the output and an fp32 value per row
        c = _config(t, t["impl"])
        b = c.batch * c.heads * c.seq_len * (c.head_dim * c.torch_dtype().itemsize + 4)
    if not (a and b):
        return None
    return b / a if t["measure"] == "speedup" else a / b


def verdict(outdir: Path) -> list[dict]:
    """Each correctness row, then each target of ``conf/gpu_targets.csv`` from the latest
    rows in OUTDIR: measured, required, pass / FAIL / missing; into verdict.csv."""
    from .tables import read_rows

    tables = {s: read_rows(outdir / f"{s}.csv") for s in MEASURING}
    out = []
    for r in tables["correctness"]:
        what = f"{r['impl']} correct, {r['dtype']} D={r['head_dim']} d={r['dilation']} n={r['seq_len']} {r['mode']}"
        status = {"ok": "pass", "wrong": "FAIL"}.get(r["status"], "missing")
        out.append({"target": what, "measured": r["status"], "required": "ok", "status": status})
    for t in targets():
        v, need = _value(t, tables[t["stage"]]), float(t["required"])
        status = "missing" if v is None else "pass" if (v >= need if t["op"] == ">=" else v <= need) else "FAIL"
        what = f"{t['target']}, {t['dtype']} D={t['head_dim']} d={t['dilation']} n={t['seq_len']} {t['mode']}"
        out.append({"target": what, "measured": "" if v is None else f"{v:.3g}",
                    "required": f"{t['op']} {t['required']}", "status": status})  # fmt: skip
    with open(outdir / "verdict.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["target", "measured", "required", "status"])
        w.writeheader()
        w.writerows(out)
    return out


# ---------------------------------------------------------------------- the command
def allowances(stages: list[str], budget: float) -> dict[str, float]:
    """Seconds for each chosen measuring stage: ``budget`` less the set-up, the reserve
    and the tests' minimum, shared in proportion to :data:`ALLOWANCE`."""
    mine = [s for s in stages if s in ALLOWANCE]
    room = budget - SETUP_S - RESERVE_S - (TESTS_MIN_S if "tests" in stages else 0.0)
    return {s: ALLOWANCE[s] * room / sum(ALLOWANCE[m] for m in mine) for s in mine}


def _stages(text: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    if not got or any(x not in STAGES for x in got):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(STAGES)}")
    return [x for x in STAGES if x in got]


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def dry_run(stages: list[str], budget: float, workers: int) -> int:
    env = environment()
    print(f"gpu_check plan for {budget:.0f} s (estimates for an H100-class GPU; this machine: "
          f"{'a CUDA GPU' if env.get('gpu') else 'no GPU'})")  # fmt: skip
    for name, problem in env["checks"].items():
        print(f"  check {name}: {problem or 'ok'}")
    compiled: set = set()
    allowed, total = allowances(stages, budget), 0.0
    print(f"  environment + ceilings: ~{SETUP_S:.0f} s")
    for stage in [s for s in stages if s in allowed]:
        jobs = plan([stage])
        times = [estimate_s(j, compiled) for j in jobs]
        total += sum(times)
        print(f"  {stage} (allowance {allowed[stage]:.0f} s, ~{sum(times):.0f} s for {len(jobs)} jobs):")
        for i, (j, t) in enumerate(zip(jobs, times), 1):
            c, where = j.config, "child" if j.child else ""
            print(f"    {i:3d} {_label(c)} {where:5s} ~{t:.1f} s")
    if "tests" in stages:
        how = f"pytest -n {workers} --dist loadgroup" if importlib.util.find_spec("xdist") else "one process"
        rest = budget - SETUP_S - RESERVE_S - total
        print(f"  tests (what is left: ~{rest:.0f} s, at least {TESTS_MIN_S:.0f} s): {how}")
    fits = "fits" if total <= sum(allowed.values()) else "does NOT fit"
    print(f"  estimate: ~{SETUP_S + total:.0f} s of measuring, {RESERVE_S:.0f} s reserve: {fits} in {budget:.0f} s "
          "(each stage stops at its allowance plus what earlier stages left)")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m attnbench.gpu_check",
        description="Verify and measure attnbench on this CUDA GPU in one run: environment, ceilings, then "
        "the stages (correctness of triton and cupy at the measured sizes, the targets of conf/gpu_targets.csv, "
        "the scaling study, the test suite), then the verdict on every target.",
    )
    ap.add_argument("outdir", nargs="?", default="gpu-check", help="where the log, tables and figure go")
    ap.add_argument("--dry-run", action="store_true", help="print the ordered plan and its estimate; no GPU needed")
    ap.add_argument("--stages", type=_stages, default=list(STAGES), help=f"from {','.join(STAGES)} (default: all)")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds for the whole run (default 570)")
    ap.add_argument("--workers", type=int, default=_workers(), help="pytest-xdist workers (default: cores / 2, <= 8)")
    a = ap.parse_args(argv)
    if a.dry_run:
        return dry_run(a.stages, a.budget, a.workers)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (--dry-run prints the plan without one)", file=sys.stderr)
        return 2
    t0 = time.time()
    outdir = Path(a.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    # the console gets this module's lines; the log file every attnbench line (the engine's steps too)
    handlers = [(log, logging.StreamHandler(sys.stdout)), (logging.getLogger("attnbench"),
                logging.FileHandler(outdir / "gpu_check.log"))]  # fmt: skip
    for logger, h in handlers:
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
    try:
        return _run(a, outdir, t0)
    finally:
        for logger, h in handlers:
            logger.removeHandler(h)
            h.close()


def _run(a: argparse.Namespace, outdir: Path, t0: float) -> int:
    log.info("== environment")
    env = environment()
    env["checks"].update(launch_checks(outdir))
    for k, v in env.items():
        log.info("  %s: %s", k, v)
    state = {"poisoned": False, "down": {}}
    for check, problem in env["checks"].items():
        for impl in CHECK_IMPLS[check] if problem else ():
            state["down"].setdefault(impl, f"{check}: {problem}")
    log.info("== ceilings")
    try:
        env.update(ceilings())
        log.info(
            "  bf16 matmul %.0f TFLOP/s; copy %.0f GB/s (read + write)", env["bf16_matmul_tflops"], env["copy_gbs"]
        )
    except Exception as e:  # this process's GPU may be unusable now: measure in children
        state["poisoned"] = True
        log.error("  ceilings failed (%s: %s); every job runs in a child process", type(e).__name__, e)
    (outdir / "environment.json").write_text(json.dumps(env, indent=2, default=str))
    end = t0 + a.budget - RESERVE_S
    planned, allowed = time.time(), allowances(a.stages, a.budget - (time.time() - t0 - SETUP_S))
    for stage in a.stages:
        if stage == "tests":  # the last stage: what is left
            log.info("== tests (until %+.0f s)", end - t0)
            run_tests(outdir, end - time.time(), a.workers)
            continue
        planned += allowed[stage]
        deadline = min(end, max(planned, time.time()))
        log.info("== %s (until %+.0f s)", stage, deadline - t0)
        run_stage(stage, plan([stage]), outdir, deadline, state)
    _report(outdir)
    log.info("== done in %.0f s; results in %s/", time.time() - t0, outdir)
    return 0


def _report(outdir: Path) -> None:
    """The scaling figure and summary (where pandas and matplotlib are), then the verdict."""
    scaling = outdir / "scaling.csv"
    if scaling.exists():
        try:
            from . import plot
            from .results import format_rows
            from .tables import read_rows

            rows = read_rows(scaling)
            nmax = max(int(r["seq_len"]) for r in rows)
            log.info("\n%s", format_rows([r for r in rows if int(r["seq_len"]) == nmax]))
            paths = plot.plot_scaling(plot.load([scaling]), outdir / "scaling.png")
            log.info("  figure: %s", ", ".join(p.name for p in paths))
        except Exception as e:  # a missing plotting library is not a failed run
            log.warning("  no figure or summary: %s: %s", type(e).__name__, e)
    log.info("\nVerdict (conf/gpu_targets.csv; missing: no ok row):")
    for r in verdict(outdir):
        log.info("  %-7s %-90s %8s %8s", r["status"], r["target"], r["measured"], r["required"])


if __name__ == "__main__":
    raise SystemExit(main())
