"""gpu_check's Python parts, without a GPU: the plan, the dry run, and the test stage
(parallel shards, counts, failures, time limit) run on CPU against a toy suite."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

import attnbench
from attnbench import gpu_check


def test_plan_covers_every_available_impl_and_length():
    configs = gpu_check.plan()
    avail = {im.name for im in attnbench.available_impls()}
    assert {c.impl for c in configs} == avail
    assert sorted({c.seq_len for c in configs}) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert {c.dtype for c in configs} == {"bf16", "fp32"}
    bwd = [c for c in configs if c.mode == "fwd_bwd"]
    assert bwd and all(c.seq_len == 32768 for c in bwd)
    for c in configs:
        assert c.device == "cuda" and (c.heads, c.head_dim, c.window) == (12, 64, 512)
        c.pattern().validate(c.seq_len, c.heads)
    # a run cut short by its budget loses the fp32 repeat, not bf16 (the targets' dtype)
    order = [c.dtype for c in configs]
    assert order == sorted(order, key=lambda d: d != "bf16")


def test_dry_run_prints_the_plan():
    r = subprocess.run(
        [sys.executable, "-m", "attnbench.gpu_check", "--dry-run"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "scaling configurations" in r.stdout and "chunked" in r.stdout and "stages:" in r.stdout
    assert "scaling (the rest of 450 s)" in r.stdout


def test_no_gpu_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "attnbench.gpu_check", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- the test stage in shards


class _Item:
    def __init__(self, nodeid: str, **params):
        self.nodeid = nodeid
        self.callspec = type("CallSpec", (), {"params": params})() if params else None


def test_shards_partition_and_keep_shared_kernels_together():
    from conftest import shard_items

    class Case:
        def __init__(self, D):
            self.D = D

    items = [_Item(f"t::plain{i}") for i in range(7)]
    items += [
        _Item(f"t::tri{i}", impl="triton", case=Case(16 if i % 2 else 64), dtype=dt) for i in range(8) for dt in "ab"
    ]
    items += [_Item(f"t::flex{i}", impl="flex", case=Case(16), dtype="a") for i in range(5)]
    parts = [shard_items(items, i, 3) for i in range(3)]
    ids = [it.nodeid for p in parts for it in p]
    assert sorted(ids) == sorted(it.nodeid for it in items)  # every test once
    for p in parts:
        assert 6 <= len(p) <= 12, [len(p) for p in parts]  # balanced by count
    where = {it.nodeid: i for i, p in enumerate(parts) for it in p}
    for dt in "ab":  # one triton (head_dim, dtype) group, one shard
        for D in (16, 64):
            group = {where[it.nodeid] for it in items if it.callspec and it.callspec.params.get("impl") == "triton"
                     and it.callspec.params["case"].D == D and it.callspec.params["dtype"] == dt}  # fmt: skip
            assert len(group) == 1
    assert len({where[f"t::flex{i}"] for i in range(5)}) > 1  # per-shape compiles spread out


_TOY_TESTS = """
import time, pytest
@pytest.mark.parametrize("i", range(4))
def test_ok(i):
    assert i >= 0
def test_broken():
    assert 1 == 2, "deliberately failing: gpu_check must list it"
@pytest.mark.skip(reason="toy skip")
def test_skipped():
    pass
