"""The GPU verdict in one bounded command: ``scripts/gpu_check.sh OUT`` (300 s by
default; ``--dry-run`` prints the plan and its estimate without a GPU; ``--verdict-only
OUT`` recomputes the verdict from OUT's rows on any machine, a CPU one included).

Needs torch, and triton, cupy, pytest, pandas and matplotlib where installed; no Hydra,
no network. What only a GPU can show runs first:

1. set-up, while the **warm-up** compiles on the host's cores every Triton kernel
   config the plan will launch (:mod:`attnbench.gpu_warmup`) and flex's graphs (each
   flex shape's first call, in GPU processes of its own): the environment checks,
   the launch check, the ceilings;
2. **correctness**: triton and cupy verified at the sizes measured next, with global
   tokens (1 and 64) and causal, forward and backward;
3. **targets**: every configuration ``conf/gpu_targets.csv`` names;
4. **gpu-tests**: the tests only a GPU runs (``pytest -m gpu``: the autotuned kernels,
   CuPy on the device);
5. **scaling**: every CUDA implementation over n;
6. **tests**: the rest of the suite, on CUDA.

Every job runs in one worker process kept between jobs (compiled kernels and
autotuning stay warm there) and is bounded: a job still running at its stage's
deadline is killed with its worker (a ``skipped`` row says so; the next job starts a
new worker), and so is a worker that a CUDA error made unusable. Each stage's deadline
is its share of what is left (:data:`SHARE`); the tests are stopped at the end of the
budget. OUT holds at most 8 files (:data:`OUT_FILES`), rewritten after every stage, so
that a run cut short still leaves its rows and the verdict they give.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
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
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path

from .children import Died, Stopped, Worker, run_pool, sigint_default
from .config import BenchConfig
from .gpu_warmup import compile_one, triton_compiles
from .measure import calls_per_job
from .results import number
from .stats import VERDICTS, decide, ratio_interval

ROOT = Path(__file__).resolve().parent.parent
CONF = Path(importlib.import_module("attnbench.conf").__file__).parent  # conf/ in a checkout
#: the performance targets, as data
TARGETS = CONF / "gpu_targets.csv"
#: measured first-call and job times of a GPU run (its OUT/calibration.csv, copied here)
CALIBRATION = CONF / "gpu_calibration.csv"
STAGES = ("correctness", "targets", "gpu-tests", "scaling", "tests")
MEASURING = ("correctness", "targets", "scaling")
#: stages whose every job the default plan must fit: the verdict's rows
MUST_FIT = ("correctness", "targets")
BUDGET_S = 300.0
#: the set-up and warm-up may take this share of the budget (60 s of 300)
PREP_SHARE = 0.2
RESERVE_S = 15.0  # a stopped pytest's grace, the figure, the archive and the verdict
FIGURE_S = 5.0  # the figure is drawn only with this much of the budget left
#: each stage's share of what is left when it starts (the last stage gets all of it)
SHARE = {"correctness": 50.0, "targets": 85.0, "gpu-tests": 30.0, "scaling": 30.0, "tests": 30.0}
FIRST = ("triton", "cupy", "chunked")
#: how each measuring stage times: correctness only verifies; the rest follow the engine
STAGE_SETTINGS = {
    "correctness": dict(time_budget_s=0.0, warmup=0, min_reps=1, max_reps=1, memory=False, job_timeout_s=90),
    "targets": dict(time_budget_s=0.5, warmup=2, min_reps=5, max_reps=100, job_timeout_s=120),
    "scaling": dict(time_budget_s=0.3, warmup=1, min_reps=3, max_reps=50, job_timeout_s=30),
}
#: the correctness stage's patterns beyond the targets', for triton and cupy, forward
#: and backward, at each one's first target shape (64 global tokens spread evenly)
VARIANTS = {"1 global token": lambda n: dict(global_tokens=[0]),
            "64 global tokens": lambda n: dict(global_tokens=list(range(0, n, n // 64))),
            "causal": lambda n: dict(causal=True)}  # fmt: skip
#: the scaling study: the Longformer-base shape, bf16 forward (fp32 too for FIRST)
SCALING = dict(batch=1, heads=12, head_dim=64, window=512, dilation=1)
SCALING_LENS = {BUDGET_S: (2048, 8192, 32768), 450.0: tuple(2**e for e in range(10, 16))}
#: the files a run leaves in OUT, and nothing else
VERDICT, ROWS, SUMMARY, LOG, TESTS_XML, FIGURE, CALIBRATION_OUT, ARCHIVE = OUT_FILES = (
    "verdict.csv", "rows.csv", "summary.md", "log.txt", "tests.xml", "scaling.png", "calibration.csv",
    "extra.tar.gz")  # fmt: skip
#: columns rows.csv adds to the engine's: the run a row belongs to, the job's wall time
RUN_COLUMNS = ("run", "job_s")
CUDA_FAULTS = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
               "illegal instruction", "cuda error", "cudaerror", "cublas_status_execution_failed")  # fmt: skip
log = logging.getLogger("attnbench.gpu_check")


class BadInput(ValueError):
    """A setting or an input file gpu_check cannot use: one line, exit status 2."""


# ---------------------------------------------------------------------- the targets
#: optional columns of conf/gpu_targets.csv and their value when absent or empty
OPTIONAL = {"causal": "false", "global_tokens": "", "kv_heads": ""}


def positions(text: str) -> list[int]:
    """Global positions as :func:`attnbench.results.positions_text` writes them
    (``0-63 100``), back to a list."""
    out: list[int] = []
    for part in text.split():
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def targets(path: Path = TARGETS) -> list[dict]:
    """The rows of ``conf/gpu_targets.csv``: one performance target each, with the
    configuration it is measured at; optional columns filled in (:data:`OPTIONAL`).
    Raises :class:`BadInput` naming the line and the value that cannot be used."""
    with open(path, newline="") as f:
        rows = [{k: (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(f)]
    for t in rows:
        t.update({k: v for k, v in OPTIONAL.items() if not t.get(k)})
    for line, t in enumerate(rows, 2):
        try:
            _config(t, t["impl"]).validate()
            float(t["required"])
            if t["op"] not in (">=", "<=") or t["stage"] not in ("targets", "scaling"):
                raise ValueError(f"op={t['op']!r}, stage={t['stage']!r}: op is >= or <=, stage targets or scaling")
            if t["measure"] not in ("speedup", "time_ratio", "memory_ratio", "extra_memory"):
                raise ValueError(f"measure={t['measure']!r}: speedup, time_ratio, memory_ratio or extra_memory")
        except (KeyError, ValueError, TypeError) as e:
            raise BadInput(f"{path} line {line}: {e}") from None
    return rows


def _config(t: dict, impl: str, **kw) -> BenchConfig:
    """The configuration of target row ``t`` for ``impl`` (on CUDA, in this process)."""
    fields = {k: int(t[k]) for k in ("batch", "heads", "seq_len", "head_dim", "window", "dilation")}
    fields.update(dtype=t["dtype"], mode=t["mode"], device="cuda", isolate=False,
                  causal=str(t.get("causal", "false")).strip().lower() in ("true", "1"),
                  global_tokens=positions(t.get("global_tokens") or ""))  # fmt: skip
    kv = str(t.get("kv_heads") or "").strip()
    fields["kv_heads"] = int(kv) if kv else None  # None: heads
    return BenchConfig(impl=impl, **{**fields, **kw})


# ---------------------------------------------------------------------- the plan
@dataclasses.dataclass
class Job:
    stage: str
    config: BenchConfig


def _order(name: str) -> tuple:
    return (FIRST.index(name) if name in FIRST else len(FIRST), name)


def _first(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=_order)


def _cuda_impls() -> list[str]:
    from .registry import get_impl, list_impls

    return _first(name for name in list_impls() if "cuda" in get_impl(name).devices)


#: how a job is measured, not what: two configurations that differ only here are one
_HOW = {k for s in STAGE_SETTINGS.values() for k in s} | {"study", "results_dir", "verify"}


def _same(c: BenchConfig) -> str:
    """What makes two planned configurations one measurement (how it is measured aside)."""
    return repr([(f.name, getattr(c, f.name)) for f in dataclasses.fields(c) if f.name not in _HOW])


def correctness_configs(rows: list[dict]) -> list[BenchConfig]:
    """What the correctness stage verifies: triton and cupy at each target's
    configuration (forward and backward where a target measures the backward, else the
    forward), then :data:`VARIANTS` at each one's first target shape, forward and backward."""
    want = [_config(t, i) for t in rows for i in (t["impl"], t["baseline"]) if i in FIRST[:2]]
    trained = {_same(dataclasses.replace(c, mode="fwd_bwd")) for c in want if c.mode != "fwd"}
    want = [c for c in want if c.mode != "fwd" or _same(dataclasses.replace(c, mode="fwd_bwd")) not in trained]
    for impl in FIRST[:2]:
        base = next((c for c in want if c.impl == impl), None)
        if base is not None:
            want += [dataclasses.replace(base, mode="fwd_bwd", **v(base.seq_len)) for v in VARIANTS.values()]
    unique = {_same(c): c for c in reversed(want)}  # the first of each, in order
    return sorted(reversed(unique.values()), key=lambda c: _order(c.impl))


