"""How far to trust a time: its 95% confidence interval, the interval of a ratio of two
times, the verdict a target gets from it, and the machine's noise.

The convention, used everywhere a time is compared:

* A row's interval comes from its **units**: the per-process medians when it was
  measured in ``repeats >= 2`` fresh processes, else the calls of its one process (then
  it says nothing of process-to-process swings, which are the larger on a shared CPU).
* Times are positive and their noise multiplicative, so the interval is Student's t on
  the logarithms, centred on the median: ``median */ exp(t(0.975, N-1) * 1.2533 * s /
  sqrt(N))``, ``s`` the standard deviation of the N log times; sqrt(pi/2) = 1.2533 is
  how much more a median varies than a mean (exactly so for many samples, a little
  more than needed for three, where it is 1.16). With the few repeats a process-level
  interval has, a bootstrap (``scipy.stats.bootstrap``) would not do: its interval of a
  median of three values is their range, which covers the truth 75% of the time, not 95%.
* A ratio of two rows, ``a / b``: the ratio of the medians, its log standard error
  ``sqrt(se_a^2 + se_b^2)``, and the smaller of the two degrees of freedom (Welch's
  conservative bound). The rows are not paired by round, so the interval does not
  credit the interleaving; it is the wider for it. Where either row has no interval
  (a table from before intervals), neither has the ratio: its bounds are NaN, and a
  target judged on it is inconclusive.
* A target ``ratio >= required`` **passes** only when the interval's lower bound meets
  it, **FAILs** only when its upper bound misses it, and is ``inconclusive`` otherwise
  (``<=`` the other way round). A measure without an interval (memory, which
  reproduces to the byte) is decided by its value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from .results import number

__all__ = ["T975", "MEDIAN_SE", "NOISE_WARN", "VERDICTS", "t975", "interval", "row_interval", "ratio_interval",
           "decide", "spread"]  # fmt: skip

#: Student's t, 0.975 quantile, by degrees of freedom (the two-sided 95% interval);
#: a df between two entries takes the smaller one's (a slightly wider interval)
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
        10: 2.2281, 12: 2.1788, 15: 2.1314, 20: 2.0860, 25: 2.0595, 30: 2.0423, 40: 2.0211, 60: 2.0003,
        120: 1.9799}  # fmt: skip
#: the relative interquartile range of the noise probe above which a run warns
#: (``torch.utils.benchmark``'s threshold for "system fluctuation")
NOISE_WARN = 0.10
VERDICTS = ("pass", "FAIL", "inconclusive")


def t975(df: int) -> float:
    """Student's t 0.975 quantile for ``df >= 1`` degrees of freedom (1.96 beyond 120)."""
    if df < 1:
        raise ValueError(f"df={df}: needs at least one degree of freedom (two samples)")
    return 1.95996 if df > 120 else T975[max(k for k in T975 if k <= df)]


#: the standard error of a median over that of a mean, for many normal samples: sqrt(pi/2)
MEDIAN_SE = math.sqrt(math.pi / 2)


def _half(logs: Sequence[float]) -> float:
    """The 95% interval's half-width on the log scale: t * 1.2533 * s / sqrt(N)."""
    return t975(len(logs) - 1) * MEDIAN_SE * statistics.stdev(logs) / math.sqrt(len(logs))


def interval(samples: Sequence[float]) -> tuple[float, float] | None:
    """The 95% interval of the typical value of positive ``samples`` (see the module's
    convention), or None with fewer than two, or a non-positive one."""
    if len(samples) < 2 or min(samples) <= 0:
        return None
    h = _half([math.log(x) for x in samples])
    m = statistics.median(samples)
    return m * math.exp(-h), m * math.exp(h)


def _units(row: Mapping) -> int:
    """How many values a row's interval came from: its repeats, else its timed calls."""
    reps = number(row.get("repeats")) or 1
    return int(reps) if reps >= 2 else int(number(row.get("n_timed")) or 0)


def row_interval(row: Mapping) -> tuple[float, float, float] | None:
    """(median, low, high) of a row's time in ms; None when it has no time. low and high
    are NaN where it has no interval (a table older than intervals, or one timed call)."""
    m = number(row.get("time_ms_median"))
    if m is None or m <= 0:
        return None
    lo, hi = number(row.get("time_ms_ci_low")), number(row.get("time_ms_ci_high"))
    return (m, math.nan, math.nan) if lo is None or hi is None or _units(row) < 2 else (m, lo, hi)


def _log_se(row: Mapping) -> tuple[float, int] | None:
    """(standard error of the log median, degrees of freedom) a row's interval implies;
    None where it has none."""
    m, lo, hi = row_interval(row)  # type: ignore[misc]
    if math.isnan(lo):
        return None
    n = _units(row)
    return math.log(hi / lo) / 2 / t975(n - 1), n - 1


def ratio_interval(a: Mapping, b: Mapping) -> tuple[float, float, float] | None:
    """(a / b, low, high): the ratio of two rows' median times and its 95% interval
    (NaN bounds where either row has no interval); None when either has no time."""
    ia, ib = row_interval(a), row_interval(b)
    if ia is None or ib is None:
        return None
    r = ia[0] / ib[0]
    sa, sb = _log_se(a), _log_se(b)
    if sa is None or sb is None:
        return r, math.nan, math.nan
    h = t975(min(sa[1], sb[1])) * math.hypot(sa[0], sb[0])
    return r, r * math.exp(-h), r * math.exp(h)


def decide(low: float, high: float, op: str, required: float) -> str:
    """``pass``, ``FAIL`` or ``inconclusive`` for the target ``value op required``
    (``>=`` or ``<=``) given the value's 95% interval [low, high] (NaN: inconclusive)."""
    if op == ">=":
        return "pass" if low >= required else "FAIL" if high < required else "inconclusive"
    if op == "<=":
        return "pass" if high <= required else "FAIL" if low > required else "inconclusive"
    raise ValueError(f"op={op!r}: >= or <=")


def spread(samples: Sequence[float]) -> float | None:
    """The relative interquartile range (IQR / median) of timings, as
    ``torch.utils.benchmark.Measurement`` computes it; None with fewer than four."""
    if len(samples) < 4:
        return None
    from torch.utils.benchmark import Measurement, TaskSpec

    m = Measurement(1, list(samples), TaskSpec("noise probe", ""))
    return m.iqr / m.median if m.median > 0 else None
