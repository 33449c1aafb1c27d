"""The statistics of a time (attnbench.stats), the repeats that feed them, the noise meter,
and the verdict's interval rule, on synthetic timings and on the engine with its clock
replaced."""

from __future__ import annotations

import dataclasses
import logging
import math
import random

import pytest
import torch

from attnbench import gpu_check, measure, stats
from attnbench.config import BenchConfig
from attnbench.results import base_row, format_rows
from attnbench.sweep import combine, sweep


# ---------------------------------------------------------------------- the t table
def _t_cdf(x: float, df: int) -> float:
    """Student's t cumulative distribution at ``x`` > 0: 1/2 plus the density's integral
    from 0 to x (Simpson's rule on 20001 points), in float64."""
    t = torch.linspace(0.0, x, 20001, dtype=torch.float64)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = torch.exp(logc - (df + 1) / 2 * torch.log1p(t * t / df))
    h = x / 20000
    return 0.5 + float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))


@pytest.mark.parametrize("df", sorted(stats.T975))
def test_the_t_table_is_the_0_975_quantile(df):
    assert _t_cdf(stats.T975[df], df) == pytest.approx(0.975, abs=2e-5)


def test_t975_between_entries_takes_the_wider_and_needs_two_samples():
    assert stats.t975(11) == stats.T975[10]
    assert stats.t975(1000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="two samples"):
        stats.t975(0)


# ---------------------------------------------------------------------- intervals
def test_the_interval_is_t_on_the_logs_centred_on_the_median():
    xs = [100.0, 110.0, 121.0]
    lo, hi = stats.interval(xs)
    logs = [math.log(x) for x in xs]
    half = 4.3027 * math.sqrt(math.pi / 2) * (sum((v - sum(logs) / 3) ** 2 for v in logs) / 2) ** 0.5 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((110 * math.exp(-half), 110 * math.exp(half)))
    assert stats.interval([5.0]) is None and stats.interval([1.0, 0.0]) is None
    assert stats.interval([3.0, 3.0, 3.0]) == (3.0, 3.0)


@pytest.mark.parametrize("n", [3, 5, 50])
def test_the_interval_covers_the_truth_95_percent_of_the_time(n):
    """n lognormal samples, 4000 times: the interval holds the true median 95% of the time
    (a little more for few samples, where the median's sqrt(pi/2) is generous)."""
    rng = random.Random(n)
    spans = [stats.interval([10.0 * math.exp(rng.gauss(0, 0.2)) for _ in range(n)]) for _ in range(4000)]
    cover = sum(lo <= 10.0 <= hi for lo, hi in spans) / 4000
    assert 0.94 < cover < 0.985, cover