def scaling_lens(budget: float) -> tuple[int, ...]:
    """The scaling study's lengths: more of them for a longer budget."""
    return SCALING_LENS[max(b for b in SCALING_LENS if b <= max(budget, BUDGET_S))]


def plan(stages: Iterable[str], budget: float = BUDGET_S, rows: list[dict] | None = None) -> list[Job]:
    """Every measuring job of ``stages``, in the order they run."""
    rows = targets() if rows is None else rows
    stages = list(stages)
    jobs: list[Job] = []
    seen: dict[str, set] = {}

    def add(stage: str, configs: Iterable[BenchConfig]) -> None:
        for c in configs:
            key = _same(c)
            if key not in seen.setdefault(stage, set()):
                seen[stage].add(key)
                jobs.append(Job(stage, dataclasses.replace(c, study=stage, **STAGE_SETTINGS[stage])))

    if "correctness" in stages:
        add("correctness", correctness_configs(rows))
    if "targets" in stages:
        mine = [_config(t, t[i]) for i in ("impl", "baseline") for t in rows if t["stage"] == "targets" and t[i]]
        add("targets", sorted(mine, key=lambda c: _order(c.impl)))
    if "scaling" in stages:
        mine = [_config(t, t[i]) for i in ("impl", "baseline") for t in rows if t["stage"] == "scaling" and t[i]]
        study = []
        for impl in _cuda_impls():
            for dtype in ("bf16", "fp32") if impl in FIRST else ("bf16",):
                study += [BenchConfig(impl=impl, seq_len=n, dtype=dtype, mode="fwd", device="cuda", isolate=False,
                                      **SCALING) for n in scaling_lens(budget)]  # fmt: skip
        measured = seen.get("targets", set())  # the figure takes those rows from the targets stage
        add("scaling", mine + [c for c in study if _same(c) not in measured])
    return jobs


def _label(c: BenchConfig) -> str:
    """One job, as the dry run and the log show it (aligned)."""
    return (f"{c.impl:13s} {c.dtype} B={c.batch} H={c.heads} D={c.head_dim:<3d} w={c.window} d={c.dilation} "
            f"n={c.seq_len:<6d} {c.mode:7s}{_extra(c)}")  # fmt: skip


def _extra(c: BenchConfig) -> str:
    """What sets a configuration apart beyond its shape: grouped-query heads, causal,
    global tokens."""
    kv = c.kv_heads
    return ((f" kv={kv}" if kv and kv != c.heads else "") + (" causal" if c.causal else "")
            + (f" G={len(c.global_tokens)}" if c.global_tokens else ""))  # fmt: skip


def job_name(c: BenchConfig) -> str:
    """One job, as the calibration table names it: :func:`_label`, single-spaced."""
    return " ".join(_label(c).split())


# ---------------------------------------------------------------------- estimates
# The model the dry run uses where conf/gpu_calibration.csv has no measurement, in
# seconds on an H100 host (16 cores). Triton's compile times are CPU seconds per kernel
# binary, measured through ptxas for sm90 (fp32: 73 s for its 14 autotuned forward and
# backward binaries; bf16 head_dim 128: 34 s); the rest are rough figures that the
# first GPU run's calibration table replaces.
TRITON_COMPILE_CPU_S = {"fp32": 5.2, "bf16": 1.6, "fp16": 1.6, "bf16-128": 2.3, "fp16-128": 2.3}
FLEX_COLD_S = {"fwd": 15.0, "bwd": 45.0, "fwd_bwd": 45.0}  # a new shape's graphs, nothing cached
FLEX_WARM_S = {"fwd": 4.0, "bwd": 8.0, "fwd_bwd": 8.0}  # the same from inductor's and Triton's caches
TRITON_LOAD_S = 0.5  # a process loads the binaries of one (dtype, head_dim, mode) from Triton's cache
AUTOTUNE_S = {"fwd": 1.0, "bwd": 1.5}  # benchmarking the kept configs, per autotune key and kernel set
CUPY_COMPILE_S = 4.0  # NVRTC, once per process
FIRST_CALL_S = 0.2  # any other implementation's first call
VERIFY_S = {"fwd": 0.3, "bwd": 1.0, "fwd_bwd": 1.0}  # sampled reference rows (and gradients)
WORKER_START_S = 6.0  # Python, torch and a CUDA context
POOL_START_S = 4.0  # a pool's processes import torch and triton
GPU_TESTS_S = 25.0  # pytest -m gpu with the kernels warm
PROBE_S = 0.05  # the noise probe before a job's timed calls: ten 8192 x 8192 bf16 products, ~2 ms each
FLEX_PROCS = 4  # flex graphs compiled at once in the warm-up (at most one per 4 cores)
TFLOPS = {"triton": 150, "flash_attn": 300, "flex": 100, "cupy": 25, "chunked": 30, "hf_longformer": 20,
          "sdpa": 150, "naive": 80, "loop": 0.05}  # fmt: skip
DENSE = {"naive", "sdpa"}  # work n^2, whatever the pattern


