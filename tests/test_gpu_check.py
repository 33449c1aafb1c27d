"""gpu_check without a GPU: the plan and its order, the dry run, the targets file, the
verdict, a stage's fault handling, and the test stage (pytest-xdist, JUnit counts, the
time limit) against a toy suite."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import time

import pytest

from attnbench import gpu_check
from attnbench.results import base_row
from attnbench.tables import append_row, read_rows

MEASURING = gpu_check.MEASURING


def _impl_order(jobs) -> list[str]:
    return list(dict.fromkeys(j.config.impl for j in jobs))


@pytest.mark.parametrize("stage", MEASURING)
def test_triton_comes_first_and_each_first_job_of_a_mode_runs_in_a_child(stage):
    jobs = gpu_check.plan([stage])
    assert jobs and {j.stage for j in jobs} == {stage}
    order = _impl_order(jobs)
    assert order[0] == "triton"
    seen = [j.config.impl for j in jobs]
    assert seen == sorted(seen, key=order.index), "one implementation's jobs are contiguous"
    kinds = list(dict.fromkeys((j.config.impl, j.config.mode) for j in jobs))
    assert [(j.config.impl, j.config.mode) for j in jobs if j.child] == kinds  # the first of each, only
    for j in jobs:
        c = j.config
        assert c.device == "cuda" and c.study == stage
        c.pattern().validate(c.seq_len, c.heads)


def test_scaling_puts_triton_cupy_chunked_first_and_covers_every_cuda_impl():
    jobs = gpu_check.plan(["scaling"])
    order = _impl_order(jobs)
    assert order[:3] == ["triton", "cupy", "chunked"]
    assert set(order) == set(gpu_check._cuda_impls())
    assert sorted({j.config.seq_len for j in jobs}) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert {j.config.impl for j in jobs if j.config.dtype == "fp32"} == {"triton", "cupy", "chunked"}
    assert {j.config.impl for j in jobs if j.config.mode == "fwd_bwd"} == {"triton", "cupy", "chunked"}


def test_every_target_is_planned_in_its_stage():
    """Each row of conf/gpu_targets.csv names configurations its stage measures, so the
    verdict can find them; the correctness stage verifies triton and cupy at each."""
    planned = {s: {repr(base_row(j.config)["pattern"]) + repr(_key(j.config)) for j in gpu_check.plan([s])}
               for s in MEASURING}  # fmt: skip
    rows = gpu_check.targets()
    assert len(rows) >= 20
    for t in rows:
        assert t["measure"] in ("speedup", "time_ratio", "memory_ratio", "extra_memory") and t["op"] in (">=", "<=")
        for impl in filter(None, (t["impl"], t["baseline"])):
            c = gpu_check._config(t, impl)
            assert repr(base_row(c)["pattern"]) + repr(_key(c)) in planned[t["stage"]], (t, impl)
            if impl in ("triton", "cupy"):
                fb = dataclasses.replace(c, mode="fwd_bwd")
                assert repr(base_row(fb)["pattern"]) + repr(_key(fb)) in planned["correctness"]


def _key(c):
    return (c.impl, c.batch, c.heads, c.seq_len, c.head_dim, c.window, c.dilation, c.dtype, c.mode)


def test_dry_run_shows_the_order_and_fits_the_budget():
    r = subprocess.run([sys.executable, "-m", "attnbench.gpu_check", "--dry-run"], capture_output=True, text=True,
                       timeout=120, cwd=gpu_check.ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert ": fits in 570 s" in out, out[-400:]
    heads = [out.index(f"  {s} (") for s in gpu_check.STAGES]
    assert heads == sorted(heads), "stages print in the order they run"
    for start, end in zip(heads, heads[1:]):
        lines = [ln.split()[1] for ln in out[start:end].splitlines()[1:]]
        assert lines[0] == "triton" and "triton" not in lines[lines.index(next(x for x in lines if x != "triton")) :]


def _row(config, ms, peak):
    row = base_row(config)
    row.update(status="ok", time_ms_median=ms, peak_mem_bytes=peak)
    return row


def test_verdict_judges_each_target_from_the_rows(tmp_path, monkeypatch):
    t = {"batch": "1", "heads": "16", "seq_len": "32768", "head_dim": "64", "window": "512", "dilation": "1",
         "dtype": "bf16", "mode": "fwd", "stage": "targets"}  # fmt: skip
    rows = [
        dict(t, target="faster", impl="triton", baseline="flex", measure="speedup", op=">=", required="1.2"),
        dict(t, target="lean", impl="triton", baseline="", measure="extra_memory", op="<=", required="1.0"),
        dict(t, target="absent", impl="triton", baseline="sdpa", measure="speedup", op=">=", required="1"),
        dict(t, target="slow", impl="triton", baseline="flex", measure="time_ratio", op="<=", required="0.5"),
    ]
    monkeypatch.setattr(gpu_check, "targets", lambda: rows)
    settings = gpu_check.STAGE_SETTINGS["targets"]
    tri = dataclasses.replace(gpu_check._config(t, "triton", **settings), study="targets")
    out_bytes = 16 * 32768 * (64 * 2 + 4)
    append_row(tmp_path / "targets.csv", _row(tri, 1.0, out_bytes))  # exactly the output + LSE
    append_row(tmp_path / "targets.csv", _row(dataclasses.replace(tri, impl="flex"), 1.3, 10**9))
    cor = dataclasses.replace(tri, study="correctness", mode="fwd_bwd")
    append_row(tmp_path / "correctness.csv", {**_row(cor, 1.0, 1), "status": "wrong", "reason": "dq off"})
    got = {r["target"].split(",")[0]: r for r in gpu_check.verdict(tmp_path)}
    assert got["faster"]["status"] == "pass" and got["faster"]["measured"] == "1.3"
    assert got["lean"]["status"] == "pass" and got["lean"]["measured"] == "1"
    assert got["absent"]["status"] == "missing"
    assert got["slow"]["status"] == "FAIL"  # 1 / 1.3 > 0.5
    assert got["triton correct"]["status"] == "FAIL"
    assert [r["status"] for r in read_rows(tmp_path / "verdict.csv")] == ["FAIL", "pass", "pass", "missing", "FAIL"]


def test_a_cuda_error_in_process_stops_the_stage_and_later_jobs_go_to_children(tmp_path, monkeypatch):
    jobs = [j for j in gpu_check.plan(["scaling"]) if j.config.impl in ("triton", "chunked")][:9]
    ran = []

    def fake_sweep(configs, progress, history):
        c = configs[0]
        ran.append((c.impl, c.seq_len, c.isolate, c.job_timeout_s))
        row = base_row(c)
        fault = c.impl == "triton" and c.seq_len == 4096
        row.update(status="error" if fault else "ok", reason="RuntimeError: CUDA error: an illegal memory access"
                   if fault else "", time_ms_median=1.0)  # fmt: skip
        append_row(tmp_path / "scaling.csv", row)
        return [row]

    monkeypatch.setattr("attnbench.sweep.sweep", fake_sweep)
    state = {"poisoned": False, "down": {"cupy": "CuPy compile: no NVRTC"}}
    gpu_check.run_stage("scaling", jobs, tmp_path, time.time() + 50, state)
    assert ran[0][:3] == ("triton", 1024, True) and ran[1][2] is False  # the first in a child, then here
    assert ran[-1][1] == 4096 and len(ran) == 3 and state["poisoned"]
    assert all(5 <= r[3] <= 50 for r in ran)  # each job's limit: what the stage has left, at most its own
    rows = read_rows(tmp_path / "scaling.csv")
    assert len(rows) == len(jobs)
    assert all(r["status"] == "skipped" and "CUDA error in triton" in r["reason"] for r in rows[3:])
    ran.clear()
    gpu_check.run_stage("scaling", jobs[7:8], tmp_path, time.time() + 50, state)  # later: in a child
    assert ran and ran[0][2] is True


def test_a_failed_environment_check_skips_its_implementations(tmp_path, monkeypatch):
    monkeypatch.setattr("attnbench.sweep.sweep", lambda *a, **k: pytest.fail("must not run"))
    job = gpu_check.plan(["scaling"])[0]
    gpu_check.run_stage("scaling", [job], tmp_path, time.time() + 50, {"poisoned": False, "down": {"triton": "x"}})
    (row,) = read_rows(tmp_path / "scaling.csv")
    assert row["status"] == "skipped" and "environment check failed: x" in row["reason"]


def test_environment_names_a_missing_compiler(monkeypatch):
    assert all(v == "" for v in gpu_check.environment()["checks"].values())  # this machine has both
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert "no C compiler" in gpu_check.environment()["checks"]["C compiler"]


def test_launch_checks_run_a_triton_kernel_in_a_child(tmp_path, monkeypatch):
    """The same script as on a GPU, here through Triton's interpreter; without CuPy its
    check names the missing module."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = gpu_check.launch_checks(tmp_path, device="cpu")
    assert got["Triton launch"] == ""
    assert ("No module named 'cupy'" in got["CuPy compile"]) != (importlib.util.find_spec("cupy") is not None)


