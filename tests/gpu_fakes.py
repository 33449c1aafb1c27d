"""A GPU machine faked for gpu_check on the CPU: an H100's name and library versions,
jobs that take milliseconds, compiles that take none, and, as told by environment
variables, jobs that hang or crash.

Run as a script, it is the whole command on that machine::

    python tests/gpu_fakes.py OUT [gpu_check options]

``ATTNBENCH_FAKE_HANG`` and ``ATTNBENCH_FAKE_CRASH`` name jobs (``impl:mode:stage``,
comma-separated; a part left empty matches anything) that sleep for an hour or kill
their worker; ``ATTNBENCH_FAKE_TESTS`` gives the paths the test stages run
(``os.pathsep``-separated). The children gpu_check starts import this module as their
main one (multiprocessing's spawn), so they measure with the same fakes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attnbench.results  # noqa: E402
from attnbench import gpu_check  # noqa: E402
from attnbench.config import BenchConfig  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
VERSIONS = {"torch_version": "2.11.0+cu130", "triton_version": "3.6.0", "cupy_version": "14.2.0"}
#: forward milliseconds at the targets' sizes: every target passes
MS = {"triton": 1.0, "flex": 1.6, "cupy": 2.0, "chunked": 5.0}
# the rows this process writes for skipped jobs name the faked device too
attnbench.results.device_name = lambda device: H100 if device == "cuda" else "cpu"


def _named(var: str, c: BenchConfig) -> bool:
    for item in filter(None, os.environ.get(var, "").split(",")):
        want = (item.split(":") + ["", ""])[:3]
        if all(w in ("", got) for w, got in zip(want, (c.impl, c.mode, c.study))):
            return True
    return False


def measure(c: BenchConfig) -> dict:
    """A job's row: ok, with times that pass every target, an H100 and its versions."""
    if _named("ATTNBENCH_FAKE_CRASH", c):
        os._exit(3)
    if _named("ATTNBENCH_FAKE_HANG", c):
        time.sleep(3600)
    row = attnbench.results.base_row(c)
    out = c.batch * c.heads * c.seq_len * (c.head_dim * c.torch_dtype().itemsize + 4)  # the output and LSE
    ms = MS.get(c.impl, 3.0) * (3.5 if c.mode != "fwd" else 1.0) * c.seq_len / 32768
    peak = {"triton": out, "cupy": 2 * out, "chunked": 6 * out}.get(c.impl, 4 * out)
    row.update(VERSIONS, device_name=H100, status="ok", time_ms_median=ms, peak_mem_bytes=peak, first_call_ms=5.0,
               verified="rows (32)", timer="do_bench")  # fmt: skip
    if row["flops"]:
        row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
    time.sleep(0.01)
    return row


def ceilings() -> dict:
    return {"bf16_matmul_tflops": 790.0, "copy_gbs": 3000.0}


def release() -> int:
    return 0


def compile_task(task, arch: int) -> float:
    time.sleep(0.002)
    return 0.002


def environment() -> dict:
    return {"python": "3.12.3", "torch": VERSIONS["torch_version"], "cuda": "13.0", "triton": "3.6.0",
            "cupy": "14.2.0", "gpu": H100, "sms": 132, "checks": {"C compiler": "", "Python headers": ""}}  # fmt: skip


def launch_checks(folder: Path, timeout_s: float = 60.0) -> dict:
    return {"Triton launch": "", "CuPy compile": ""}


FAKE = gpu_check.Machine(
    has_gpu=lambda: True,
    arch=lambda: 90,
    environment=environment,
    launch_checks=launch_checks,
    ceilings=ceilings,
    measure=measure,
    release=release,
    compile=compile_task,
    cores=lambda: 2,
    tests=tuple(filter(None, os.environ.get("ATTNBENCH_FAKE_TESTS", "").split(os.pathsep))) or ("tests",),
)


if __name__ == "__main__":
    raise SystemExit(gpu_check.main(sys.argv[1:], machine=FAKE))
