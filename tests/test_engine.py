"""The measurement pipeline and the sweep: statuses, guards, isolation, resume."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import Nudge

import attnbench
from attnbench import Pattern
from attnbench import measure as measure_mod
from attnbench.config import BenchConfig
from attnbench.results import base_row, columns, format_rows
from attnbench.sweep import _inputs_bytes, measure, predict_memory, sweep
from attnbench.tables import read_rows
from attnbench.verify import check_grads

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(seq_len=64, window=8, heads=2, head_dim=16, device="cpu", time_budget_s=0.05, min_reps=2, max_reps=5)


def cfg(tmp_path, **kw) -> BenchConfig:
    return BenchConfig(**{**TINY, "results_dir": str(tmp_path), "study": "t", "isolate": False, **kw})


def naive(q, k, v, p, s):
    return attnbench.get_impl("naive").fn(q, k, v, p, s)


def test_ok_row_has_every_column_and_true_flops(tmp_path):
    row = measure(cfg(tmp_path, impl="chunked", global_tokens=(0,)))
    assert row["status"] == "ok", row["reason"]
    assert set(columns()) <= set(row)
    assert row["verified"] == "exact" and row["max_abs_err"] < 1e-4 and row["max_abs_err"] <= row["tol"]
    assert row["n_timed"] >= 2 and 0 < row["time_ms_min"] <= row["time_ms_median"]
    assert row["flops"] == 4 * 16 * Pattern(8, global_tokens=(0,)).pairs(64, 2) * 1
    assert row["peak_mem_bytes"] > 0 and row["first_call_ms"] > 0


def test_the_inputs_are_drawn_once_per_job(tmp_path, monkeypatch):
    """Verification, timing and memory share one set of inputs."""
    built = []
    real = measure_mod.AttentionCase.build.__func__

    def counting(cls, c, impl):
        built.append(c.seq_len)
        return real(cls, c, impl)

    monkeypatch.setattr(measure_mod.AttentionCase, "build", classmethod(counting))
    row = measure(cfg(tmp_path, impl="chunked", mode="fwd_bwd"))
    assert row["status"] == "ok", row["reason"]
    assert built == [64]


@pytest.mark.parametrize("mode, tensors", [("fwd", 3), ("fwd_bwd", 4)])
def test_inputs_are_one_device_call_per_tensor(monkeypatch, mode, tensors):
    """The same code path draws CUDA inputs: one ``torch.randn`` per tensor, made on the
    configuration's device by a generator on that device (no host copy); no cotangent
    in fwd mode."""
    calls = []
    real = torch.randn

    def spy(*args, **kw):
        calls.append((kw.get("device"), kw["generator"].device))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "randn", spy)
    c = cfg(None, impl="naive", mode=mode).resolved()
    case = measure_mod.AttentionCase.build(c, attnbench.get_impl("naive"))
    assert calls == [(torch.device("cpu"), torch.device("cpu"))] * tensors
    assert (case.dout is None) == (mode == "fwd")


def test_cuda_timing_goes_through_do_bench(monkeypatch):
    """On CUDA the timed calls are triton.testing.do_bench's, with the gradients to clear."""
    seen = {}

    def fake_do_bench(fn, rep, grad_to_none, return_mode):
        seen.update(rep=rep, grads=grad_to_none, mode=return_mode)
        return [3.0, 1.0, 2.0, 9.0]

    monkeypatch.setattr(measure_mod, "_do_bench", lambda: fake_do_bench)
    x = torch.zeros(2, requires_grad=True)
    got = measure_mod.time_fn(lambda: None, torch.device("cuda"), 0.5, max_reps=3, grad_to_none=[x])
    assert seen == {"rep": 500.0, "grads": [x], "mode": "all"}
    assert (got["timer"], got["time_ms_median"], got["n_timed"]) == ("do_bench", 2.0, 3)
    cpu = measure_mod.time_fn(lambda: None, torch.device("cpu"), 0.0, min_reps=2, max_reps=4)
    assert cpu["timer"] == "loop" and cpu["n_timed"] == 2


