"""The profiled call: its artefacts, its categories, and that it never overlaps a timed call."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import attnbench
from attnbench.config import BenchConfig
from attnbench.plot import write_figure
from attnbench.profile import CATEGORIES, _cuda_timeline, category
from attnbench.sweep import measure
from attnbench.tables import append_row

TINY = dict(window=8, heads=2, head_dim=16, device="cpu", time_budget_s=0.05, min_reps=2, max_reps=4, isolate=False)


def cfg(tmp_path, **kw) -> BenchConfig:
    return BenchConfig(**{**TINY, "results_dir": str(tmp_path), "study": "p", "profile": True, **kw})


@pytest.mark.parametrize(
    "name, want",
    [
        ("aten::bmm", "matrix multiply"),
        ("aten::matmul", "matrix multiply"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", "matrix multiply"),
        ("aten::_softmax", "softmax and exp"),
        ("aten::masked_fill_", "masking and elementwise"),
        ("aten::bitwise_and", "masking and elementwise"),
        ("aten::copy_", "copy, index and layout"),
        ("aten::cat", "copy, index and layout"),
        ("aten::index_select", "copy, index and layout"),
        ("## Call CompiledFxGraph fkhysneay4qb", "fused kernel"),
        ("attnbench::triton_longformer_fwd", "fused kernel"),
        ("band_qk<float>", "fused kernel"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "fused kernel"),
        ("aten::scaled_dot_product_attention", "fused kernel"),
        ("attnbench::call", "outside operators"),
        ("aten::some_new_op", "other"),
    ],
)
def test_category_of_an_operator(name, want):
    assert category(name) == want and want in CATEGORIES


def test_a_profiled_row_leaves_trace_ops_and_memory(tmp_path):
    row = measure(cfg(tmp_path, impl="chunked", seq_len=256, global_tokens=[0]))
    assert row["status"] == "ok", row["reason"]
    folder = Path(row["profile"])
    assert folder.parent == tmp_path / "profiles" / "p"
    with gzip.open(folder / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"]
    ops = pd.read_csv(folder / "ops.csv")
    assert list(ops.columns) == ["operator", "category", "calls", "self_ms", "percent", "self_memory_bytes"]
    assert ops["percent"].sum() == pytest.approx(100, abs=0.5)
    named = ops.loc[ops["category"] != "other", "percent"].sum()
    assert named >= 90, ops[ops["category"] == "other"]
    assert (folder / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_timed_call_runs_under_the_profiler(tmp_path, throwaway):
    seen = []

    def watched(q, k, v, p, s):
        seen.append(torch.autograd.profiler._is_profiler_enabled)
        return attnbench.get_impl("naive").fn(q, k, v, p, s)

    throwaway("watched", watched)
    row = measure(cfg(tmp_path, impl="watched", seq_len=64))
    assert row["status"] == "ok", row["reason"]
    assert seen[-1] is True and not any(seen[:-1]), seen  # the profiled call is the last, on its own
    assert len(seen) == 1 + 1 + row["n_timed"] + 1 + 1  # first call, warm-up, timed calls, memory, profile
    seen.clear()
    assert measure(cfg(tmp_path, impl="watched", seq_len=64, profile=False))["profile"] is None
    assert not any(seen)


def test_breakdown_of_several_implementations(tmp_path):
    """Profiled rows of two implementations in a table: figure=auto draws their breakdown."""
    for impl in ("naive", "chunked"):
        append_row(tmp_path / "p.csv", measure(cfg(tmp_path, impl=impl, seq_len=128)))
    csv_path, png = write_figure("auto", tmp_path / "p.csv")
    assert csv_path == tmp_path / "p-breakdown.csv"
    table = pd.read_csv(csv_path)
    assert set(table["impl"]) == {"naive", "chunked"} and set(table["category"]) == set(CATEGORIES)
    for _, sub in table.groupby("impl"):
        assert sub["percent"].sum() == pytest.approx(100, abs=0.5)
    assert png.name == "p-breakdown.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_the_breakdown_command_line(tmp_path):
    """python -m attnbench.plot TABLE --figure breakdown draws the breakdown again; a
    table without profiled rows is one line and status 2."""
    append_row(tmp_path / "p.csv", measure(cfg(tmp_path, impl="chunked", seq_len=64)))
    append_row(tmp_path / "q.csv", measure(cfg(tmp_path, impl="chunked", seq_len=64, profile=False)))
    run = [sys.executable, "-m", "attnbench.plot", "--figure", "breakdown"]
    r = subprocess.run([*run, str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "p-breakdown.csv"), str(tmp_path / "p-breakdown.png")]
    peaks = pd.read_csv(tmp_path / "p-breakdown.csv", dtype=str)["peak_mem_bytes"]
    assert peaks.str.fullmatch(r"\d+").all(), list(peaks)  # whole bytes, as the table has them
    r = subprocess.run([*run, str(tmp_path / "q.csv")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("no profiled rows (measure with profile=true)"), r.stderr
    r = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "python -m attnbench.plot" in r.stdout and "breakdown" in r.stdout


def test_cuda_memory_timeline_from_a_snapshot():
    snapshot = {"device_traces": [[
        {"action": "alloc", "size": 100, "time_us": 10},
        {"action": "alloc", "size": 50, "time_us": 20},
        {"action": "free_requested", "size": 100, "time_us": 25},
        {"action": "free_completed", "size": 100, "time_us": 30},
    ]]}  # fmt: skip
    times, used = _cuda_timeline(snapshot)
    assert used == [100, 150, 50] and times == pytest.approx([0.0, 1e-5, 2e-5])