def test_no_gpu_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "attnbench.gpu_check", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_main_runs_the_stages_in_order_with_rolling_deadlines(tmp_path, monkeypatch):
    """main()'s control flow with the GPU parts stubbed: the stages in their fixed order,
    each stage's deadline its allowance plus what earlier stages left, the tests last
    with what remains, a failed check taking its implementations down, the verdict last."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("attnbench.results.device_name", lambda device: "Made-up GPU")
    monkeypatch.setattr(gpu_check, "environment", lambda: {"checks": {"C compiler": "", "Python headers": ""}})
    monkeypatch.setattr(gpu_check, "launch_checks", lambda out: {"Triton launch": "", "CuPy compile": "no NVRTC"})
    monkeypatch.setattr(gpu_check, "ceilings", lambda: {"bf16_matmul_tflops": 1.0, "copy_gbs": 1.0})
    monkeypatch.setattr(gpu_check, "run_stage", lambda stage, jobs, out, deadline, state: calls.append(
        (stage, round(deadline - time.time()), len(jobs), dict(state["down"]))))  # fmt: skip
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, limit, workers: calls.append(("tests", round(limit))))
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--stages", "tests,scaling,targets", "--budget", "500"]) == 0
    # the stubbed set-up took no time: the stages share what it did not use
    a = gpu_check.allowances(["targets", "scaling", "tests"], 500 + gpu_check.SETUP_S)
    assert sum(a.values()) == 500 - gpu_check.RESERVE_S - gpu_check.TESTS_MIN_S
    down = {"cupy": "CuPy compile: no NVRTC"}
    assert calls == [("targets", round(a["targets"]), len(gpu_check.plan(["targets"])), down),
                     ("scaling", round(a["targets"] + a["scaling"]), len(gpu_check.plan(["scaling"])), down),
                     ("tests", 500 - gpu_check.RESERVE_S)]  # fmt: skip
    assert [r["status"] for r in read_rows(out / "verdict.csv")] == ["missing"] * len(gpu_check.targets())
    assert (out / "environment.json").exists() and "== done" in (out / "gpu_check.log").read_text()


# ---------------------------------------------------------------- the test stage

_TOY = """
import time, pytest
@pytest.mark.parametrize("i", range(4))
def test_ok(i):
    assert i >= 0