def compile_key(c: BenchConfig) -> str:
    """What a first call compiles or loads, as a key: Triton's binaries per dtype,
    head_dim, global block and mode (window, dilation and n are runtime arguments);
    flex's graphs per shape, dtype and mode (compiled with ``dynamic=False``: every new
    n or head_dim recompiles); CuPy's module once per process; else nothing."""
    mode = "fwd" if c.mode == "fwd" else "fwd_bwd"
    if c.impl == "triton":
        return f"triton {c.dtype} D={c.head_dim} G={min(64, len(c.global_tokens))} {mode}"
    if c.impl == "flex":
        kv = c.kv_heads or c.heads
        return f"flex {c.dtype} B={c.batch} H={c.heads} kv={kv} n={c.seq_len} D={c.head_dim} {mode}"
    return c.impl


def _tune_keys(c: BenchConfig) -> list[str]:
    """Triton's autotuner benchmarks its configs once per key (head_dim, window,
    dilation, n's power of two, dtypes) and kernel in a process: the forward's, and
    the backward's in the training modes; none below its threshold."""
    if c.impl != "triton" or c.seq_len < 4096:
        return []
    key = f"{c.dtype} D={c.head_dim} G={min(64, len(c.global_tokens))} w={c.window} d={c.dilation} causal={c.causal}"
    key += f" n~{1 << (c.seq_len - 1).bit_length()}"
    return [f"{key} fwd"] + ([f"{key} bwd"] if c.mode != "fwd" else [])


def _supported(c: BenchConfig) -> bool:
    from .registry import get_impl, required_features

    impl = get_impl(c.impl)
    needs = required_features(c.pattern(), backward=c.mode != "fwd")
    return c.torch_dtype() in impl.dtypes and all(f in impl.features for f in needs)


def read_calibration(path: Path = CALIBRATION) -> list[dict]:
    """The rows of a calibration table (empty where there is none)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Estimator:
    """About how long jobs take on an H100-class host, in the order they run: a job's
    measured time where the calibration table has the same job (stage and label), else
    the model: the first call's compile or load once per :func:`compile_key` (its
    measured first call where the table has the key), Triton's autotuning once per
    key, verification, and the calls at :data:`TFLOPS`."""

    def __init__(self, calibration: list[dict]):
        def column(name: str, stages: Iterable[str]) -> dict[str, float]:
            return {r["key"]: number(r[name]) for r in calibration if r["stage"] in stages and r.get("key")
                    and number(r.get(name))}  # fmt: skip

        self.jobs = {(r["stage"], r["job"]): number(r["job_s"]) for r in calibration if number(r.get("job_s"))}
        self.first = column("first_call_s", MEASURING)  # a measured job's first call, caches warm
        self.cold = column("job_s", ["warm-up"])  # a flex shape's graphs (forward and backward), nothing cached
        count = column("count", ["warm-up"])
        self.cpu = {k: (v, count[k]) for k, v in column("cpu_s", ["warm-up"]).items() if k in count}
        self.seen: set[str] = set()

    def job(self, job: Job) -> tuple[float, str]:
        """(seconds, where the figure comes from: "measured" or "model")."""
        c = job.config
        model = self._model(c)  # also notes what this job compiles, for the jobs after it
        measured = self.jobs.get((job.stage, job_name(c)))
        if measured is not None:
            return min(measured, c.job_timeout_s), "measured"
        return model, "model"

    def _model(self, c: BenchConfig) -> float:
        if not _supported(c):
            return 0.05  # a skipped row
        from .results import base_row

        key = compile_key(c)
        t = 0.0
        if key not in self.seen:
            self.seen.add(key)
            t += self.first.get(key) or self._first_call(c)
        for tune in _tune_keys(c):
            if tune not in self.seen:
                self.seen.add(tune)
                t += AUTOTUNE_S[tune.rsplit(" ", 1)[1]]
        work = base_row(c)["flops"]  # the pattern's useful work; a dense implementation does all n^2 pairs
        if c.impl in DENSE:
            work *= c.heads * c.seq_len**2 / c.pattern().pairs(c.seq_len, c.heads)
        per_call = work / (TFLOPS.get(c.impl, 30) * 1e12)
        t += VERIFY_S[c.mode] + PROBE_S + per_call * (calls_per_job(c) + (c.mode != "fwd")) + c.time_budget_s + 0.2
        return min(t, c.job_timeout_s)

    @staticmethod
    def _first_call(c: BenchConfig) -> float:
        if c.impl == "triton":
            return TRITON_LOAD_S  # compiled by the warm-up
        if c.impl == "flex":
            return FLEX_WARM_S[c.mode]  # its graphs compiled by the warm-up
        if c.impl == "cupy":
            return CUPY_COMPILE_S
        return FIRST_CALL_S

    def warmup(self, compiles: list, flex: list[BenchConfig], cores: int) -> tuple[float, str]:
        """(seconds, what) of the warm-up on ``cores``: Triton's compiles shared by
        :func:`_procs`' processes, beside flex's graphs."""
        procs, flex_procs = _procs(cores, len(flex))
        cpu: dict[str, list[float]] = {}
        for task in compiles:
            group = cpu.setdefault(task.group, [0.0, 0.0])
            group[0] += TRITON_COMPILE_CPU_S[
                task.dtype + ("-128" if task.head_dim > 64 and task.dtype != "fp32" else "")
            ]
            group[1] += 1
        total = 0.0
        for group, (model_cpu, n) in cpu.items():
            measured_cpu, count = self.cpu.get(f"triton {group}", (None, None))
            total += measured_cpu / count * n if measured_cpu else model_cpu
        triton_s = POOL_START_S + total / max(1, procs) if compiles else 0.0
        lanes = [0.0] * max(1, flex_procs)
        for c in flex:
            i = lanes.index(min(lanes))
            lanes[i] += self.cold.get(compile_key(c)) or FLEX_COLD_S[c.mode]
        flex_s = POOL_START_S + max(lanes) if flex else 0.0
        what = (f"{len(compiles)} Triton compiles (~{total:.0f} s of CPU) on {procs} processes: ~{triton_s:.0f} s; "
                f"{len(flex)} flex graphs, {flex_procs} at a time: ~{flex_s:.0f} s")  # fmt: skip
        return max(triton_s, flex_s), what


def flex_warmups(jobs: list[Job]) -> list[BenchConfig]:
    """One configuration per flex compile key of ``jobs``, whose first call in a
    process of its own compiles that shape's graphs into inductor's and Triton's
    on-disk caches (a forward and a backward call; no verification, no timing)."""
    out, seen = [], set()
    for j in jobs:
        c = j.config
        if c.impl == "flex" and compile_key(c) not in seen and _supported(c):
            seen.add(compile_key(c))
            out.append(dataclasses.replace(c, study="warm-up", verify=False, memory=False, time_budget_s=0.0, warmup=0,
                                           min_reps=1, max_reps=1))  # fmt: skip
    return out


#: the autotuned case of the GPU-only tests (tests/test_triton.py,
#: test_autotuned_kernels_match_reference), which no job covers: its kernels are warmed too
TESTS_AUTOTUNED = [BenchConfig(impl="triton", batch=1, heads=2, seq_len=4096, head_dim=d, window=512, dilation=2,
                               dtype=dt, mode="fwd_bwd", global_tokens=[0, 2047, 4095], device="cuda")
                   for dt, d in (("bf16", 128), ("fp32", 64))]  # fmt: skip


def triton_warmups(jobs: list[Job]) -> list[BenchConfig]:
    """Every triton configuration of ``jobs``, then :data:`TESTS_AUTOTUNED`."""
    return [j.config for j in jobs if j.config.impl == "triton" and _supported(j.config)] + TESTS_AUTOTUNED


# ---------------------------------------------------------------------- the machine
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


def launch_checks(folder: Path, device: str = "cuda", timeout_s: float = 60.0) -> dict:
    """A one-element Triton launch and one CuPy compile, in a child process."""
    script = folder / "launch_check.py"
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
    timing path (in the worker: this process holds no CUDA memory)."""
    import torch

    from .measure import time_fn

    dev, n = torch.device("cuda"), 8192

    def ms(op, *tensors) -> float:  # the tensors are freed on return
        return time_fn(lambda: op(*tensors), dev, 0.2)["time_ms_median"]

    mm = ms(torch.matmul, *(torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2)))
    cp = ms(torch.Tensor.copy_, *(torch.empty(2**30, dtype=torch.uint8, device=dev) for _ in range(2)))
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_gbs": 2 * 2**30 / (cp * 1e-3) / 1e9}


