"""Blind spots a mutation audit found: bugs planted one line at a time that no test caught.

Each test here fails on one of the mutations of ``scripts/mutation_check.py`` (named in
its docstring) and passes on the code as it is: the identity of a measurement, the
gradient gate, the CPU timer's unit, the fp32 tolerance floors, the sampled gradient
check, the ratio table's join, the FLOPs of the backward, the profiler's unit.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import Nudge, rand_dout, rand_qkv

import attnbench
from attnbench import Pattern
from attnbench import measure as measure_mod
from attnbench.config import BenchConfig
from attnbench.plot import ratio_table
from attnbench.results import MODE_WORK, base_row, identity
from attnbench.sweep import measure
from attnbench.verify import ATOL, MEAN_ATOL, check_grads, check_output, sample_rows, tolerance

TINY = dict(seq_len=64, window=8, heads=2, head_dim=16, device="cpu", time_budget_s=0.05, min_reps=2, max_reps=5)


def cfg(tmp_path, **kw) -> BenchConfig:
    return BenchConfig(**{**TINY, "results_dir": str(tmp_path), "study": "blind", "isolate": False, **kw})


def naive(q, k, v, p, s):
    return attnbench.get_impl("naive").fn(q, k, v, p, s)


# ---------------------------------------------------------------------- 1. identity
#: the configuration every identity below is changed from, one field at a time
BASE = dict(impl="chunked", seq_len=64, window=8, heads=4, head_dim=16, dtype="fp32", device="cpu", study="t")

#: fields that describe the measurement -> (other values, settings the change needs)
DESCRIBING = {
    "impl": (["naive"], {}),
    "seq_len": ([128], {}),
    "window": ([16, [4, 2]], {}),
    "dilation": ([2, [1, 2, 1, 2]], {}),
    "global_tokens": ([[0], [0, 5]], {}),
    "causal": ([True], {}),
    "batch": ([2], {}),
    "heads": ([8], {}),
    "kv_heads": ([2, 1], {}),
    "head_dim": ([32], {}),
    "dtype": (["bf16", "fp16", "fp64"], {}),
    "device": (["cuda"], {}),
    "mode": (["bwd", "fwd_bwd"], {}),
    "study": (["other"], {}),
    "threads": ([torch.get_num_threads() + 1], {}),
    "model_layers": ([1, 2], {}),
    "model": (["modernbert"], {"model_layers": 2}),  # the family matters only inside a model
}

#: fields that are run control -> (another value, why): how a measurement is checked,
#: timed, guarded, isolated or stored, not what is measured (a re-run that changes one of
#: these measures the same thing again, and supersedes it)
RUN_CONTROL = {
    "seed": (1, "the random draw of the inputs (and of a model's weights): the time and memory of a call do not "
             "depend on the values, so another draw is the same measurement again (seed is not a column)"),
    "results_dir": ("elsewhere", "where the table is written"),
    "verify": (False, "whether the answer is checked; the row's `verified` column says how it was"),
    "exact_verify_bytes": (0, "how the answer is checked (the dense reference or sampled rows)"),
    "verify_rows": (7, "how many rows the sampled check draws"),
    "grad_check_seq_len": (64, "the length the patched model's gradients are checked at"),
    "time_budget_s": (9.0, "how long the timed calls go on (the statistics, not the quantity)"),
    "min_reps": (5, "how many timed calls at least"),
    "max_reps": (50, "how many timed calls at most"),
    "warmup": (3, "untimed calls before the timed ones"),
    "flush_l2": (False, "on a CPU a no-op (the engine's loop either way); on CUDA it picks the timing loop "
                 "(see test_identity_tells_a_cold_l2_from_a_warm_one: a gap there)"),
    "repeats": (3, "how many fresh processes measure it: the interval narrows, the thing measured is the same"),
    "memory": (False, "whether peak memory is measured at all (an empty column, not another value)"),
    "mem_budget_gb": (3.0, "the guard that skips what would not fit"),
    "mem_budget_fraction": (0.9, "the guard that skips what would not fit"),
    "job_timeout_s": (60.0, "the guard that stops a hang"),
    "interpreter_max_seq": (1024, "the guard that skips slow interpreted runs"),
    "allow_slow": (True, "the guard that skips slow interpreted runs"),
    "isolate": ("false", "whether the job runs in a child process"),
    "profile": (True, "one more call, untimed, under the profiler"),
    "figure": ("none", "the figure drawn from the study's table at the run's end"),
}  # fmt: skip


def _resolved(c: BenchConfig) -> BenchConfig:
    """``c.resolved()``; device=cuda without CUDA here: resolved on the CPU, then cuda."""
    if c.device == "cuda" and not torch.cuda.is_available():
        return dataclasses.replace(dataclasses.replace(c, device="cpu").resolved(), device="cuda")
    return c.resolved()


def test_every_field_is_either_in_the_identity_or_run_control():
    """A new field of BenchConfig must be classified here: in the identity, or run control."""
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    both = set(DESCRIBING) & set(RUN_CONTROL)
    assert not both, f"classified twice: {sorted(both)}"
    assert fields == set(DESCRIBING) | set(RUN_CONTROL), (
        f"unclassified: {sorted(fields - set(DESCRIBING) - set(RUN_CONTROL))}; "
        f"not fields: {sorted(set(DESCRIBING) | set(RUN_CONTROL) - fields)}"
    )


@pytest.mark.parametrize("field", sorted(DESCRIBING))
def test_identity_changes_with_every_field_that_describes_the_measurement(field):
    """Mutation identity-dtype: resume, merge and "latest" would take a bf16 row for
    the fp32 one (and so for each field that describes the measurement)."""
    others, needs = DESCRIBING[field]
    base = BenchConfig(**{**BASE, **needs})
    want = identity(base_row(_resolved(base)))
    for value in others:
        got = identity(base_row(_resolved(dataclasses.replace(base, **{field: value}))))
        assert got != want, f"{field}={value!r} vs {getattr(base, field)!r}: the same identity {got}"


@pytest.mark.parametrize("field", sorted(RUN_CONTROL))
def test_run_control_does_not_change_the_identity(field):
    """The other side: a re-run with another budget, guard or check is the same measurement."""
    value, _why = RUN_CONTROL[field]
    base = BenchConfig(**BASE)
    changed = dataclasses.replace(base, **{field: value})
    got, want = identity(base_row(_resolved(changed))), identity(base_row(_resolved(base)))
    assert got == want, f"{field}={value!r}: identity {got} != {want}"


def test_identity_tells_a_cold_l2_from_a_warm_one():
    """On CUDA, flush_l2=true times with do_bench, the L2 cache flushed before each call;
    flush_l2=false times warm calls in the engine's loop. Two different measurements, but
    their rows have the same identity: resume skips the second, latest keeps one of them.

    Known to FAIL today (reported): results.base_row records no flush_l2 (on CUDA) and
    results.IDENTITY does not include it."""
    c = _resolved(BenchConfig(**{**BASE, "device": "cuda", "dtype": "bf16"}))
    cold, warm = base_row(c), base_row(dataclasses.replace(c, flush_l2=False))
    assert identity(cold) != identity(warm), f"flush_l2=true and false: the same identity {identity(cold)}"


# ---------------------------------------------------------------------- 2. the gradient gate
def test_a_wrong_gradient_gets_no_time_and_no_memory(tmp_path, throwaway):
    """Mutation grad-wrong-timed: a fwd_bwd row whose forward is right and whose gradient
    is wrong is ``wrong``, and nothing after the gate runs: no time, no memory."""
    delta = torch.zeros(1, 2, 64, 16, dtype=torch.float64)
    delta[0, 1, 20, 3] = 0.05  # dq off by 0.05 at one entry; the forward is naive's
    throwaway("right_fwd_wrong_grad", lambda q, k, v, p, s: naive(Nudge.apply(q, delta), k, v, p, s))
    row = measure(cfg(tmp_path, impl="right_fwd_wrong_grad", mode="fwd_bwd"))
    assert row["status"] == "wrong", (row["status"], row["reason"], row["time_ms_median"], row["peak_mem_bytes"])
    assert "gradient" in row["reason"] and "dq" in row["reason"], row["reason"]
    assert row["max_abs_err"] <= row["tol"], f"the forward passed: max abs diff {row['max_abs_err']} > {row['tol']}"
    assert row["grad_max_abs_err"] == pytest.approx(0.05, rel=0.01), row["grad_max_abs_err"]
    measured = ["time_ms_median", "time_ms_iqr", "time_ms_min", "n_timed", "timer", "peak_mem_bytes", "tflops"]
    filled = {k: row[k] for k in measured if row[k] is not None}
    assert not filled, f"a row that failed its gradient check was measured: {filled}"


# ---------------------------------------------------------------------- 3. the CPU timer
def test_the_cpu_timer_reports_milliseconds():
    """Mutation timer-seconds: a call that sleeps 20 ms is timed at 20 ms, not 0.02."""
    got = measure_mod.time_fn(lambda: time.sleep(0.02), torch.device("cpu"), 0.0, warmup=0, min_reps=3, max_reps=3)
    assert got["timer"] == "loop" and got["n_timed"] == 3, got
    assert 15 <= got["time_ms_min"] <= got["time_ms_median"] <= 200, (
        f"a 20 ms sleep timed at median {got['time_ms_median']!r} ms, min {got['time_ms_min']!r} ms"
    )


def test_a_measured_row_reports_milliseconds(tmp_path, throwaway):
    """The same through the pipeline: the first call and the timed calls of a 20 ms call."""

    def slow(q, k, v, p, s):
        time.sleep(0.02)
        return naive(q, k, v, p, s)

    throwaway("sleeps_20ms", slow)
    row = measure(cfg(tmp_path, impl="sleeps_20ms", memory=False))
    assert row["status"] == "ok", row["reason"]
    for col in ("first_call_ms", "time_ms_min", "time_ms_median"):
        assert 15 <= row[col] <= 200, f"a 20 ms call: {col} = {row[col]!r}"


# ---------------------------------------------------------------------- 4. the fp32 floors
def test_the_fp32_floors_are_pinned():
    """Mutation fp32-floors-x10: the floors by their numbers (widening them is a decision
    of the policy, made here and in the README, not a drift)."""
    assert (ATOL["fp32"], MEAN_ATOL["fp32"]) == (2e-5, 2e-7), (ATOL["fp32"], MEAN_ATOL["fp32"])
    assert tolerance("fp32", 0.0, 0.0) == (2e-5, 2e-7), tolerance("fp32", 0.0, 0.0)
    assert tolerance(torch.float32, 1e-6, 1e-8) == pytest.approx((2e-6 + 2e-5, 1.5e-8 + 2e-7), rel=1e-12)


@pytest.mark.parametrize("how", ["one entry off by 1e-4", "every entry off by 6e-7"])
def test_the_fp32_floors_catch_what_they_should(how):
    """On a CPU (exact fp32 arithmetic, a control error around 1e-7) one entry off by
    1e-4 is over the max floor, and a bias of 6e-7 everywhere over the mean floor; a
    10x wider floor lets both through."""
    q, k, v = rand_qkv(1, 2, 64, 16, torch.float32)
    p = Pattern(8)
    exact = attnbench.reference(q, k, v, p)  # float64
    assert check_output(exact.float(), q, k, v, p).ok, "the reference rounded to fp32 must pass"
    if how.startswith("one"):
        exact[0, 1, 17, 5] += 1e-4
    else:
        exact += 6e-7
    v_ = check_output(exact.float(), q, k, v, p, what=how)
    assert not v_.ok, f"{how} passed: {v_} (mean tol {v_.mean_tol:.3e})"


# ---------------------------------------------------------------------- 5. sampled gradients
@pytest.mark.parametrize("which", ["dk", "dv"])
def test_sampled_gradients_compare_every_key_the_rows_reach(which):
    """Mutation sampled-dv-rows. With sampled rows, the cotangent is zero off those
    rows, so dq is known on the rows alone, but dk and dv on every key the sampled rows
    attend to (keys that are not themselves sampled rows included); keys no sampled row
    reaches get no gradient at all and are not compared. A gradient wrong only on a
    reached key that is not a sampled row must fail."""
    n, p, scale = 96, Pattern(8), attnbench.default_scale(16)
    q, k, v = rand_qkv(1, 2, n, 16, torch.float32)
    rows = sample_rows(n, p, 4, seed=3)
    reached = p.mask_rows(torch.as_tensor(rows), n, heads=2).any(0).any(0).nonzero().flatten().tolist()
    off_rows = sorted(set(reached) - set(rows))
    assert off_rows, f"rows {rows} reach no other key: {reached}"
    key = off_rows[len(off_rows) // 2]
    delta = torch.zeros(1, 2, n, 16, dtype=torch.float64)

    def fn(q, k, v):
        if which == "dk":
            k = Nudge.apply(k, delta)
        else:
            v = Nudge.apply(v, delta)
        return naive(q, k, v, p, scale)

    dout = rand_dout(q)
    clean = check_grads(fn, q, k, v, p, dout, scale, rows=rows)
    assert all(x.ok for x in clean), [str(x) for x in clean]
    delta[0, 0, key, 2] = 0.05
    verdicts = {x.what: x for x in check_grads(fn, q, k, v, p, dout, scale, rows=rows)}
    got = verdicts[which]
    assert not got.ok, f"{which} off by 0.05 at key {key} (reached, not a sampled row {rows}) passed: {got}"
    assert got.max_err == pytest.approx(0.05, rel=0.01), str(got)
    others = [str(x) for w, x in verdicts.items() if w != which and not x.ok]
    assert not others, others


# ---------------------------------------------------------------------- 6. the ratio table
def test_the_ratio_table_divides_within_a_dtype():
    """Mutation ratio-no-dtype: fp32 and bf16 rows of two implementations give one ratio
    per dtype, each of its own dtype's times, never an fp32 time over a bf16 one."""
    times = {("naive", "fp32"): (10.0, 800), ("naive", "bf16"): (4.0, 400),
             ("chunked", "fp32"): (5.0, 200), ("chunked", "bf16"): (1.0, 50)}  # fmt: skip
    rows = []
    for (impl, dtype), (ms, mem) in times.items():
        row = base_row(BenchConfig(**{**BASE, "impl": impl, "dtype": dtype}).resolved())
        row.update(status="ok", time_ms_median=ms, peak_mem_bytes=mem)
        rows.append(row)
    table = ratio_table(pd.DataFrame(rows), "naive")
    shown = table.to_string()
    assert len(table) == 2, f"one row per dtype expected:\n{shown}"
    got = {r["dtype"]: (r["impl"], r["speedup"], r["mem_ratio"]) for r in table.to_dict("records")}
    assert got == {"fp32": ("chunked", 2.0, 4.0), "bf16": ("chunked", 4.0, 8.0)}, shown


