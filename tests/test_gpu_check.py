"""gpu_check without a GPU: the plan and its order, the targets file, the estimates and
the dry run, the warm-up's compile list (and one real compile that a launch then finds
in Triton's cache), the bounded worker, a stage's handling of overruns, crashes and
CUDA errors, the verdict from the rows alone, the test stages against a toy suite, and
the whole command on a faked H100 (tests/gpu_fakes.py)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench import gpu_check
from attnbench.children import Died, Stopped
from attnbench.results import base_row, positions_text
from attnbench.tables import read_rows

MEASURING = gpu_check.MEASURING
FAKES = Path(__file__).with_name("gpu_fakes.py")


def _impl_order(jobs) -> list[str]:
    return list(dict.fromkeys(j.config.impl for j in jobs))


# ---------------------------------------------------------------- the plan
@pytest.mark.parametrize("stage", MEASURING)
def test_triton_comes_first_and_each_implementation_runs_in_one_block(stage):
    jobs = gpu_check.plan([stage])
    assert jobs and {j.stage for j in jobs} == {stage}
    order = _impl_order(jobs)
    assert order[0] == "triton"
    seen = [j.config.impl for j in jobs]
    assert seen == sorted(seen, key=order.index), "one implementation's jobs are contiguous"
    for j in jobs:
        c = j.config
        assert c.device == "cuda" and c.study == stage and c.isolate is False
        c.pattern().validate(c.seq_len, c.heads)


def test_correctness_covers_globals_and_causal_forward_and_backward():
    configs = gpu_check.correctness_configs(gpu_check.targets())
    for impl in ("triton", "cupy"):
        mine = [c for c in configs if c.impl == impl and c.mode == "fwd_bwd"]
        assert any(c.global_tokens == [0] for c in mine), impl
        assert any(len(c.global_tokens) == 64 and max(c.global_tokens) > c.seq_len // 2 for c in mine), impl
        assert any(c.causal for c in mine), impl
    # no target measures triton's fp32 backward: its compiles are not paid for
    assert not [c for c in configs if c.impl == "triton" and c.dtype == "fp32" and c.mode != "fwd"]
    assert [c for c in configs if c.impl == "triton" and c.dtype == "fp32"], "its forward is verified"
    keys = [gpu_check._same(c) for c in configs]
    assert len(keys) == len(set(keys))


def test_every_target_and_its_correctness_are_planned():
    """Each row of conf/gpu_targets.csv names configurations its stage measures, and
    triton's and cupy's are verified first at the same configuration."""
    jobs = gpu_check.plan(gpu_check.STAGES)
    planned = {(j.stage, gpu_check._same(j.config)) for j in jobs}
    rows = gpu_check.targets()
    assert len(rows) >= 20
    for t in rows:
        for impl in filter(None, (t["impl"], t["baseline"])):
            c = gpu_check._config(t, impl)
            assert (t["stage"], gpu_check._same(c)) in planned, (t, impl)
            if impl in ("triton", "cupy"):
                fb = gpu_check._same(dataclasses.replace(c, mode="fwd_bwd"))
                assert ("correctness", fb) in planned or ("correctness", gpu_check._same(c)) in planned


def test_scaling_covers_every_cuda_impl_and_reuses_the_targets_rows():
    jobs = gpu_check.plan(["targets", "scaling"])
    scaling = [j for j in jobs if j.stage == "scaling"]
    assert _impl_order(scaling)[:3] == ["triton", "cupy", "chunked"]
    assert set(_impl_order(scaling)) == set(gpu_check._cuda_impls())
    assert {j.config.impl for j in scaling if j.config.dtype == "fp32"} == {"triton", "cupy", "chunked"}
    assert sorted({j.config.seq_len for j in scaling}) == [2048, 8192, 32768]
    measured = {gpu_check._same(j.config) for j in jobs if j.stage == "targets"}
    assert not [j for j in scaling if gpu_check._same(j.config) in measured]
    longer = gpu_check.plan(["scaling"], budget=600)
    assert sorted({j.config.seq_len for j in longer}) == [1024, 2048, 4096, 8192, 16384, 32768]


_HEADER = "target,impl,baseline,measure,op,required,stage,batch,heads,seq_len,head_dim,window,dilation,dtype,mode"


def test_targets_file_optional_columns_default_and_bad_rows_name_their_line(tmp_path):
    path = tmp_path / "t.csv"
    row = "fast,triton,flex,speedup,>=,1.2,targets,1,16,4096,64,512,1,bf16,fwd"
    path.write_text(f"{_HEADER}\n{row}\n")
    (t,) = gpu_check.targets(path)
    c = gpu_check._config(t, "triton")
    assert (c.causal, c.global_tokens) == (False, [])
    path.write_text(f"{_HEADER},causal,global_tokens,kv_heads\n{row},true,0-3 100,16\n")
    c = gpu_check._config(gpu_check.targets(path)[0], "triton")
    assert c.causal and c.global_tokens == [0, 1, 2, 3, 100]
    assert positions_text(gpu_check.positions("0-3 100 200-201")) == "0-3 100 200-201"
    path.write_text(f"{_HEADER}\n{row.replace('>=', '=>')}\n")
    with pytest.raises(gpu_check.BadInput, match=r"line 2: op='=>'"):
        gpu_check.targets(path)
    path.write_text(f"{_HEADER},kv_heads\n{row},8\n")
    assert gpu_check._config(gpu_check.targets(path)[0], "triton").kv_heads == 8
    path.write_text(f"{_HEADER},kv_heads\n{row},5\n")  # 5 does not divide 16 heads
    with pytest.raises(gpu_check.BadInput, match="line 2: kv_heads=5: must divide heads=16"):
        gpu_check.targets(path)


# ---------------------------------------------------------------- estimates
def test_compile_keys_follow_what_recompiles():
    base = gpu_check.BenchConfig(impl="flex", seq_len=32768, heads=16, head_dim=64, dtype="bf16", device="cuda")
    key = gpu_check.compile_key
    assert key(base) == key(dataclasses.replace(base, dilation=2))  # a captured tensor, not a constant
    assert key(base) != key(dataclasses.replace(base, seq_len=16384))  # dynamic=False: every n
    assert key(base) != key(dataclasses.replace(base, head_dim=128))
    tri = dataclasses.replace(base, impl="triton")
    assert key(tri) == key(dataclasses.replace(tri, seq_len=8192, dilation=2, causal=True))  # runtime arguments
    assert key(tri) != key(dataclasses.replace(tri, dtype="fp32")) != key(dataclasses.replace(tri, mode="fwd_bwd"))


def test_estimates_charge_each_compile_once_and_prefer_measured_jobs():
    jobs = [j for j in gpu_check.plan(["targets"]) if j.config.impl == "flex"]
    est = gpu_check.Estimator([])
    times = [est.job(j)[0] for j in jobs]
    first = {gpu_check.compile_key(j.config): t for j, t in zip(reversed(jobs), reversed(times))}
    for j, t in zip(jobs, times):
        if first[gpu_check.compile_key(j.config)] != t:  # a later job of the same shape
            assert t < first[gpu_check.compile_key(j.config)] - 2
    calib = [dict(stage="targets", job=gpu_check.job_name(jobs[0].config), key="", count="", cpu_s="",
                  first_call_s="9", job_s="42.5")]  # fmt: skip
    assert gpu_check.Estimator(calib).job(jobs[0]) == (42.5, "measured")


def test_the_warmup_estimate_takes_measured_compile_times():
    flex = gpu_check.flex_warmups(gpu_check.plan(["targets"]))
    base, _ = gpu_check.Estimator([]).warmup([], flex, 16)
    key = gpu_check.compile_key(flex[0])
    slow = [dict(stage="warm-up", job="", key=key, count="", cpu_s="", first_call_s="", job_s="500")]
    assert gpu_check.Estimator(slow).warmup([], flex, 16)[0] >= 500 > base


def test_dry_run_fits_the_default_budget_with_every_verdict_job(capsys):
    """The default plan: every correctness and target job listed and within its
    stage; the stages in their order."""
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fits: all" in out and "the run ends by 300 s" in out, out[-600:]
    heads = [out.index(f"  {s} (") for s in gpu_check.STAGES]
    assert heads == sorted(heads), "stages print in the order they run"
    listed = [ln for ln in out[heads[0] : heads[2]].splitlines() if ln.strip()[:1].isdigit()]
    assert len(listed) == len(gpu_check.plan(gpu_check.MUST_FIT))
    assert "warm-up:" in out and "Triton compiles" in out


def test_dry_run_says_when_the_verdict_does_not_fit(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "triton_compiles", lambda configs: iter(()))
    assert gpu_check.main(["--dry-run", "--budget", "60"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--budget", "10"], ["--budget", "x"], ["--stages", "nope"]])
def test_bad_settings_are_one_line_and_exit_2(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        gpu_check.main([str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage
    assert argv[0] in last and repr(argv[1]) in last and ("from 60 to 3600" in last or "a comma-separated" in last)


# ---------------------------------------------------------------- a stage
class _FakeWorker:
    """Stands in for children.Worker: runs the call here, or acts out a failure."""

    def __init__(self, acts):
        self.acts, self.starts, self.stops, self.alive = acts, 1, 0, True

    def call(self, fn, c, timeout):
        act = self.acts.get(c.impl)
        if act == "hang":
            raise Stopped("stopped")
        if act == "crash":
            raise Died("the worker process died")
        row = base_row(c)
        row.update(status="ok", time_ms_median=1.0, first_call_ms=2000.0)
        if act == "cuda":
            row.update(status="error", reason="RuntimeError: CUDA error: an illegal memory access was encountered")
        return row

    def stop(self):
        self.stops += 1


def _run(tmp_path, acts) -> gpu_check.Run:
    return gpu_check.Run(tmp_path, tmp_path / "scratch", gpu_check.Machine(), "run-2", _FakeWorker(acts))


def test_a_stage_turns_overruns_crashes_and_cuda_errors_into_rows(tmp_path):
    jobs = [j for j in gpu_check.plan(["targets"]) if j.config.impl in ("triton", "cupy", "chunked", "flex")]
    run = _run(tmp_path, {"flex": "hang", "cupy": "crash", "chunked": "cuda"})
    run.down["sdpa"] = "x"
    gpu_check.run_stage("targets", jobs, run, time.time() + 60)
    rows = read_rows(tmp_path / gpu_check.ROWS)
    assert len(rows) == len(jobs) and {r["run"] for r in rows} == {"run-2"} and all(r["job_s"] for r in rows)
    by = {r["impl"]: r for r in rows}
    assert by["triton"]["status"] == "ok"
    assert by["flex"]["status"] == "skipped" and by["flex"]["reason"].startswith("over the time budget: stopped")
    assert by["cupy"]["status"] == "error" and "died" in by["cupy"]["reason"]
    chunked = sum(r["impl"] == "chunked" for r in rows)
    assert run.worker.stops == chunked  # each CUDA error: a new worker for the next job
    assert {r["stage"] for r in run.calibration} == {"targets"} and run.calibration[0]["first_call_s"] == 2.0


def test_a_stage_past_its_deadline_and_a_failed_check_write_skipped_rows(tmp_path):
    jobs = gpu_check.plan(["scaling"])[:4]
    run = _run(tmp_path, {})
    run.down["triton"] = "Triton launch: no driver"
    gpu_check.run_stage("scaling", jobs[:2], run, time.time() + 60)
    gpu_check.run_stage("scaling", jobs[2:], run, time.time() - 1)
    rows = read_rows(tmp_path / gpu_check.ROWS)
    assert "environment check failed: Triton launch: no driver" in rows[0]["reason"]
    assert all("ran out of time" in r["reason"] for r in rows[2:])


def test_after_a_job_is_stopped_its_series_stops_too(tmp_path):
    """A killed worker takes the engine's series history with it: the stage itself
    skips the larger n of a series whose job was stopped at its limit."""
    jobs = [j for j in gpu_check.plan(["scaling"]) if j.config.impl == "triton" and j.config.dtype == "bf16"]
    assert [j.config.seq_len for j in jobs] == [2048, 8192, 32768]
    gpu_check.run_stage("scaling", jobs, _run(tmp_path, {"triton": "hang"}), time.time() + 60)
    first, *later = read_rows(tmp_path / gpu_check.ROWS)
    assert first["reason"].startswith("over the time budget: stopped by gpu_check")
    assert [r["reason"] for r in later] == ["over the time budget: already stopped at its limit at seq_len=2048"] * 2


def test_a_rerun_keeps_what_earlier_runs_measured_ok(tmp_path):
    from attnbench.results import identity

    jobs = gpu_check.plan(["targets"])[:3]
    run = _run(tmp_path, {})
    run.done = {identity(base_row(dataclasses.replace(jobs[0].config, results_dir="x"))): "run-1"}
    gpu_check.run_stage("targets", jobs, run, time.time() + 60)
    assert len(read_rows(tmp_path / gpu_check.ROWS)) == 2


# ---------------------------------------------------------------- the verdict
_T = {"batch": "1", "heads": "16", "seq_len": "32768", "head_dim": "64", "window": "512", "dilation": "1",
      "dtype": "bf16", "mode": "fwd", "stage": "targets", **gpu_check.OPTIONAL}  # fmt: skip
_VERDICT_TARGETS = [
    dict(_T, target="faster", impl="triton", baseline="flex", measure="speedup", op=">=", required="1.2"),
    dict(_T, target="lean", impl="triton", baseline="", measure="extra_memory", op="<=", required="1.1"),
    dict(_T, target="absent", impl="triton", baseline="sdpa", measure="speedup", op=">=", required="1"),
    dict(_T, target="slow", impl="triton", baseline="flex", measure="time_ratio", op="<=", required="0.5"),
]


def _h100_row(c, ms, peak, **kw):
    """A row as do_bench's 100 calls give it, its 95% interval 1% a side."""
    row = base_row(dataclasses.replace(c, **gpu_check.STAGE_SETTINGS[c.study]))
    row.update({"status": "ok", "time_ms_median": ms, "time_ms_ci_low": ms * 0.99, "time_ms_ci_high": ms * 1.01,
                "n_timed": 100, "peak_mem_bytes": peak, "device_name": "NVIDIA H100 80GB HBM3",
                "torch_version": "2.11.0+cu130", "triton_version": "3.6.0", "threads": 16, **kw})  # fmt: skip
    return row