#: the worker's series history (the engine's predictive guards), kept between its jobs
_HISTORY: dict = {}


def measure_job(c: BenchConfig) -> dict:
    """One job through the engine (guards, verification, timing, memory), in the worker."""
    from .sweep import sweep

    return sweep([c], progress=False, history=_HISTORY)[0]


def release() -> int:
    """In the worker: hand its cached CUDA blocks back; the bytes it still reserves."""
    import gc

    import torch

    gc.collect()
    if not torch.cuda.is_initialized():
        return 0
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_reserved())


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _arch() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@dataclasses.dataclass(frozen=True)
class Machine:
    """What gpu_check asks of the machine. ``ceilings``, ``measure``, ``release`` and
    ``compile`` run in child processes, so they are module-level functions (tests give
    fakes of their own)."""

    has_gpu: Callable[[], bool] = _has_gpu
    arch: Callable[[], int] = _arch
    environment: Callable[[], dict] = environment
    launch_checks: Callable[..., dict] = launch_checks  # (folder, timeout_s=...)
    ceilings: Callable[[], dict] = ceilings
    measure: Callable[[BenchConfig], dict] = measure_job
    release: Callable[[], int] = release
    compile: Callable = compile_one
    cores: Callable[[], int] = os.cpu_count
    tests: tuple[str, ...] = ("tests",)


# ---------------------------------------------------------------------- rows and outputs
def run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append(out: Path, row: dict, run: str, job_s: float | None = None) -> None:
    """One row into OUT/rows.csv (the engine's columns, then :data:`RUN_COLUMNS`)."""
    from .results import columns
    from .tables import append_row

    path = out / ROWS
    if not path.is_file() or not path.stat().st_size:
        path.write_text(",".join([*columns(), *RUN_COLUMNS]) + "\n")
    append_row(path, {**row, "run": run, "job_s": "" if job_s is None else round(job_s, 3)})


def _unmeasured(c: BenchConfig, reason: str, status: str = "skipped", kind: str = "time") -> dict:
    """The row of a job that gave no row of its own (complete as planned: device="cuda"
    needs no resolving)."""
    from .results import unmeasured

    return unmeasured(c, status, kind, reason)


def _series(c: BenchConfig) -> str:
    """A job's series: its stage and everything but n."""
    return c.study + _same(dataclasses.replace(c, seq_len=0))


@dataclasses.dataclass
class Run:
    """What a run carries from stage to stage."""

    out: Path
    scratch: Path
    machine: Machine
    id: str
    worker: Worker
    down: dict = dataclasses.field(default_factory=dict)  # impl -> why its check failed
    done: dict = dataclasses.field(default_factory=dict)  # identity -> run, ok rows of earlier runs
    stopped: dict = dataclasses.field(default_factory=dict)  # series -> n of a job stopped at its limit
    calibration: list = dataclasses.field(default_factory=list)
    notes: dict = dataclasses.field(default_factory=dict)  # headline facts for the summary

    def calibrate(self, stage: str, job: str, key: str = "", **measured: float | None) -> None:
        """One row of OUT/calibration.csv; ``measured``: job_s, first_call_s, count, cpu_s."""
        self.calibration.append(dict(stage=stage, job=job, key=key, **measured))


def run_stage(stage: str, jobs: list[Job], run: Run, deadline: float) -> None:
    """Measure ``jobs`` in the worker by ``deadline``: each job's limit is what the
    stage has left (at most its own ``job_timeout_s``); one still running then is
    killed with its worker and becomes a ``skipped`` row, and so does every job the
    stage has no time left for."""
    from .results import base_row, identity

    for i, job in enumerate(jobs, 1):
        c = dataclasses.replace(job.config, results_dir=str(run.scratch / "engine"))
        label = _label(c)
        earlier = run.done and run.done.get(identity(base_row(c)))
        if earlier:
            log.info("  [%d/%d] %s already measured (run %s)", i, len(jobs), label, earlier)
            continue
        left = deadline - time.time()
        t0 = time.perf_counter()
        stopped_at = run.stopped.get(_series(c))
        if left < 1:
            row = _unmeasured(c, f"over the time budget: gpu_check's {stage} stage ran out of time")
        elif c.impl in run.down:
            row = _unmeasured(c, f"unavailable: the environment check failed: {run.down[c.impl]}", kind="unavailable")
        elif stopped_at is not None and stopped_at <= c.seq_len:
            # as the engine's guard does, which a killed worker's successor cannot know
            row = _unmeasured(c, f"over the time budget: already stopped at its limit at seq_len={stopped_at}")
        else:
            c = dataclasses.replace(c, job_timeout_s=max(1.0, min(c.job_timeout_s, left)))
            starts = run.worker.starts
            try:
                row = run.worker.call(run.machine.measure, c, timeout=c.job_timeout_s)
            except Stopped:
                run.stopped[_series(c)] = c.seq_len
                took = time.perf_counter() - t0
                row = _unmeasured(c, f"over the time budget: stopped by gpu_check after {took:.0f} s (its limit: "
                                  f"what the {stage} stage had left, at most job_timeout_s)")  # fmt: skip
            except Died as e:
                row = _unmeasured(c, f"{e} (a crash; a new worker takes the next job)", status="error", kind="error")
            job_s = time.perf_counter() - t0
            if run.worker.starts > starts:
                log.info("  (a new worker process started for this job)")
            first = number(row.get("first_call_ms"))
            run.calibrate(stage, job_name(c), compile_key(c), job_s=round(job_s, 2),
                          first_call_s=None if first is None else round(first / 1e3, 2))  # fmt: skip
        job_s = time.perf_counter() - t0
        append(run.out, row, run.id, job_s)
        t = row.get("time_ms_median")
        log.info("  [%d/%d] %s %-7s %6.1f s %10s %s", i, len(jobs), label, row["status"], job_s,
                 f"{float(t):.3f} ms" if t not in (None, "") else "", str(row["reason"] or "")[:160])  # fmt: skip
        if row["status"] == "error" and any(f in str(row["reason"]).lower() for f in CUDA_FAULTS):
            run.worker.stop()
            log.error("  CUDA error in %s: the worker's GPU context is unusable; a new one takes the next job", c.impl)


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