def _row(samples: list[float], **kw) -> dict:
    """A row timed by ``samples`` (its calls), as the engine writes it."""
    lo, hi = stats.interval(samples) or (None, None)
    return {"status": "ok", "time_ms_median": sorted(samples)[len(samples) // 2], "time_ms_ci_low": lo,
            "time_ms_ci_high": hi, "n_timed": len(samples), "repeats": 1, **kw}  # fmt: skip


def test_a_ratio_interval_combines_both_rows_and_widens_with_either():
    a, b = _row([20.0, 21.0, 19.0, 20.5]), _row([10.0, 10.2, 9.9, 10.1])
    r, lo, hi = stats.ratio_interval(a, b)
    assert r == pytest.approx(20.5 / 10.1) and lo < r < hi
    noisier = _row([20.0, 28.0, 15.0, 20.5])
    _, lo2, hi2 = stats.ratio_interval(noisier, b)
    assert lo2 < lo and hi2 > hi
    old = {"status": "ok", "time_ms_median": 10.0}  # a table from before intervals: no interval, either side
    for pair in ((old, old), (old, b), (a, old)):
        r, lo, hi = stats.ratio_interval(*pair)
        assert math.isnan(lo) and math.isnan(hi)
        assert stats.decide(lo, hi, ">=", 0.1) == "inconclusive"
    assert stats.ratio_interval({"time_ms_median": ""}, b) is None


@pytest.mark.parametrize(
    ("low", "high", "op", "want"),
    [(1.3, 1.5, ">=", "pass"), (1.0, 1.1, ">=", "FAIL"), (1.1, 1.3, ">=", "inconclusive"),
     (0.8, 0.9, "<=", "pass"), (1.1, 1.2, "<=", "FAIL"), (0.9, 1.1, "<=", "inconclusive")],
)  # fmt: skip
def test_decide_passes_and_fails_only_on_the_whole_interval(low, high, op, want):
    assert stats.decide(low, high, op, 1.0 if op == "<=" else 1.2) == want


# ---------------------------------------------------------------------- the verdict rule
TARGET = {"target": "triton faster than flex", "impl": "triton", "baseline": "flex", "measure": "speedup",
          "op": ">=", "required": "1.2", "stage": "targets", "batch": "1", "heads": "2", "seq_len": "256",
          "head_dim": "16", "window": "32", "dilation": "1", "causal": "false", "global_tokens": "", "dtype": "bf16",
          "mode": "fwd", "kv_heads": ""}  # fmt: skip


def _target_rows(speedup: float, sigma: float, calls: int, seed: int) -> list[dict]:
    """Rows of triton and flex at TARGET's configuration, their calls drawn from lognormal
    distributions whose medians are ``speedup`` apart, with log spread ``sigma``."""
    rng = random.Random(seed)
    out = []
    for impl, median in (("flex", speedup), ("triton", 1.0)):
        c = dataclasses.replace(gpu_check._config(TARGET, impl), study="targets")
        samples = [median * math.exp(rng.gauss(0, sigma)) for _ in range(calls)]
        out.append({**base_row(c), **_row(samples)})
    return out


@pytest.mark.parametrize(
    ("speedup", "sigma", "calls", "want"),
    [(1.5, 0.02, 50, "pass"),  # clearly over 1.2
     (1.0, 0.02, 50, "FAIL"),  # clearly under
     (1.25, 0.30, 5, "inconclusive"),  # over, but five noisy calls cannot tell
     (1.25, 0.005, 100, "pass")],  # the same ratio, steady: decided
)  # fmt: skip
def test_the_verdict_follows_the_interval_of_two_synthetic_timing_distributions(speedup, sigma, calls, want):
    line = gpu_check.verdict(_target_rows(speedup, sigma, calls, seed=1), [TARGET])[-1]
    assert line["status"] == want, line
    assert "[" in line["measured"]  # the value is shown with its interval
    assert f"1 {want}" in gpu_check.verdict_text([line])


# ---------------------------------------------------------------------- repeats
def test_combine_takes_the_median_of_the_repeats_and_their_interval():
    rows = [{**_row([m, m * 1.01, m * 0.99]), "time_ms_iqr": 0.1, "time_ms_min": m * 0.99, "first_call_ms": 5.0,
             "peak_mem_bytes": 100 + i, "flops": 1e9, "_probe_ms": [1.0, 1.1, 0.9, 1.0]}
            for i, m in enumerate((10.0, 12.0, 11.0))]  # fmt: skip
    row = combine(rows, 3)
    assert row["time_ms_median"] == 11.0 and row["time_ms_repeats"] == "10 12 11"
    assert (row["time_ms_ci_low"], row["time_ms_ci_high"]) == pytest.approx(stats.interval([10.0, 12.0, 11.0]))
    assert row["n_timed"] == 9 and row["peak_mem_bytes"] == 102 and "_probe_ms" not in row
    assert row["tflops"] == pytest.approx(1e9 / 11e-3 / 1e12)


def test_a_failed_repeat_is_the_row_and_no_other_repeat_lends_it_a_time():
    ok = {**_row([10.0, 10.0]), "_probe_ms": []}
    bad = {"status": "error", "reason": "RuntimeError: boom", "time_ms_median": None}
    row = combine([ok, bad], 3)
    assert row["status"] == "error" and row["reason"] == "repeat 2 of 3: RuntimeError: boom"
    assert row["time_ms_median"] is None


# ---------------------------------------------------------------------- the engine, its clock replaced
class VirtualClock:
    """The engine's clock, in virtual time: each read costs ``step`` seconds and a call of
    a synthetic implementation its ``cost``; ``sigma`` > 0 multiplies each by a lognormal
    factor (a noisy machine), 0 keeps them exact (a quiet one)."""

    def __init__(self, sigma: float, seed: int = 0):
        self.now, self.sigma, self.rng = 0.0, sigma, random.Random(seed)

    def jitter(self) -> float:
        return math.exp(self.rng.gauss(0, self.sigma)) if self.sigma else 1.0

    def __call__(self) -> float:
        self.now += 1e-3 * self.jitter()
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * self.jitter()


@pytest.mark.parametrize(("sigma", "want", "warns"), [(0.002, "pass", False), (0.6, "inconclusive", True)])
def test_a_noisy_clock_warns_and_leaves_the_verdict_inconclusive(monkeypatch, throwaway, caplog, sigma, want, warns):
    """Two synthetic implementations, one 1.5x the other's cost, timed by the engine on a
    virtual clock: quiet, the speed-up (1.5 ms + a read over 1 ms + a read = 1.25x) passes
    a 1.1x target; noisy, the noise meter warns and the same target is inconclusive."""
    clock = VirtualClock(sigma)
    monkeypatch.setattr(measure, "clock", clock)

    def costing(ms):
        def fn(q, k, v, pattern, scale):
            clock.spend(ms * 1e-3)
            return q.clone()

        return fn

    throwaway("synthetic_slow", costing(1.5))
    throwaway("synthetic_fast", costing(1.0))
    base = BenchConfig(seq_len=64, heads=2, head_dim=8, window=8, device="cpu", isolate=False, verify=False,
                       memory=False, time_budget_s=0.0, min_reps=5, max_reps=5, warmup=0, repeats=3)  # fmt: skip
    configs = [dataclasses.replace(base, impl=i) for i in ("synthetic_slow", "synthetic_fast")]
    with caplog.at_level(logging.WARNING, logger="attnbench"):
        slow, fast = (measure_row(c) for c in configs)
    assert ("this machine is noisy" in caplog.text) == warns, caplog.text
    speedup = stats.ratio_interval(slow, fast)
    assert speedup[1] < speedup[2], speedup  # an interval, from the repeats, in either case
    if want == "pass":
        assert speedup[0] == pytest.approx(1.25, rel=0.01)
    assert stats.decide(speedup[1], speedup[2], ">=", 1.1) == want, (speedup, format_rows([slow, fast]))


def measure_row(c: BenchConfig) -> dict:
    from attnbench.sweep import measure as measure_one

    return measure_one(c)


def test_a_sweep_interleaves_the_implementations_of_each_configuration(monkeypatch, throwaway, tmp_path):
    """repeats=2 over two implementations at two lengths: A B A B at n=32, then at n=64."""
    order = []
    for name in ("interleave_a", "interleave_b"):
        throwaway(name, lambda q, k, v, p, s, name=name: order.append((name, q.shape[2])) or q.clone())
    base = BenchConfig(heads=1, head_dim=8, window=4, device="cpu", isolate=False, verify=False, memory=False,
                       time_budget_s=0.0, min_reps=1, max_reps=1, warmup=0, repeats=2, study="s",
                       results_dir=str(tmp_path))  # fmt: skip
    rows = sweep([dataclasses.replace(base, impl=i, seq_len=n) for i in ("interleave_a", "interleave_b")
                  for n in (32, 64)], progress=False)  # fmt: skip
    firsts = [order[i] for i in range(0, len(order), 2)]  # each measurement: a first call, then one timed call
    assert firsts == [("interleave_a", 32), ("interleave_b", 32)] * 2 + [("interleave_a", 64), ("interleave_b", 64)] * 2
    assert [r["impl"] for r in rows] == ["interleave_a", "interleave_a", "interleave_b", "interleave_b"]  # as asked
    assert all(r["repeats"] == 2 and len(r["time_ms_repeats"].split()) == 2 for r in rows)


def test_a_failed_repeat_ends_the_configuration_and_its_row_says_which(throwaway, tmp_path):
    """The second repeat raises: no third is run, and the row is that failure."""
    calls = []

    def flaky(q, k, v, pattern, scale):
        calls.append(1)
        if len(calls) > 2:  # each repeat: a first call and one timed call
            raise RuntimeError("boom")
        return q.clone()

    throwaway("flaky", flaky)
    c = BenchConfig(impl="flaky", seq_len=32, heads=1, head_dim=8, window=4, device="cpu", isolate=False, verify=False,
                    memory=False, time_budget_s=0.0, min_reps=1, max_reps=1, warmup=0, repeats=3, study="f",
                    results_dir=str(tmp_path))  # fmt: skip
    (row,) = sweep([c], progress=False)
    assert row["status"] == "error" and row["reason"].startswith("repeat 2 of 3: RuntimeError: boom"), row["reason"]
    assert len(calls) == 3 and not row.get("time_ms_median")


def test_ratios_of_an_old_table_and_of_a_zero_peak_are_drawn_without_intervals(tmp_path):
    """A table from before intervals (no interval columns) and a peak of 0 bytes: the
    ratio table says so instead of failing."""
    import pandas as pd

    from attnbench.plot import ratio_table, ratio_text

    base = {"device_name": "cpu", "dtype": "fp32", "mode": "fwd", "pattern": "w8", "batch": 1, "heads": 1,
            "head_dim": 8, "seq_len": 64, "status": "ok"}  # fmt: skip
    df = pd.DataFrame([{**base, "impl": "naive", "time_ms_median": 2.0, "peak_mem_bytes": 100.0},
                       {**base, "impl": "chunked", "time_ms_median": 1.0, "peak_mem_bytes": 0.0}])  # fmt: skip
    table = ratio_table(df, "naive")
    assert table["speedup"].tolist() == [2.0] and math.isnan(table["mem_ratio"][0])
    assert "2x (no interval)" in ratio_text(table, "naive")