def _verdict_rows(tmp_path):
    tri = dataclasses.replace(gpu_check._config(_T, "triton"), study="targets")
    out_bytes = 16 * 32768 * (64 * 2 + 8)
    gpu_check.append(tmp_path, _h100_row(tri, 1.0, out_bytes), "run-2")  # exactly the output + (m, 1/l)
    gpu_check.append(tmp_path, _h100_row(dataclasses.replace(tri, impl="flex"), 1.3, 10**9), "run-1")
    why = "over the time budget: stopped by gpu_check after 9 s"
    gpu_check.append(
        tmp_path, _h100_row(dataclasses.replace(tri, impl="sdpa"), 0, 0, status="skipped", reason=why), "run-2"
    )
    cor = gpu_check.correctness_configs(_VERDICT_TARGETS)[0]
    row = _h100_row(dataclasses.replace(cor, study="correctness"), 1.0, 1, status="wrong", reason="dq off")
    gpu_check.append(tmp_path, row, "run-2")
    return read_rows(tmp_path / gpu_check.ROWS)


def test_verdict_judges_each_target_from_rows_of_another_machine(tmp_path):
    lines = gpu_check.verdict(_verdict_rows(tmp_path), _VERDICT_TARGETS)
    got = {r["target"].split(",")[0]: r for r in reversed(lines)}  # the first of each name
    assert got["faster"]["status"] == "pass" and got["faster"]["measured"] == "1.3 [1.28, 1.32]"
    assert "stale: from run run-1" in got["faster"]["note"]  # flex's row is the earlier run's
    assert got["lean"]["status"] == "pass" and got["lean"]["measured"] == "1" and not got["lean"]["note"]
    assert got["absent"]["status"] == "missing" and "sdpa: skipped: over the time budget" in got["absent"]["note"]
    assert got["slow"]["status"] == "FAIL"  # 1 / 1.3 > 0.5
    assert got["triton correct"]["status"] == "FAIL" and "dq off" in got["triton correct"]["note"]
    cupy = [r for r in got.values() if r["target"].startswith("cupy")]
    assert not cupy  # the targets name no cupy configuration
    missing = [r for r in gpu_check.verdict([], _VERDICT_TARGETS) if r["status"] == "missing"]
    assert len(missing) == len(gpu_check.verdict([], _VERDICT_TARGETS)) and missing[0]["note"] == "no row"


