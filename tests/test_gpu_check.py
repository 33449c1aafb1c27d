"""gpu_check's Python parts, without a GPU: the plan and the dry run."""

from __future__ import annotations

import subprocess
import sys

import attnbench
from attnbench import gpu_check


def test_plan_covers_every_available_impl_and_length():
    configs = gpu_check.plan()
    avail = {n for n in attnbench.list_impls() if attnbench.get_impl(n).unavailable_reason() is None}
    assert {c.impl for c in configs} == avail
    assert sorted({c.seq_len for c in configs}) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert {c.dtype for c in configs} == {"bf16", "fp32"}
    bwd = [c for c in configs if c.mode == "fwd_bwd"]
    assert bwd and all(c.seq_len == 32768 for c in bwd)
    for c in configs:
        assert c.device == "cuda" and (c.heads, c.head_dim, c.window) == (12, 64, 512)
        c.pattern().validate(c.seq_len, c.heads)


def test_dry_run_prints_the_plan():
    r = subprocess.run(
        [sys.executable, "-m", "attnbench.gpu_check", "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "scaling configurations" in r.stdout and "chunked" in r.stdout and "stages:" in r.stdout


def test_no_gpu_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "attnbench.gpu_check", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