def test_broken():
    assert 1 == 2, "deliberately failing"
@pytest.mark.skip(reason="toy skip")
def test_skipped():
    pass
"""


def _toy(tmp_path, body: str) -> tuple[str, object]:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test_toy.py").write_text(body)
    (tmp_path / "out").mkdir()
    return str(tmp_path / "toy" / "test_toy.py"), tmp_path / "out"


@pytest.mark.parametrize("workers", [1, 2])
def test_run_tests_counts_from_junit(tmp_path, workers):
    path, out = _toy(tmp_path, _TOY)
    res = gpu_check.run_tests(out, 120, workers, paths=(path,), device="cpu")
    assert res["counts"] == {"passed": 4, "failed": 1, "errors": 0, "skipped": 1}, res
    assert res["rc"] == 1 and len(res["failed"]) == 1 and "test_broken" in res["failed"][0]
    assert "deliberately failing" in res["failed"][0]
    assert ("bringing up nodes" in (out / "tests.log").read_text()) == (workers > 1)  # xdist's workers


def test_run_tests_stops_at_its_limit_and_counts_what_ran(tmp_path):
    path, out = _toy(tmp_path, "import time\ndef test_quick():\n    pass\ndef test_slow():\n    time.sleep(60)\n")
    t0 = time.time()
    res = gpu_check.run_tests(out, 6, 1, paths=(path,), device="cpu")
    assert res["stopped"] and time.time() - t0 < 40
    assert res["counts"]["passed"] == 1, res


def test_triton_tests_share_a_worker_group():
    from conftest import kernel_group

    class Case:
        D = 64

    item = type("Item", (), {"callspec": type("C", (), {"params": {"impl": "triton", "case": Case, "dtype": "bf16"}})})
    assert kernel_group(item) == "triton-D64-bf16"
    item.callspec.params = {"impl": "flex", "case": Case, "dtype": "bf16"}
    assert kernel_group(item) is None