def run_tests(folder: Path, limit_s: float, workers: int, paths: Iterable[str] = ("tests",), device: str = "cuda",
              grace_s: float = 5.0, marks: str = "", name: str = "tests") -> dict:  # fmt: skip
    """The suite (``marks``: a ``-m`` expression) on ``device``, with ``workers``
    pytest-xdist processes (``--dist loadgroup``: tests/conftest.py groups Triton's tests
    by head_dim and dtype, so one worker compiles each kernel set); ``folder/<name>.xml``
    and ``folder/<name>.log``. At ``limit_s`` it is interrupted, which still writes the
    JUnit file of what ran (killed ``grace_s`` later if it has not ended)."""
    env = dict(os.environ, ATTNBENCH_TEST_DEVICE=device)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("TRITON_INTERPRET", None)
    xml = folder / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, "--tb=short",
           "--continue-on-collection-errors", f"--junitxml={xml}"]  # fmt: skip
    cmd += ["-m", marks] if marks else []
    if workers > 1 and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(workers), "--dist", "loadgroup"]
        # each worker's inductor compiles with a share of the cores, not all of them
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 2) // workers)))
    elif workers > 1:
        log.warning("  pytest-xdist is not installed: the tests run in one process")
    log.info("  $ %s", " ".join(cmd[1:]))
    t0 = time.time()
    with open(folder / f"{name}.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=sigint_default)  # fmt: skip
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
    log.info("  %s: exit %s after %.0f s: %s", name, rc, time.time() - t0, summary)
    for line in failed:
        log.info("    FAILED %s", line)
    return {"rc": rc, "counts": counts, "failed": failed, "stopped": stopped, "summary": summary,
            "seconds": time.time() - t0}  # fmt: skip


def merge_junit(parts: Iterable[Path], out: Path) -> None:
    """The JUnit files ``parts`` (those that exist) as one ``<testsuites>`` file."""
    merged = ET.Element("testsuites")
    for p in parts:
        if p.is_file():
            try:
                root = ET.parse(p).getroot()
            except ET.ParseError:  # cut off mid-write: nothing of it counts
                continue
            merged.extend(root.iter("testsuite") if root.tag == "testsuites" else [root])
    if len(merged):
        ET.ElementTree(merged).write(out, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------- the verdict
def _config_key(row: dict) -> tuple:
    """The identity without the machine's columns (:func:`attnbench.results.machine_columns`):
    rows from another machine are judged as well."""
    from .results import identity_columns, machine_columns, normalise

    machine = machine_columns()
    return tuple(normalise(k, row.get(k)) for k in identity_columns() if k not in machine)


_PLANNED: dict[tuple[str, str], tuple] = {}


def _planned_key(c: BenchConfig, stage: str) -> tuple:
    """The configuration columns of ``c``'s row in ``stage`` (kept: a row counts the
    pattern's pairs, which takes a while at n = 32768)."""
    from .results import base_row

    key = (_same(c), stage)
    if key not in _PLANNED:
        _PLANNED[key] = _config_key(base_row(dataclasses.replace(c, study=stage)))
    return _PLANNED[key]


def _describe(c: BenchConfig) -> str:
    return f"{c.dtype} H={c.heads} D={c.head_dim} w={c.window} d={c.dilation}{_extra(c)} n={c.seq_len} {c.mode}"


def verdict(rows: list[dict], target_rows: list[dict] | None = None) -> list[dict]:
    """The verdict from the rows alone: each correctness job of the plan (its latest
    row ok: pass, wrong: FAIL, else missing), then each target of
    ``conf/gpu_targets.csv`` by the interval rule of :func:`attnbench.stats.decide` (pass
    only when the value's whole 95% interval meets the requirement, FAIL only when the
    whole interval misses it, else inconclusive), or missing where a row it needs is
    not ok. Rows are matched on their configuration columns; the
    device and versions they carry are reported, not required to be this machine's.
    ``note`` says why a row is missing, and marks a row from an earlier run than the
    table's latest as stale."""
    target_rows = targets() if target_rows is None else target_rows
    latest: dict[tuple, dict] = {}
    for r in rows:  # appended in time order: the last one wins
        latest[_config_key(r)] = r
    last_run = max((str(r.get("run") or "") for r in rows), default="")

    def note(found: list[dict | None]) -> str:
        whys = [f"{r['impl']}: {r['status']}: {str(r.get('reason') or '')[:150]}".rstrip(": ")
                for r in found if r is not None and r["status"] != "ok"]  # fmt: skip
        old = sorted({str(r.get("run") or "") for r in found if r is not None and str(r.get("run") or "") != last_run})
        return "; ".join(whys + [f"stale: from run {o or '?'}" for o in old])

    out = []
    for c in correctness_configs(target_rows):
        r = latest.get(_planned_key(c, "correctness"))
        status = "missing" if r is None else {"ok": "pass", "wrong": "FAIL"}.get(r["status"], "missing")
        out.append({"target": f"{c.impl} correct, {_describe(c)}", "measured": "" if r is None else r["status"],
                    "required": "ok", "status": status, "note": note([r]) if r else "no row"})  # fmt: skip
    for t in target_rows:
        found = [latest.get(_planned_key(_config(t, t[k]), t["stage"])) if t[k] else None for k in ("impl", "baseline")]
        v = _value(t, found)
        status = "missing" if v is None else decide(v[1], v[2], t["op"], float(t["required"]))
        absent = [t[k] for k, r in zip(("impl", "baseline"), found) if t[k] and r is None]
        why = "; ".join(filter(None, [f"no row of {', '.join(absent)}" if absent else "", note(found)]))
        out.append({"target": f"{t['target']}, {_describe(_config(t, t['impl']))}",
                    "measured": "" if v is None else _measured(v), "required": f"{t['op']} {t['required']}",
                    "status": status, "note": why})  # fmt: skip
    return out


def _value(t: dict, found: list[dict | None]) -> tuple[float, float, float] | None:
    """Target ``t``'s measure from its rows (impl, baseline) with its 95% interval
    (:func:`attnbench.stats.ratio_interval`; a memory measure has none: low = high);
    None where a row it needs is not ok or lacks the value."""
    a, b = (r if r is not None and r["status"] == "ok" else None for r in found)
    if t["measure"] in ("speedup", "time_ratio"):
        if a is None or b is None:
            return None
        return ratio_interval(b, a) if t["measure"] == "speedup" else ratio_interval(a, b)
    ma, mb = (number(r["peak_mem_bytes"]) if r is not None else None for r in (a, b))
    if t["measure"] == "extra_memory":  # the peak over the output and two fp32 per row (a row's max and 1/sum)
        c = _config(t, t["impl"])
        mb = c.batch * c.heads * c.seq_len * (c.head_dim * c.torch_dtype().itemsize + 8)
    if not (ma and mb):
        return None
    return ma / mb, ma / mb, ma / mb


def _measured(v: tuple[float, float, float]) -> str:
    """A target's value, with its interval where it has one."""
    x, lo, hi = v
    if lo != lo:  # NaN: a row without an interval
        return f"{x:.3g} (no interval)"
    return f"{x:.3g} [{lo:.3g}, {hi:.3g}]" if hi > lo else f"{x:.3g}"


def write_verdict(folder: Path, lines: list[dict]) -> None:
    with open(folder / VERDICT, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["target", "measured", "required", "status", "note"])
        w.writeheader()
        w.writerows(lines)


def verdict_text(lines: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in lines) for s in (*VERDICTS, "missing")}
    head = (f"Verdict: {counts['pass']} pass, {counts['FAIL']} FAIL, {counts['inconclusive']} inconclusive, "
            f"{counts['missing']} missing of {len(lines)}")  # fmt: skip
    body = [f"  {r['status']:12s} {r['target'][:100]:100s} {r['measured']:>20s} {r['required']:>8s}"
            + (f"  ({r['note'][:120]})" if r["note"] and r["status"] != "pass" or "stale" in r["note"] else "")
            for r in lines]  # fmt: skip
    return "\n".join([head, *body])


def headline(rows: list[dict]) -> str:
    """The targets stage's latest rows, as the engine prints rows."""
    from .results import format_rows

    latest: dict[tuple, dict] = {}
    for r in rows:
        if r.get("study") == "targets":
            latest[_config_key(r)] = r
    return format_rows(list(latest.values())) if latest else "(no targets rows)"


def _read_rows(folder: Path) -> list[dict]:
    from .tables import read_rows

    return read_rows(folder / ROWS)


# ---------------------------------------------------------------------- reports
def write_reports(run: Run, figure_by: float | None = None) -> list[dict]:
    """From what OUT's rows say now: verdict.csv first, then calibration.csv,
    summary.md, the figure (when asked and there is time for it before ``figure_by``)
    and the archive of the rest. After every stage, and at the end."""
    rows = _read_rows(run.out)
    lines = verdict(rows)
    write_verdict(run.out, lines)
    _write_calibration(run)
    summary = [f"# gpu_check {run.id}", "", "## Verdict", "", "| status | target | measured | required | note |",
               "|---|---|---|---|---|"]  # fmt: skip
    summary += [f"| {r['status']} | {r['target']} | {r['measured']} | {r['required']} | {r['note']} |" for r in lines]
    summary += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in run.notes.items()]
    summary += ["", "## Headline (targets stage)", "", "```", headline(rows), "```", ""]
    (run.out / SUMMARY).write_text("\n".join(summary))
    if figure_by is not None:
        if time.time() + FIGURE_S <= figure_by:
            _figure(run, rows)
        else:
            log.warning("  no figure: no time left for it")
    with tarfile.open(run.out / ARCHIVE, "w:gz") as tar:
        for p in sorted(run.scratch.rglob("*")):
            if p.is_file() and "engine" not in p.relative_to(run.scratch).parts:
                tar.add(p, arcname=str(p.relative_to(run.scratch)))
    return lines