def test_wrong_result_gets_no_time(tmp_path, throwaway):
    throwaway("off_by_a_bit", lambda q, k, v, p, s: q * 0.5)
    row = measure(cfg(tmp_path, impl="off_by_a_bit"))
    assert row["status"] == "wrong" and "max abs diff" in row["reason"] and "> tol" in row["reason"]
    assert row["time_ms_median"] is None and row["peak_mem_bytes"] is None


def test_wrong_gradient_is_caught(tmp_path, throwaway):
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    throwaway("bad_grad", lambda q, k, v, p, s: BadGrad.apply(naive(q, k, v, p, s)))
    row = measure(cfg(tmp_path, impl="bad_grad", mode="fwd_bwd"))
    assert row["status"] == "wrong" and "gradient" in row["reason"]


@pytest.mark.parametrize("dtype", ["fp64", "fp32", "bf16", "fp16"])
def test_the_gate_at_its_boundary(tmp_path, throwaway, dtype):
    """The engine applies the verification policy: an output entry off by 0.5x the
    tolerance it reports is ok, off by 1.5x is wrong."""
    delta = {"value": 0.0}

    def nudged(q, k, v, p, s):
        out = naive(q, k, v, p, s)
        out[0, 1, 5, 3] += delta["value"]
        return out

    throwaway("nudged", nudged)
    c = cfg(tmp_path, impl="nudged", dtype=dtype)
    row = measure(c)
    assert row["status"] == "ok", row["reason"]
    for scale, status in ((0.5, "ok"), (1.5, "wrong")):
        delta["value"] = scale * row["tol"]
        got = measure(c)
        assert got["status"] == status, (scale, got["reason"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_gradient_gate_at_its_boundary(tmp_path, throwaway, dtype):
    delta = {"dq": None}
    throwaway("nudged_grad", lambda q, k, v, p, s: naive(Nudge.apply(q, delta["dq"]), k, v, p, s))
    c = cfg(tmp_path, impl="nudged_grad", dtype=dtype, mode="fwd_bwd")
    case = measure_mod.AttentionCase.build(c.resolved(), attnbench.get_impl("naive"))  # the inputs the gate sees
    delta["dq"] = torch.zeros(case.q.shape, dtype=torch.float64)
    tol = check_grads(lambda *x: naive(*x, case.pattern, case.scale), case.q, case.k, case.v, case.pattern,
                      case.dout, case.scale)[0].tol  # fmt: skip
    for scale, status in ((0.5, "ok"), (1.5, "wrong")):
        delta["dq"][0, 0, 9, 1] = scale * tol
        row = measure(c)
        assert row["status"] == status, (scale, row["reason"])
    assert "gradient n=64 dq: max abs diff" in row["reason"]


@pytest.mark.parametrize("where", ["dq", "dk"])
def test_gradients_are_checked_at_the_measured_size_by_sampled_rows(tmp_path, throwaway, where):
    """A backward that is wrong only at the measured length (as a config autotuned for
    long sequences would be), near the end, is caught by the sampled rows' gradients at
    full size: dq on the last row, dk on a key only the last rows reach."""
    n, size = 600, {"bump": 0.05}

    def bump(x):  # (B, H, n, D): off at the last token of a 600-token call only
        d = torch.zeros(x.shape, dtype=torch.float64)
        if x.shape[2] == n:
            d[0, 1, n - 1, 3] = size["bump"]
        return d

    nudge = {"dq": lambda q, k: (Nudge.apply(q, bump(q)), k), "dk": lambda q, k: (q, Nudge.apply(k, bump(k)))}[where]
    throwaway("late_grad", lambda q, k, v, p, s: naive(*nudge(q, k), v, p, s))
    c = cfg(tmp_path, impl="late_grad", mode="fwd_bwd", seq_len=n, heads=2, head_dim=16, window=8,
            exact_verify_bytes=0)  # fmt: skip
    row = measure(c)
    assert row["status"] == "wrong" and f"gradient n={n} {where}" in row["reason"], row["reason"]
    assert row["verified"].startswith("rows")
    size["bump"] = 0.0
    assert measure(c)["status"] == "ok"


@pytest.mark.parametrize("dtype, factor", [("fp32", 1.001), ("bf16", 1.01)])
def test_a_small_scaling_error_is_wrong(tmp_path, throwaway, dtype, factor):
    """x1.001 in fp32 on a CPU (exact fp32 arithmetic, no TF32 slack), x1.01 in bf16."""
    throwaway("scaled", lambda q, k, v, p, s: (naive(q, k, v, p, s).double() * factor).to(q.dtype))
    row = measure(cfg(tmp_path, impl="scaled", dtype=dtype, seq_len=256, window=64, heads=4, head_dim=64))
    assert row["status"] == "wrong", row["reason"]


def test_non_finite_output_is_wrong(tmp_path, throwaway):
    def one_nan(q, k, v, p, s):
        out = naive(q, k, v, p, s)
        out[0, 0, 3, 0] = float("nan")
        return out

    throwaway("one_nan", one_nan)
    row = measure(cfg(tmp_path, impl="one_nan"))
    assert row["status"] == "wrong" and "1 non-finite value(s) where the reference is finite" in row["reason"]


def test_error_and_oom_are_rows(tmp_path, throwaway):
    def boom(q, k, v, p, s):
        raise RuntimeError("kernel exploded")

    def oom(q, k, v, p, s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def cpu_oom(q, k, v, p, s):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    throwaway("boom", boom)
    throwaway("oomer", oom)
    throwaway("cpu_oomer", cpu_oom)
    configs = [cfg(tmp_path, impl=i) for i in ("boom", "oomer", "cpu_oomer", "chunked")]
    rows = sweep(configs, progress=False)
    assert [r["status"] for r in rows] == ["error", "oom", "oom", "ok"]  # the sweep survived each
    assert "kernel exploded" in rows[0]["reason"] and "can't allocate memory" in rows[2]["reason"]
    assert len(read_rows(tmp_path / "t.csv")) == 4


def test_cpu_oom_stops_its_series(tmp_path, throwaway):
    throwaway("cpu_oomer", lambda *a: (_ for _ in ()).throw(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    rows = sweep([cfg(tmp_path, impl="cpu_oomer", seq_len=n) for n in (32, 64)], progress=False, history={})
    assert [r["status"] for r in rows] == ["oom", "skipped"]
    assert rows[1]["reason"] == "over the memory budget: ran out of memory at seq_len=32"


def test_unsupported_and_unavailable_are_skipped_with_reasons(tmp_path, throwaway):
    throwaway("no_dilation", features=("backward",))
    row = measure(cfg(tmp_path, impl="no_dilation", dilation=2, causal=True))
    assert row["status"] == "skipped"
    assert "feature 'dilation' not supported" in row["reason"] and "'causal'" in row["reason"]
    throwaway("missing_pkg", probe=lambda: "needs the 'zzz' package (not installed)")
    row = measure(cfg(tmp_path, impl="missing_pkg"))
    assert row["status"] == "skipped" and row["reason"].startswith("unavailable: needs the 'zzz'")


def test_memory_guard_skips_naive_at_32k(tmp_path):
    row = measure(cfg(tmp_path, impl="naive", seq_len=32768, heads=12, head_dim=64, window=512, mem_budget_gb=20))
    assert row["status"] == "skipped"
    assert row["reason"].startswith("over the memory budget: needs ~") and "GiB (estimate)" in row["reason"]
    assert row["mem_estimate_bytes"] > 12 * 32768**2 * 4


def test_memory_prediction_follows_the_series_measured_peaks(throwaway):
    """Measured peaks at smaller n predict the next, in place of the implementation's
    estimate: grown as the estimate grows where there is one (it knows where a window
    stops growing with n), else with the exponent of the last two points."""
    c = BenchConfig(impl="naive", seq_len=8192, heads=12, head_dim=64, device="cpu").resolved()
    impl = attnbench.get_impl("naive")
    series = [dict(status="ok", seq_len=n, peak_mem_bytes=m) for n, m in ((2048, 1e9 / 16), (4096, 1e9 / 4))]
    need, source = predict_memory(c, impl, series)
    inputs = 3 * 12 * 8192 * 64 * 4
    assert source == "from n=4096, grown as the estimate"
    assert need == pytest.approx(1e9 / 4 * _est(c, impl, 8192) / _est(c, impl, 4096) + inputs)
    assert 0.9e9 < need - inputs < 1e9  # naive's estimate grows as n^2, less a linear part
    estimate, source = predict_memory(c, impl, [])
    assert source == "estimate" and estimate > need  # the estimate alone is the cautious one
    throwaway("no_estimate")  # no memory estimate: the series' own exponent
    need, source = predict_memory(dataclasses.replace(c, impl="no_estimate"), attnbench.get_impl("no_estimate"),
                                  series)  # fmt: skip
    assert source == "from n=4096, exponent 2.0" and need == pytest.approx(1e9 + inputs)
    # a causal (4095, 0) window stops growing as n^2 at n = 4096: chunked's peak from 2048 to 8192
    w = dataclasses.replace(c, impl="chunked", window=4095, causal=True, heads=32, kv_heads=8, head_dim=128)
    chunked = attnbench.get_impl("chunked")
    need, source = predict_memory(w, chunked, [dict(status="ok", seq_len=2048, peak_mem_bytes=2.4e9)])
    grown = (need - _inputs_bytes(w)) / 2.4e9
    assert source == "from n=2048, grown as the estimate" and 2.0 < grown < 8.0  # n^2 would be 16x


def _est(c, impl, n):
    return impl.estimate_memory(c.batch, c.heads, c.kv_heads, n, c.head_dim, 4, c.pattern(), False)


def test_hang_is_stopped_and_recorded(tmp_path):
    # loop at this size takes far longer than the 4 s allowed: the child is stopped
    row = measure(
        cfg(tmp_path, impl="loop", seq_len=16384, heads=12, window=512, head_dim=64, isolate=True, job_timeout_s=4)
    )
    assert row["status"] == "skipped" and "stopped after job_timeout_s=4" in row["reason"]


def test_peak_memory_is_real(tmp_path):
    """naive at n=2048 fp32 holds at least one (B, H, n, n) fp32 score tensor; chunked far less."""
    common = dict(seq_len=2048, heads=12, head_dim=64, window=64, dtype="fp32", isolate=True, max_reps=1, min_reps=1)
    naive_row = measure(cfg(tmp_path, impl="naive", **common))
    chunked = measure(cfg(tmp_path, impl="chunked", **common))
    assert naive_row["status"] == chunked["status"] == "ok", (naive_row["reason"], chunked["reason"])
    scores = 1 * 12 * 2048**2 * 4  # naive's (B, H, n, n) fp32 scores
    assert naive_row["peak_mem_bytes"] >= scores
    assert chunked["peak_mem_bytes"] * 5 < naive_row["peak_mem_bytes"]
    # chunked's band and copies are about 60 MiB: the resident set the process had
    # before the call (torch alone is hundreds of MiB) is not counted
    assert 0 < chunked["peak_mem_bytes"] < 150 * 2**20, chunked["peak_mem_bytes"]


def test_invalid_config_is_refused_before_anything_runs(tmp_path):
    for bad, match in [
        (dict(impl="nope"), "choose one of"),
        (dict(seq_len=0), "seq_len=0"),
        (dict(window=3), "window=3"),
        (dict(dtype="fp8"), "dtype='fp8'"),
        (dict(mode="train"), "mode='train'"),
        (dict(global_tokens=(64,)), "0 <= g < seq_len=64"),
        (dict(results_dir=str(tmp_path / "a_file" / "x")), "is not a folder"),
    ]:
        (tmp_path / "a_file").write_text("")
        with pytest.raises(ValueError, match=match):
            sweep([cfg(tmp_path, impl="chunked"), cfg(tmp_path, **bad)], progress=False)
        assert not (tmp_path / "t.csv").exists()


def test_unwritable_results_dir_is_found_before_measuring(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    c = cfg(tmp_path, impl="loop", results_dir=str(tmp_path / "file" / "results"))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"results_dir=.*file/results'.*is not a folder"):
        sweep([c], progress=False)
    assert time.perf_counter() - t0 < 2  # nothing was measured first


def test_console_table_says_how_each_result_was_verified(tmp_path):
    rows = sweep([cfg(tmp_path, impl="chunked")], progress=False)
    text = format_rows(rows)
    assert "verified" in text.splitlines()[0] and "max err" in text.splitlines()[0]
    assert " exact " in text.splitlines()[1]


# ---------------------------------------------------------------------- isolation
SCRIPT = """
import sys
import attnbench
from attnbench.config import BenchConfig
from attnbench.sweep import measure

@attnbench.register("mine", features=attnbench.FEATURES)
def mine(q, k, v, pattern, scale):
    {body}
    return attnbench.get_impl("chunked").fn(q, k, v, pattern, scale)

if __name__ == "__main__":
    row = measure(BenchConfig(impl="mine", seq_len=64, window=8, heads=2, head_dim=16, device="cpu",
                              time_budget_s=0.05, min_reps=2, max_reps=3, isolate=True, {extra}))
    print("STATUS", row["status"], row["reason"])
"""


def _script(tmp_path, body="pass", extra="") -> Path:
    path = tmp_path / "user_script.py"
    path.write_text(textwrap.dedent(SCRIPT).format(body=body, extra=extra))
    return path


def test_an_implementation_registered_in_a_script_runs_isolated(tmp_path):
    """The child process imports the user's script (as multiprocessing does) and finds
    the implementation it registers."""
    r = subprocess.run(
        [sys.executable, str(_script(tmp_path))], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "STATUS ok" in r.stdout, r.stdout + r.stderr[-2000:]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pid: int, within: float) -> bool:
    end = time.time() + within
    while time.time() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, not yet reaped by its (dead) parent's successor
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_the_measuring_child_dies_with_its_parent(tmp_path, how):
    marker = tmp_path / "child.pid"
    body = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    parent = subprocess.Popen([sys.executable, str(_script(tmp_path, body))], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        end = time.time() + 60
        while not marker.exists() or not marker.read_text():
            assert time.time() < end and parent.poll() is None, "the child never started"
            time.sleep(0.1)
        child = int(marker.read_text())
        os.kill(parent.pid, how)
        parent.wait(30)
        assert _gone(child, 10), "the measuring child outlived its parent"
    finally:
        parent.kill()


# ---------------------------------------------------------------------- resume
def test_resume_skips_what_is_done(tmp_path, caplog):
    configs = [cfg(tmp_path, impl="chunked", seq_len=n) for n in (32, 48)]
    assert len(sweep(configs, progress=False)) == 2
    assert sweep(configs + [cfg(tmp_path, impl="chunked", seq_len=80)], resume=True, progress=False)[0]["seq_len"] == 80
    assert len(read_rows(tmp_path / "t.csv")) == 3
    # one line per study says what was skipped, from when and where, and how to measure it again
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    stamp, host = read_rows(tmp_path / "t.csv")[0]["timestamp"][:10], read_rows(tmp_path / "t.csv")[0]["host"]
    assert f"2 of 3 jobs already in {tmp_path / 't.csv'}, measured {stamp} on {host}" in line, line
    assert "without resume=true" in line and "fewer repeats" not in line, line
    caplog.clear()  # asked with more repeats than they were measured with: still skipped, and said
    more = [dataclasses.replace(c, repeats=3) for c in configs]
    assert sweep(more, resume=True, progress=False) == []
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume:")]
    assert "2 of them with fewer repeats than asked" in line, line


def test_resume_measures_what_another_machine_measured_and_retries_errors(tmp_path, throwaway):
    from attnbench.tables import append_row

    c = cfg(tmp_path, impl="chunked")
    elsewhere = base_row(c.resolved())
    elsewhere.update(status="ok", device_name="Another CPU (64 cores)", time_ms_median=1.0)
    older_torch = base_row(c.resolved())
    older_torch.update(status="ok", torch_version="2.6.0", time_ms_median=1.0)
    append_row(tmp_path / "t.csv", elsewhere)
    append_row(tmp_path / "t.csv", older_torch)
    assert [r["status"] for r in sweep([c], resume=True, progress=False)] == ["ok"]  # measured here after all
    assert sweep([c], resume=True, progress=False) == []  # now it is done here
    flaky = {"calls": 0}

    def fails_once(q, k, v, p, s):
        flaky["calls"] += 1
        if flaky["calls"] == 1:
            raise RuntimeError("transient failure")
        return naive(q, k, v, p, s)

    throwaway("flaky", fails_once)
    f = cfg(tmp_path, impl="flaky")
    assert [r["status"] for r in sweep([f], resume=True, progress=False)] == ["error"]
    assert [r["status"] for r in sweep([f], resume=True, progress=False)] == ["ok"]  # an error is tried again
    assert sweep([f], resume=True, progress=False) == []


def test_sweeps_of_one_process_share_the_predictive_guard(tmp_path):
    """A multirun's jobs run one sweep each (Hydra's basic launcher): the guard still sees
    the series measured by the jobs before."""
    history: dict = {}
    big = dict(heads=12, head_dim=64, window=64, job_timeout_s=3, min_reps=1, max_reps=2, warmup=0)
    (first,) = sweep([cfg(tmp_path, impl="loop", seq_len=128, **big)], progress=False, history=history)
    assert first["status"] == "ok", first["reason"]
    (last,) = sweep([cfg(tmp_path, impl="loop", seq_len=65536, **big)], progress=False, history=history)
    assert last["status"] == "skipped" and "from n=128" in last["reason"], last["reason"]  # time or memory


def test_a_fwd_bwd_series_grows_as_its_forward_series_does(tmp_path):
    """With one point of its own, a series borrows its growth from the same
    configuration's forward series: a linear implementation is not taken for quadratic."""
    from attnbench.sweep import _predict_time, _series_key

    c = cfg(tmp_path, impl="chunked", seq_len=4096, mode="fwd_bwd", job_timeout_s=30, warmup=0, min_reps=1).resolved()
    own = [dict(status="ok", seq_len=1024, time_ms_median=1000.0)]
    fwd = [dict(status="ok", seq_len=n, time_ms_median=t) for n, t in ((1024, 300.0), (2048, 600.0))]
    chunked, naive = attnbench.get_impl("chunked"), attnbench.get_impl("naive")
    slow_fwd = [dict(status="ok", seq_len=n, time_ms_median=t) for n, t in ((1024, 300.0), (2048, 1200.0))]
    assert _predict_time(c, chunked, own, fwd) is None  # 4 s a call, 5 calls: 20 s
    kind, why = _predict_time(c, chunked, own, slow_fwd)  # the forward's growth wins over the declared one
    assert kind == "time" and "exponent 2.0" in why, why
    # without a forward series, the implementation's declared growth: linear for chunked ...
    assert _predict_time(c, chunked, own, []) is None
    # ... quadratic for a dense implementation (16 s a call)
    kind, why = _predict_time(dataclasses.replace(c, impl="naive"), naive, own, [])
    assert kind == "time" and "exponent 2.0" in why, why
    # a model's series and the attention call's are different series
    assert _series_key(c) != _series_key(dataclasses.replace(c, model_layers=2))
    assert _series_key(c, "fwd") == _series_key(dataclasses.replace(c, mode="fwd"))


def test_the_naive_memory_estimate_is_close_to_its_measured_peak(tmp_path):
    """The guard's estimate for naive is within 1.3x of what the call really allocates
    (it was 1.7x, and skipped sizes the machine could run)."""
    row = measure(
        cfg(tmp_path, impl="naive", seq_len=1024, heads=12, window=64, warmup=0, min_reps=1, max_reps=1, isolate="true")
    )  # a fresh process, as a sweep measures it
    assert row["status"] == "ok", row["reason"]
    ratio = row["mem_estimate_bytes"] / row["peak_mem_bytes"]
    assert 0.9 < ratio < 1.3, (row["mem_estimate_bytes"], row["peak_mem_bytes"])