# ---------------------------------------------------------------------- 7. the FLOPs
def test_the_backward_counts_as_two_and_a_half_forwards():
    """Mutation bwd-flops-2: FlashAttention's convention, by its numbers."""
    assert MODE_WORK == {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}, MODE_WORK


@pytest.mark.parametrize(
    "window, causal, pairs",
    [
        (2, False, 22),  # n=8, one key a side: rows 0 and 7 attend 2 keys, rows 1-6 attend 3
        ([2, 0], True, 21),  # two keys before: rows 0, 1 attend 1 and 2 keys, rows 2-7 attend 3
    ],
)
@pytest.mark.parametrize("mode, work", [("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5)])
def test_flops_of_a_tiny_pattern_by_hand(window, causal, pairs, mode, work):
    """4 * head_dim FLOPs per attended pair per head, times batch, times the mode's work."""
    c = BenchConfig(impl="naive", seq_len=8, window=window, causal=causal, batch=3, heads=2, head_dim=4,
                    mode=mode, device="cpu")  # fmt: skip
    want = 4 * 4 * pairs * 2 * 3 * work
    got = base_row(c.resolved())["flops"]
    assert got == pytest.approx(want, rel=1e-12), f"{mode} {window} causal={causal}: flops {got!r}, want {want!r}"


# ---------------------------------------------------------------------- 8. the profiler's unit
def test_the_profile_self_time_adds_up_to_the_call(tmp_path, throwaway):
    """Mutation profile-self-us: the profiled call's operators' self times (ms) add up
    to about the timed call's median (ms); a unit off by 1000 is far out of 0.2x..5x."""

    def slow(q, k, v, p, s):
        time.sleep(0.02)  # the call's own time: 20 ms, in "outside operators"
        return naive(q, k, v, p, s)

    throwaway("sleeps_for_profile", slow)
    row = measure(cfg(tmp_path, impl="sleeps_for_profile", profile=True, memory=False))
    assert row["status"] == "ok", row["reason"]
    ops = pd.read_csv(Path(row["profile"]) / "ops.csv")
    total, median = ops["self_ms"].sum(), row["time_ms_median"]
    assert 0.2 <= total / median <= 5, (
        f"profiled self time {total:.4g} ms vs median {median:.4g} ms (ratio {total / median:.3g}):\n{ops.head()}"
    )