def _write_calibration(run: Run) -> None:
    from .results import device_name

    fields = ["stage", "job", "key", "count", "cpu_s", "first_call_s", "job_s", "device_name", "run"]
    with open(run.out / CALIBRATION_OUT, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in run.calibration:
            w.writerow({**r, "device_name": device_name("cuda"), "run": run.id})


def _figure(run: Run, rows: list[dict]) -> None:
    """The scaling figure: the study's shape, forward, from the scaling and targets
    stages' rows; bf16 in OUT, the others into the archive."""
    try:
        import pandas as pd

        from . import plot
        from .tables import load

        shape = {k: str(v) for k, v in SCALING.items()}
        mine = [r for r in rows if r.get("study") in ("targets", "scaling") and r.get("mode") == "fwd"
                and not r.get("global_positions") and str(r.get("causal")).lower() != "true"
                and all(str(r.get(k)) == v for k, v in shape.items())]  # fmt: skip
        if not mine:
            return
        path = run.scratch / "scaling-rows.csv"
        pd.DataFrame(mine).to_csv(path, index=False)
        figures = plot.scaling_figures(load([path]))
        figures.sort(key=lambda f: ("bf16" not in f[0], f[0]))
        for i, (slug, fig) in enumerate(figures):
            fig.savefig(run.out / FIGURE if i == 0 else run.scratch / f"scaling-{slug}.png")
        path.unlink()
    except Exception as e:  # a missing plotting library is not a failed run
        log.warning("  no figure: %s: %s", type(e).__name__, e)


# ---------------------------------------------------------------------- the command
def deadline(stage: str, stages: list[str], now: float, end: float) -> float:
    """When ``stage``, starting at ``now``, must end: the time left until ``end``
    shared by it and the stages after it in proportion to :data:`SHARE` (the last stage
    gets all of it), so that time a stage leaves passes on."""
    rest = stages[stages.index(stage) :]
    if len(rest) == 1:
        return end
    return now + (end - now) * SHARE[stage] / sum(SHARE[s] for s in rest)


def _stages(text: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    if not got or any(x not in STAGES for x in got):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(STAGES)}")
    return [x for x in STAGES if x in got]


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 60 <= v <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, from 60 to 3600")
    return v


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _procs(cores: int, flex: int) -> tuple[int, int]:
    """(Triton's compile processes, flex's) on ``cores``: flex's graphs at most one per
    4 cores (inductor compiles with threads of its own), the rest for Triton, one left
    for the worker."""
    flex_procs = min(flex, FLEX_PROCS, max(1, cores // 4))
    return max(1, cores - flex_procs - 1), flex_procs


def dry_run(stages: list[str], budget: float, workers: int, calibration: Path = CALIBRATION) -> int:
    """Print the plan in order with each job's estimate, and whether the correctness and
    target jobs (the verdict's) fit their stages' shares of ``budget``."""
    env = environment()
    calib = read_calibration(calibration)
    est = Estimator(calib)
    source = f"{calibration.name}: {len(est.jobs)} jobs measured" if est.jobs else "no measured jobs to calibrate"
    print(f"gpu_check plan for {budget:.0f} s (H100-class estimates from the model and {source}; this machine: "
          f"{'a CUDA GPU' if env.get('gpu') else 'no GPU'})")  # fmt: skip
    for name, problem in env["checks"].items():
        print(f"  check {name}: {problem or 'ok'}")
    jobs = plan(stages, budget)
    flex = flex_warmups(jobs)
    try:
        compiles = list(triton_compiles(triton_warmups(jobs)))
    except ImportError as e:
        compiles = []
        print(f"  (no Triton here: {e}; its compiles are not counted)")
    cores = (os.cpu_count() or 16) if env.get("gpu") else 16  # without a GPU: the H100 host's
    warm_s, what = est.warmup(compiles, flex, cores)
    prep = PREP_SHARE * budget
    now = min(max(warm_s, 10.0), prep)
    end = budget - RESERVE_S
    print(f"  set-up (environment, launch check, ceilings) and warm-up, at most {prep:.0f} s: ~{now:.0f} s")
    print(f"    warm-up: {what}" + ("; it would be cut: the jobs compile the rest" if warm_s > prep else ""))
    fits, must, must_s = True, 0, 0.0
    for stage in stages:
        d = deadline(stage, stages, now, end)
        mine = [j for j in jobs if j.stage == stage]
        if stage in ("gpu-tests", "tests"):
            how = f"pytest -n {workers if stage == 'tests' else min(3, workers)}" if importlib.util.find_spec(
                "xdist") else "pytest, one process"  # fmt: skip
            marks = "-m gpu" if stage == "gpu-tests" else "-m 'not gpu'"
            t = (est.jobs.get((stage, "pytest " + marks)) or GPU_TESTS_S) if stage == "gpu-tests" else d - now
            print(
                f"  {stage} (until +{d:.0f} s): {how} {marks}: ~{min(t, d - now):.0f} s"
                + (" (what is left)" if stage == "tests" else "")
            )
            now = min(now + t, d)
            continue
        times = [est.job(j) for j in mine]
        total = sum(t for t, _ in times)
        cut = 0
        clock = now
        for t, _ in times:
            clock += t
            cut += clock > d
        print(f"  {stage} (until +{d:.0f} s; ~{total:.0f} s for {len(mine)} jobs"
              + (f", {cut} would be cut" if cut else "") + "):")  # fmt: skip
        for i, (j, (t, src)) in enumerate(zip(mine, times), 1):
            print(f"    {i:3d} {_label(j.config)} ~{t:5.1f} s{' (measured)' if src == 'measured' else ''}")
        if stage in MUST_FIT:
            fits &= cut == 0
            must += len(mine)
            must_s += total
        now = min(now + total, d)
    verdict_rows = len(correctness_configs(targets())) + len(targets())
    if fits:
        print(f"  fits: all {must} correctness and target jobs ({verdict_rows} verdict rows) are scheduled within "
              f"their stages, ~{must_s:.0f} s; the run ends by {budget:.0f} s")  # fmt: skip
    else:
        print(f"  does NOT fit: some correctness or target jobs would be cut in {budget:.0f} s")
    return 0


def _process_start() -> float:
    """When this process started, on ``time.time()``'s clock (from /proc; now where it
    cannot be read): the budget counts from there."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return min(time.time(), boot + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def verdict_only(folder: Path) -> int:
    """The verdict of ``folder``'s rows.csv, printed, and into folder/verdict.csv where
    the folder is writable."""
    if not (folder / ROWS).is_file():
        print(f"gpu_check: --verdict-only {folder}: no {ROWS} there (the folder a run wrote)", file=sys.stderr)
        return 2
    rows = _read_rows(folder)
    lines = verdict(rows)
    if os.access(folder, os.W_OK) and (not (folder / VERDICT).exists() or os.access(folder / VERDICT, os.W_OK)):
        write_verdict(folder, lines)
        where = f"written to {folder / VERDICT}"
    else:
        where = f"not written: {folder} is read-only"
    print(headline(rows))
    print(verdict_text(lines))
    print(f"({len(rows)} rows of {folder / ROWS}; {where})")
    return 0


def main(argv: list[str] | None = None, machine: Machine | None = None) -> int:
    t0 = _process_start()
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="The GPU verdict in one bounded command: set-up and a parallel warm-up of the kernels, then "
        "triton and cupy verified (global tokens, causal), the targets of conf/gpu_targets.csv, the GPU-only tests, "
        "the scaling study and the test suite; the verdict on every target, from the rows alone.",
    )
    ap.add_argument("outdir", nargs="?", default="gpu-check", help="where the (at most 8) files go")
    ap.add_argument("--dry-run", action="store_true", help="print the ordered plan and its estimate; no GPU needed")
    ap.add_argument("--verdict-only", action="store_true", help="recompute OUTDIR's verdict from its rows.csv")
    ap.add_argument("--stages", type=_stages, default=list(STAGES), help=f"from {','.join(STAGES)} (default: all)")
    ap.add_argument(
        "--budget", type=_budget, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S:.0f})"
    )
    ap.add_argument("--workers", type=int, default=_workers(), help="pytest-xdist workers (default: cores / 2, <= 8)")
    ap.add_argument("--calibration", type=Path, default=CALIBRATION, help="the dry run's calibration table")
    a = ap.parse_args(argv)
    try:
        if a.verdict_only:
            return verdict_only(Path(a.outdir))
        if a.dry_run:
            return dry_run(a.stages, a.budget, a.workers, a.calibration)
        return _command(a, machine or Machine(), t0)
    except BadInput as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2


def _command(a: argparse.Namespace, machine: Machine, t0: float) -> int:
    if not machine.has_gpu():
        print("gpu_check: no CUDA device here (--dry-run prints the plan without one; --verdict-only needs none)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(a.outdir)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES) if out.is_dir() else []
    if foreign:
        print(f"gpu_check: {out}: holds files gpu_check does not write ({', '.join(foreign[:5])}); "
              "choose an empty or new folder", file=sys.stderr)  # fmt: skip
        return 2
    jobs = plan(a.stages, a.budget)  # the targets file is read (and checked) before anything is written
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    # the console gets this module's lines; log.txt every attnbench line of this process
    handlers = [(log, logging.StreamHandler(sys.stdout)), (logging.getLogger("attnbench"),
                logging.FileHandler(out / LOG))]  # fmt: skip
    for logger, h in handlers:
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
    run = Run(out, scratch, machine, run_id(), Worker(str(scratch / "worker.log")))
    try:
        return _run(a, run, jobs, t0)
    finally:
        run.worker.stop()
        for logger, h in handlers:
            logger.removeHandler(h)
            h.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _resume(run: Run) -> None:
    """Rows of earlier runs in OUT: what they measured ok is not measured again."""
    from .results import identity

    earlier = _read_rows(run.out) if (run.out / ROWS).is_file() else []
    run.done = {identity(r): r.get("run") or "?" for r in earlier if r.get("status") == "ok"}
    if earlier:
        log.info("  %s holds %d rows of earlier runs: %d ok measurements are kept, not measured again (their "
                 "verdict rows are marked stale)", run.out / ROWS, len(earlier), len(run.done))  # fmt: skip


def _prepare(a: argparse.Namespace, run: Run, jobs: list[Job], t0: float) -> None:
    """The set-up beside the warm-up, all bounded by the preparation's share of the
    budget: the environment, the launch check (a child), the worker's start and the
    ceilings (in it), Triton's compiles (a pool), flex's graphs (GPU processes)."""
    m, prep_end = run.machine, t0 + PREP_SHARE * a.budget
    env = m.environment()
    results: dict = {}
    flex = [dataclasses.replace(c, results_dir=str(run.scratch / "engine")) for c in flex_warmups(jobs)]
    cores = m.cores() or 2
    procs, flex_procs = _procs(cores, len(flex))

    def checks() -> None:
        results["launch"] = m.launch_checks(run.scratch, timeout_s=max(5.0, prep_end - time.time()))

    def ceilings() -> None:
        try:
            results["worker_start_s"] = run.worker.start(prep_end - time.time())
            t = time.perf_counter()
            results["ceilings"] = run.worker.call(m.ceilings, timeout=prep_end - time.time())
            results["ceilings_s"] = time.perf_counter() - t
        except (Stopped, Died) as e:
            results["ceilings"] = e
        except Exception as e:  # the worker's GPU may be unusable now: start a new one
            run.worker.stop()
            results["ceilings"] = e

    def triton() -> None:
        t = time.perf_counter()
        try:  # listed while the first ones compile
            done = run_pool(functools.partial(m.compile, arch=m.arch()), triton_compiles(triton_warmups(jobs)),
                            procs, prep_end, str(run.scratch / "warmup.log"))  # fmt: skip
        except Exception as e:  # no triton, or the launch code changed: jobs compile as they go
            results["triton"] = f"not planned: {type(e).__name__}: {e}"
            return
        results["triton"] = (done, time.perf_counter() - t)

    def graphs() -> None:
        t = time.perf_counter()
        done = run_pool(m.measure, flex, flex_procs, prep_end, str(run.scratch / "warmup.log"))
        results["flex"] = (done, time.perf_counter() - t)

    log.info("== set-up and warm-up (until %+.0f s)", prep_end - t0)
    started = time.time()
    threads = [threading.Thread(target=f, daemon=True) for f in (checks, ceilings, triton, graphs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=max(0.0, prep_end + 5 - time.time()))
    log.info("  set-up and warm-up took %.1f s", time.time() - started)
    env["checks"].update(results.get("launch") or {"Triton launch": "no result", "CuPy compile": "no result"})
    for k, v in env.items():
        log.info("  %s: %s", k, v)
    for check, problem in env["checks"].items():
        for impl in CHECK_IMPLS.get(check, ()) if problem else ():
            run.down.setdefault(impl, f"{check}: {problem}")
    ceil = results.get("ceilings")
    if isinstance(ceil, dict):
        env.update(ceil)
        run.notes["ceilings"] = (f"bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s; copy {ceil['copy_gbs']:.0f} "
                                 "GB/s (read + write)")  # fmt: skip
        log.info("  ceilings: %s", run.notes["ceilings"])
    else:
        log.error("  ceilings failed: %s", ceil)
    run.calibrate("set-up", "worker start", job_s=_round(results.get("worker_start_s")))
    run.calibrate("set-up", "ceilings", job_s=_round(results.get("ceilings_s")))
    _log_warmup(run, results, procs)
    run.notes["device"] = env.get("gpu", "?")
    run.notes["versions"] = ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "cuda", "triton", "cupy"))
    (run.scratch / "environment.json").write_text(json.dumps(env, indent=2, default=str))


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _log_warmup(run: Run, results: dict, procs: int) -> None:
    tri = results.get("triton")
    if isinstance(tri, tuple):
        done, wall = tri
        ok = [(task, s) for task, r, s in done if s is not None]
        failed = [(task, r) for task, r, s in done if isinstance(r, Exception)]
        left = sum(s is None and not isinstance(r, Exception) for _, r, s in done)
        cpu = sum(s for _, s in ok)
        what = (f"{len(ok)} of {len(done)} kernel binaries compiled in {wall:.1f} s on {procs} processes "
                f"({cpu:.0f} s of compiling)")  # fmt: skip
        what += f"; {left} left to the jobs (the warm-up's limit)" if left else ""
        what += f"; {len(failed)} failed (the autotuner skips them)" if failed else ""
        log.info("  Triton warm-up: %s", what)
        for task, e in failed[:3]:
            log.info("    %s %s: %s", task.kernel, task.group, str(e).splitlines()[0][:200] if str(e) else type(e))
        run.notes["Triton warm-up"] = what
        groups: dict[str, list] = {}
        for task, s in ok:
            g = groups.setdefault(task.group, [0, 0.0])
            g[0] += 1
            g[1] += s
        for group, (n, s) in groups.items():
            run.calibrate("warm-up", f"triton compiles {group}", f"triton {group}", count=n, cpu_s=round(s, 1),
                          job_s=round(wall, 1))  # fmt: skip
    elif tri:
        log.warning("  Triton warm-up: %s", tri)
        run.notes["Triton warm-up"] = tri
    flex = results.get("flex")
    if flex:
        done, wall = flex
        for c, row, s in done:
            first = number(row.get("first_call_ms")) if isinstance(row, dict) else None
            run.calibrate("warm-up", job_name(c), compile_key(c), job_s=_round(s),
                          first_call_s=_round(first / 1e3 if first else None))  # fmt: skip
        ok = sum(isinstance(r, dict) and r.get("status") == "ok" for _, r, _ in done)
        what = f"{ok} of {len(done)} shapes' graphs compiled in {wall:.1f} s"
        log.info("  flex warm-up: %s", what)
        run.notes["flex warm-up"] = what


def _run(a: argparse.Namespace, run: Run, jobs: list[Job], t0: float) -> int:
    end = t0 + a.budget - RESERVE_S
    log.info("gpu_check run %s: budget %.0f s (ends by %+.0f s), stages %s", run.id, a.budget, a.budget,
             ", ".join(a.stages))  # fmt: skip
    _resume(run)
    (run.scratch / "gpu_targets.csv").write_bytes(TARGETS.read_bytes())
    _prepare(a, run, jobs, t0)
    write_reports(run)
    tests: list[Path] = []
    for stage in a.stages:
        d = deadline(stage, a.stages, time.time(), end)
        log.info("== %s (until %+.0f s)", stage, d - t0)
        t = time.perf_counter()
        if stage in MEASURING:
            run_stage(stage, [j for j in jobs if j.stage == stage], run, d)
        else:
            _test_stage(stage, run, d, a.workers, tests)
        run.notes[f"{stage} stage"] = f"{time.perf_counter() - t:.0f} s"
        write_reports(run)
    run.worker.stop()
    run.notes["measured and tested in"] = f"{time.time() - t0:.0f} s of a {a.budget:.0f} s budget"
    lines = write_reports(run, figure_by=t0 + a.budget)
    rows = _read_rows(run.out)
    log.info("== done in %.0f s (budget %.0f s); %s: %s", time.time() - t0, a.budget, run.out,
             ", ".join(sorted(p.name for p in run.out.iterdir())))  # fmt: skip
    log.info("\n%s\n\n%s", headline(rows), verdict_text(lines))
    return 0


def _test_stage(stage: str, run: Run, d: float, workers: int, parts: list[Path]) -> None:
    """``pytest -m gpu`` (beside the worker, which hands back its cached CUDA blocks
    first) or the rest of the suite (the worker stopped: the suite has the GPU to
    itself), until ``d``; its JUnit file joins OUT/tests.xml."""
    gpu = stage == "gpu-tests"
    if not gpu:
        run.worker.stop()
        import torch

        held = torch.cuda.memory_reserved() if torch.cuda.is_initialized() else 0
        log.info("  the worker is stopped; this process holds %d B of CUDA memory: the GPU is the suite's", held)
    elif run.worker.alive:
        try:
            held = run.worker.call(run.machine.release, timeout=max(1.0, min(10.0, d - time.time())))
            log.info("  the worker handed back its cached CUDA blocks (%.1f GiB still reserved)", held / 2**30)
        except (Stopped, Died):
            pass
    if d - time.time() < 3:
        run.notes[stage] = "not run: no time left"
        log.info("  not run: no time left")
        return
    res = run_tests(run.scratch, d - time.time(), min(3, workers) if gpu else workers, paths=run.machine.tests,
                    marks="gpu" if gpu else "not gpu", name=stage)  # fmt: skip
    parts.append(run.scratch / f"{stage}.xml")
    merge_junit(parts, run.out / TESTS_XML)
    run.notes[stage] = res["summary"]
    run.calibrate(stage, f"pytest -m {'gpu' if gpu else repr('not gpu')}", job_s=round(res["seconds"], 1))


if __name__ == "__main__":
    raise SystemExit(main())