def test_verdict_only_recomputes_the_file_and_says_what_it_cannot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "targets", lambda path=None: _VERDICT_TARGETS)
    rows = _verdict_rows(tmp_path)
    assert gpu_check.main(["--verdict-only", str(tmp_path)]) == 0
    with open(tmp_path / gpu_check.VERDICT, newline="") as f:
        assert list(csv.DictReader(f)) == gpu_check.verdict(rows)
    assert "Verdict: 2 pass, 2 FAIL, 0 inconclusive, 4 missing of 8" in capsys.readouterr().out  # 3: no row
    assert gpu_check.main(["--verdict-only", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no rows.csv" in err


def test_no_gpu_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "attnbench.gpu_check", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "no CUDA device" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_other_files_is_refused(tmp_path, capsys):
    sys.path.insert(0, str(FAKES.parent))
    import gpu_fakes

    (tmp_path / "mine.txt").write_text("x")
    assert gpu_check.main([str(tmp_path)], machine=gpu_fakes.FAKE) == 2
    assert "mine.txt" in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


# ---------------------------------------------------------------- the whole command, faked
_TOY = """
import pytest
@pytest.mark.gpu
def test_on_the_gpu():
    pass
@pytest.mark.parametrize("i", range(3))
def test_ok(i):
    assert i >= 0
def test_broken():
    assert 1 == 2, "deliberately failing"
"""


@pytest.mark.slow
def test_the_whole_command_on_a_faked_h100_is_bounded_and_its_verdict_recomputable(tmp_path):
    """A run in which cupy's correctness jobs hang and its forward targets crash their
    worker: it ends within its budget (+10 s), leaves at most 8 files, the verdict
    names what is missing and why, and --verdict-only in another process (no fakes,
    this CPU machine) writes the same verdict.csv."""
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test_toy.py").write_text(_TOY)
    out = tmp_path / "out"
    env = dict(os.environ, ATTNBENCH_FAKE_TESTS=str(tmp_path / "toy"), ATTNBENCH_FAKE_HANG="cupy:fwd_bwd:correctness",
               ATTNBENCH_FAKE_CRASH="cupy:fwd:targets")  # fmt: skip
    t0 = time.time()
    budget = 120  # room for a loaded machine: the hang ends at the correctness stage's deadline
    r = subprocess.run([sys.executable, str(FAKES), str(out), "--budget", str(budget)], capture_output=True,
                       text=True, timeout=300, env=env)  # fmt: skip
    took = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert took <= budget + 10, took
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and set(names) <= set(gpu_check.OUT_FILES) and not [p for p in out.iterdir() if p.is_dir()]
    for name in (gpu_check.VERDICT, gpu_check.ROWS, gpu_check.SUMMARY, gpu_check.LOG, gpu_check.ARCHIVE):
        assert name in names
    with open(out / gpu_check.VERDICT, newline="") as f:
        lines = list(csv.DictReader(f))
    hung = [v for v in lines if v["target"].startswith("cupy correct") and v["target"].endswith("fwd_bwd")]
    assert hung and all(v["status"] == "missing" and "over the time budget" in v["note"] for v in hung)
    assert r.stdout.rstrip().splitlines()[-1].lstrip().startswith(("pass", "FAIL", "inconclusive", "missing"))
    assert "Verdict:" in r.stdout
    rows = read_rows(out / gpu_check.ROWS)
    assert {r["device_name"] for r in rows if r["status"] == "ok"} == {"NVIDIA H100 80GB HBM3"}
    crashed = next(r for r in rows if (r["impl"], r["mode"], r["study"]) == ("cupy", "fwd", "targets"))
    assert crashed["status"] == "error" and "died" in crashed["reason"]
    after = [r for r in rows if (r["impl"], r["mode"], r["study"]) == ("cupy", "fwd_bwd", "targets")]
    assert after[0]["status"] == "ok"  # a new worker took the next job
    before = (out / gpu_check.VERDICT).read_bytes()
    r2 = subprocess.run([sys.executable, "-m", "attnbench.gpu_check", "--verdict-only", str(out)], capture_output=True,
                        text=True, timeout=120, cwd=gpu_check.ROOT)  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    assert (out / gpu_check.VERDICT).read_bytes() == before


# ---------------------------------------------------------------- the machine and the tests
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


_SUITE = """
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


def _toy(tmp_path, body: str) -> tuple[str, Path]:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "test_toy.py").write_text(body)
    (tmp_path / "out").mkdir()
    return str(tmp_path / "toy" / "test_toy.py"), tmp_path / "out"


@pytest.mark.parametrize("workers", [1, 2])
def test_run_tests_counts_from_junit(tmp_path, workers):
    path, out = _toy(tmp_path, _SUITE)
    res = gpu_check.run_tests(out, 120, workers, paths=(path,), device="cpu")
    assert res["counts"] == {"passed": 4, "failed": 1, "errors": 0, "skipped": 1}, res
    assert res["rc"] == 1 and len(res["failed"]) == 1 and "test_broken" in res["failed"][0]
    assert "deliberately failing" in res["failed"][0]
    assert ("bringing up nodes" in (out / "tests.log").read_text()) == (workers > 1)  # xdist's workers


def test_run_tests_stops_at_its_limit_and_counts_what_ran(tmp_path):
    path, out = _toy(tmp_path, "import time\ndef test_quick():\n    pass\ndef test_slow():\n    time.sleep(60)\n")
    t0 = time.time()
    res = gpu_check.run_tests(out, 6, 1, paths=(path,), device="cpu")
    assert res["stopped"] and time.time() - t0 < 20
    assert res["counts"]["passed"] == 1, res


def test_the_gpu_only_tests_and_the_rest_merge_into_one_junit_file(tmp_path):
    path, out = _toy(tmp_path, _TOY)
    a = gpu_check.run_tests(out, 120, 1, paths=(path,), device="cpu", marks="gpu", name="gpu-tests")
    b = gpu_check.run_tests(out, 120, 1, paths=(path,), device="cpu", marks="not gpu", name="tests")
    assert a["counts"]["passed"] == 1 and b["counts"] == {"passed": 3, "failed": 1, "errors": 0, "skipped": 0}
    gpu_check.merge_junit([out / "gpu-tests.xml", out / "tests.xml", out / "absent.xml"], tmp_path / "all.xml")
    assert gpu_check.junit_counts(tmp_path / "all.xml")[0]["passed"] == 4


def test_triton_tests_share_a_worker_group():
    from conftest import kernel_group

    class Case:
        D = 64

    item = type("Item", (), {"callspec": type("C", (), {"params": {"impl": "triton", "case": Case, "dtype": "bf16"}})})
    assert kernel_group(item) == "triton-D64-bf16"
    item.callspec.params = {"impl": "flex", "case": Case, "dtype": "bf16"}
    assert kernel_group(item) is None