"""


def _toy_suite(tmp_path, body: str):
    """A small suite that loads the project's sharding hook (its conftest)."""
    d = tmp_path / "toy"
    d.mkdir()
    hook = str(gpu_check.ROOT / "tests" / "conftest.py")
    (d / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('ab_conftest', {hook!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
        "pytest_collection_modifyitems = mod.pytest_collection_modifyitems\n"
    )
    (d / "test_toy.py").write_text(body)
    return str(d / "test_toy.py")


@pytest.mark.parametrize("shards", [1, 3])
def test_run_tests_sums_shards_and_lists_failures(tmp_path, shards):
    target = _toy_suite(tmp_path, _TOY_TESTS)
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    res = gpu_check.run_tests(out, lines.append, 120, shards=shards, targets=(target,), device="cpu")
    assert res["counts"] == {"passed": 4, "failed": 1, "skipped": 1}, res
    assert res["rc"] == 1 and len(res["failed"]) == 1 and "test_broken" in res["failed"][0]
    assert any("test_broken" in ln for ln in lines)  # the log names the failure
    assert len(list(out.glob("tests*.log"))) == shards and len(list(out.glob("tests*.xml"))) == shards


def test_run_tests_stops_at_its_limit(tmp_path):
    body = "import time\ndef test_quick():\n    pass\ndef test_slow():\n    time.sleep(60)\n"
    target = _toy_suite(tmp_path, body)
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.time()
    res = gpu_check.run_tests(out, lambda *a: None, 8, shards=1, targets=(target,), device="cpu")
    assert res["rc"] == "timeout" and time.time() - t0 < 30
    assert res["counts"] == {"passed": 1} and "stopped at the time limit" in res["summary"]  # what ran is counted


def test_bad_shard_spec_is_a_usage_error():
    env = dict(os.environ, ATTNBENCH_SHARD="3/2")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_gpu_check.py"],
                       cwd=gpu_check.ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 4 and "expected 'i/N' with 0 <= i < N" in r.stderr + r.stdout


# ---------------------------------------------------------------- the verdict


def test_targets_plan_is_the_issue_configuration():
    configs = gpu_check.targets_plan()
    assert {c.impl for c in configs} == {"triton", "flex"}
    assert {(c.head_dim, c.dilation, c.mode) for c in configs} == {
        (D, d, m) for D in (64, 128) for d in (1, 2) for m in ("fwd", "fwd_bwd")
    }
    for c in configs:
        assert (c.batch, c.heads, c.seq_len, c.window, c.dtype, c.device) == (1, 16, 32768, 512, "bf16", "cuda")


def _row(config, ms, peak):
    from attnbench.results import base_row

    row = base_row(dataclasses.replace(config, device="cpu").resolved())  # a CUDA row, made up on any machine
    row.update(
        device="cuda", device_name="Made-up GPU", status="ok", time_ms_median=ms, peak_mem_bytes=peak, tflops=100.0
    )
    return row


def test_verdict_reads_the_rows_and_judges_each_target(tmp_path):
    from attnbench.tables import append_row

    out = tmp_path
    for c in gpu_check.targets_plan():
        c = dataclasses.replace(c, study="targets")
        # triton: 1.3x faster than flex at dilation 1, 1.4x at dilation 2 (under the 1.5 asked)
        fast = {1: 1.3, 2: 1.4}[c.dilation]
        ms = 1.0 if c.impl == "triton" else fast
        peak = 16 * 32768 * c.head_dim * 2 if c.impl == "triton" else 10**9  # exactly the output
        append_row(out / "targets.csv", _row(c, ms, peak))
    n = 32768
    base = gpu_check.plan()[0]  # the scaling study's shape; cupy rows too, though it cannot run here
    for impl, ms, peak in (("cupy", 1.0, 100), ("chunked", 2.5, 200), ("triton", 0.2, 50)):  # cupy 5x triton
        for dtype in ("fp32", "bf16"):
            for mode in ("fwd", "fwd_bwd"):
                c = dataclasses.replace(base, impl=impl, dtype=dtype, mode=mode, seq_len=n, study="scaling")
                append_row(out / "scaling.csv", _row(c, ms, peak))
    lines = []
    res = {r["target"]: r for r in gpu_check.verdict(out, lines.append, {"bf16_matmul_tflops": 800.0})}
    assert res["speed-up over flex, bf16 D=64 dilation 1 fwd"]["status"] == "pass"
    assert res["speed-up over flex, bf16 D=128 dilation 2 fwd"]["status"] == "FAIL"  # 1.4 < 1.5
    assert res["speed-up over flex, bf16 D=128 dilation 2 fwd_bwd"]["status"] == "pass"  # 1.4 >= 1.0
    assert res["extra peak memory / (output + O(n)), D=64 dilation 1 fwd"]["status"] == "pass"
    assert "12% of bf16 matmul" in res["speed-up over flex, bf16 D=64 dilation 1 fwd"]["note"]
    assert res[f"speed-up over chunked, fp32 n={n} fwd"]["status"] == "pass"  # 2.5 >= 2
    assert res[f"peak memory / chunked's, bf16 n={n} fwd_bwd"]["status"] == "pass"  # 100 < 200
    assert res[f"time / triton's, bf16 n={n} fwd"]["status"] == "FAIL"  # 5 > 4
    assert (out / "verdict.csv").exists() and any("Targets" in ln for ln in lines)


def test_verdict_says_missing_without_rows(tmp_path):
    res = gpu_check.verdict(tmp_path, lambda *a: None, {})
    assert res and all(r["status"] == "missing" for r in res)


def test_stage_summary_figure_and_verdict_run_end_to_end_on_cpu(tmp_path):
    """The GPU-only parts aside, the stages chain: engine rows into OUTDIR, then the
    summary, figure and verdict read them (here on the CPU, small sizes)."""
    base = dataclasses.replace(gpu_check.plan()[0], device="cpu", dtype="fp32", heads=2, window=16, time_budget_s=0.05)
    configs = [dataclasses.replace(base, impl=i, seq_len=n) for i in ("naive", "chunked") for n in (64, 128)]
    configs.append(dataclasses.replace(base, impl="chunked", seq_len=-1))  # invalid: must not stop the stage
    lines: list[str] = []
    path = gpu_check.run_stage("scaling", configs, tmp_path, lines.append, 120, {})
    assert any("not run: ValueError: seq_len=-1" in ln for ln in lines)
    rows = gpu_check._read(path)
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    gpu_check.summary(path, tmp_path, lines.append, {"bf16_matmul_tflops": 1.0})
    gpu_check.figure(path, tmp_path, lines.append)
    assert (tmp_path / "summary.txt").exists() and list(tmp_path.glob("scaling*.png"))
    res = gpu_check.verdict(tmp_path, lines.append, {})
    assert all(r["status"] == "missing" for r in res)  # no cupy, no triton rows at these sizes
    # a stage out of time marks the rest skipped, with the reason, and runs nothing
    late = gpu_check.run_stage("late", configs[:2], tmp_path, lines.append, -1, {})
    assert [(r["status"], "ran out of time" in r["reason"]) for r in gpu_check._read(late)] == [("skipped", True)] * 2


def test_main_runs_the_chosen_stages_in_order_within_the_budget(tmp_path, monkeypatch):
    """main()'s control flow with the GPU parts stubbed: which stages run, in which
    order, with which time limits, and that the verdict always closes the run."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda log: {"gpu": "stub"})
    monkeypatch.setattr(gpu_check, "ceilings", lambda log: {"bf16_matmul_tflops": 1.0})

    def fake_tests(outdir, log, limit, shards=1):
        calls.append(("tests", round(limit)))
        return {}

    def fake_stage(name, configs, outdir, log, limit, ceil):
        calls.append((name, round(limit), len(configs)))
        return outdir / f"{name}.csv"

    monkeypatch.setattr(gpu_check, "run_tests", fake_tests)
    monkeypatch.setattr(gpu_check, "run_stage", fake_stage)
    monkeypatch.setattr(gpu_check, "figure", lambda *a: calls.append(("figure",)))
    monkeypatch.setattr(gpu_check, "summary", lambda *a: calls.append(("summary",)))
    monkeypatch.setattr(gpu_check, "verdict", lambda *a: calls.append(("verdict",)) or [])
    out = tmp_path / "out"
    rc = gpu_check.main([str(out), "--stages", "scaling,targets,tests", "--budget", "500", "--targets-limit", "100"])
    assert rc == 0
    n_targets, n_scaling = len(gpu_check.targets_plan()), len(gpu_check.plan())
    rest = 500 - gpu_check.RESERVE_S
    assert calls == [("tests", 200), ("targets", 100, n_targets), ("scaling", rest, n_scaling),
                     ("figure",), ("summary",), ("verdict",)]  # fmt: skip
    assert (out / "environment.json").exists() and (out / "gpu_check.log").exists()

    calls.clear()  # the default: tests and scaling; --skip-tests leaves the tests out
    assert gpu_check.main([str(out), "--skip-tests"]) == 0
    assert [c[0] for c in calls] == ["scaling", "figure", "summary", "verdict"]
