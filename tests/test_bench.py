"""The benchmark engine and its command line."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnbench
from attnbench import Pattern
from attnbench import registry as reg
from attnbench.bench import COLUMNS, BenchConfig, measure, read_rows, sweep

ROOT = Path(__file__).resolve().parent.parent
needs_hydra = pytest.mark.skipif(
    importlib.util.find_spec("hydra") is None, reason="hydra-core is not installed: the command line needs it"
)
TINY = dict(seq_len=64, window=8, heads=2, head_dim=16, device="cpu", time_budget_s=0.05, min_reps=2, max_reps=5)


def cfg(tmp_path, **kw) -> BenchConfig:
    base = dict(TINY, results_dir=str(tmp_path), study="t", isolate=False)
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture
def throwaway():
    names = []

    def add(name, fn, **kw):
        names.append(name)
        attnbench.register(name, features=reg.FEATURES, **kw)(fn)

    yield add
    for n in names:
        reg.unregister(n)


def test_ok_row_has_every_column_and_true_flops(tmp_path):
    row = measure(cfg(tmp_path, impl="chunked", global_tokens=(0,)))
    assert row["status"] == "ok", row["reason"]
    assert set(COLUMNS) <= set(row)
    assert row["verified"] == "exact" and row["max_abs_err"] < 1e-4
    assert row["n_timed"] >= 2 and 0 < row["time_ms_min"] <= row["time_ms_median"]
    assert row["flops"] == 4 * 16 * Pattern(8, global_tokens=(0,)).pairs(64, 2) * 1
    assert row["peak_mem_bytes"] >= 0 and row["first_call_ms"] > 0


def test_wrong_result_gets_no_time(tmp_path, throwaway):
    throwaway("off_by_a_bit", lambda q, k, v, p, s: q * 0.5)
    row = measure(cfg(tmp_path, impl="off_by_a_bit"))
    assert row["status"] == "wrong" and "max abs error" in row["reason"]
    assert row["time_ms_median"] is None and row["peak_mem_bytes"] is None


def test_wrong_gradient_is_caught(tmp_path, throwaway):
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def fn(q, k, v, p, s):
        out = attnbench.get_impl("naive").fn(q, k, v, p, s)
        return BadGrad.apply(out)

    throwaway("bad_grad", fn)
    row = measure(cfg(tmp_path, impl="bad_grad", mode="fwd_bwd"))
    assert row["status"] == "wrong" and "gradient" in row["reason"]


def test_error_and_oom_are_rows(tmp_path, throwaway):
    def boom(q, k, v, p, s):
        raise RuntimeError("kernel exploded")

    def oom(q, k, v, p, s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    throwaway("boom", boom)
    throwaway("oomer", oom)
    configs = [cfg(tmp_path, impl="boom"), cfg(tmp_path, impl="oomer"), cfg(tmp_path, impl="chunked")]
    rows = sweep(configs, progress=False)
    assert [r["status"] for r in rows] == ["error", "oom", "ok"]  # the sweep survived both
    assert "kernel exploded" in rows[0]["reason"]
    assert len(read_rows(tmp_path / "t.csv")) == 3


def test_unsupported_and_unavailable_are_skipped_with_reasons(tmp_path, throwaway):
    attnbench.register("no_dilation", features=("backward",))(lambda q, k, v, p, s: q)
    try:
        row = measure(cfg(tmp_path, impl="no_dilation", dilation=2, causal=True))
        assert row["status"] == "skipped"
        assert "feature 'dilation' not supported" in row["reason"] and "'causal'" in row["reason"]
    finally:
        reg.unregister("no_dilation")
    throwaway("missing_pkg", lambda q, k, v, p, s: q, probe=lambda: "needs the 'zzz' package (not installed)")
    row = measure(cfg(tmp_path, impl="missing_pkg"))
    assert row["status"] == "skipped" and row["reason"].startswith("unavailable: needs the 'zzz'")


def test_memory_guard_skips_naive_at_32k(tmp_path):
    row = measure(cfg(tmp_path, impl="naive", seq_len=32768, heads=12, head_dim=64, window=512, mem_budget_gb=20))
    assert row["status"] == "skipped"
    assert row["reason"].startswith("over the memory budget: needs ~") and "GiB" in row["reason"]
    assert row["mem_estimate_bytes"] > 12 * 32768**2 * 4


def test_hang_is_stopped_and_recorded(tmp_path):
    # loop at this size takes far longer than the 4 s allowed: the child is stopped
    row = measure(
        cfg(tmp_path, impl="loop", seq_len=16384, heads=12, window=512, head_dim=64, isolate=True, job_timeout_s=4)
    )
    assert row["status"] == "skipped" and "over the time budget" in row["reason"]


def test_peak_memory_is_real(tmp_path):
    """naive at n=2048 fp32 holds at least one (B, H, n, n) fp32 score tensor; chunked far less."""
    common = dict(seq_len=2048, heads=12, head_dim=64, window=64, dtype="fp32", isolate=True, max_reps=1, min_reps=1)
    naive = measure(cfg(tmp_path, impl="naive", **common))
    chunked = measure(cfg(tmp_path, impl="chunked", **common))
    assert naive["status"] == chunked["status"] == "ok", (naive["reason"], chunked["reason"])
    assert naive["peak_mem_bytes"] >= 1 * 12 * 2048**2 * 4
    assert chunked["peak_mem_bytes"] * 5 < naive["peak_mem_bytes"]


def test_resume_skips_what_is_done(tmp_path):
    configs = [cfg(tmp_path, impl="chunked", seq_len=n) for n in (32, 48)]
    assert len(sweep(configs, progress=False)) == 2
    assert sweep(configs + [cfg(tmp_path, impl="chunked", seq_len=80)], resume=True, progress=False)[0]["seq_len"] == 80
    assert len(read_rows(tmp_path / "t.csv")) == 3


def test_invalid_config_is_refused_before_anything_runs(tmp_path):
    for bad, match in [
        (dict(impl="nope"), "choose one of"),
        (dict(seq_len=0), "seq_len=0"),
        (dict(window=3), "window=3"),
        (dict(dtype="fp8"), "dtype='fp8'"),
        (dict(mode="train"), "mode='train'"),
        (dict(global_tokens=(64,)), "0 <= g < seq_len=64"),
    ]:
        with pytest.raises(ValueError, match=match):
            sweep([cfg(tmp_path, impl="chunked"), cfg(tmp_path, **bad)], progress=False)
    assert not (tmp_path / "t.csv").exists()


def _cli(args, cwd):
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [sys.executable, "-m", "attnbench", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@needs_hydra
def test_cli_sweep_end_to_end(tmp_path):
    args = ["-m", "impl=naive,chunked", "seq_len=64,96", "window=8", "heads=2", "head_dim=16", "device=cpu"]
    args += ["time_budget_s=0.05", "study=cli", f"results_dir={tmp_path}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "cli.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((x["impl"], x["seq_len"]) for x in rows) == [
        ("chunked", "64"),
        ("chunked", "96"),
        ("naive", "64"),
        ("naive", "96"),
    ]
    assert all(x["status"] == "ok" for x in rows), [x["reason"] for x in rows]


@needs_hydra
def test_cli_internal_sweep_and_pattern_group(tmp_path):
    args = ["pattern=dilated", "window=8", "heads=2", "head_dim=16", "device=cpu", "time_budget_s=0.05"]
    args += ["+sweep.seq_len=[40,50]", "study='s_{device}'", f"results_dir={tmp_path}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / "s_cpu.csv")
    assert [x["seq_len"] for x in rows] == ["40", "50"] and all(x["dilation"] == "2" for x in rows)
    assert "chunked" in r.stdout and "results:" in r.stdout


@needs_hydra
@pytest.mark.parametrize(
    "arg, words",
    [
        ("impl=nope", ["impl='nope'", "chunked", "naive"]),
        ("seq_len=0", ["seq_len='0'", ">= 1"]),
        ("window=3", ["window='3'", "even"]),
        ("dtype=fp8", ["dtype='fp8'", "bf16"]),
        ("pattern=zigzag", ["pattern='zigzag'", "sliding"]),
    ],
)
def test_cli_bad_override(tmp_path, arg, words):
    r = _cli([arg, f"results_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
    assert not list(tmp_path.glob("*.csv"))


@needs_hydra
def test_every_config_group_composes():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attnbench.__main__ import CONF_DIR, build_configs

    if not OmegaConf.has_resolver("range"):
        OmegaConf.register_new_resolver("range", lambda a, b: list(range(int(a), int(b))))
    assert {p.stem for p in (CONF_DIR / "impl").glob("*.yaml")} >= set(attnbench.list_impls())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group in ("impl", "pattern", "experiment"):
            for option in sorted((CONF_DIR / group).glob("*.yaml")):
                c = compose("config", overrides=[f"{group}={option.stem}", "device=cpu"])
                configs, _, _ = build_configs(OmegaConf.to_container(c, resolve=True))
                assert configs, (group, option.stem)
                for bc in configs:
                    bc.pattern()  # a valid Pattern
                    if group == "impl":
                        assert bc.impl == option.stem


@needs_hydra
def test_cli_help_explains():
    r = subprocess.run([sys.executable, "-m", "attnbench", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "python -m attnbench experiment=scaling" in r.stdout and "seq_len" in r.stdout
