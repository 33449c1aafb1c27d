"""Plots of benchmark results: time and peak memory against sequence length.

The input is one or more tidy results tables (CSV, one row per measurement) as the
benchmark writes them. Required columns are ``impl``, ``seq_len`` and ``status``;
every other column is optional and gets a neutral default when missing.

Figures
-------
*Scaling* (:func:`plot_scaling`): two panels, median time per call (ms) and peak
memory, against the sequence length, log-log, one line per implementation. The
colour follows the implementation's place in the registry (:func:`impl_color`), so
the same implementation looks the same in every panel and figure. Several attention patterns
in one figure are told apart by line style and marker; with more than
:data:`MAX_PATTERNS_PER_FIGURE` patterns (or ``per_pattern=True``) each pattern gets
its own figure. Several devices (e.g. GPU types) get one row of panels each, with
shared axes, so they compare directly. Separate figures are drawn per dtype, mode
and tensor shape (batch, heads, head_dim).

Where a line stops (its last ``ok`` length is followed by an ``oom``, ``skipped``,
``wrong`` or ``error`` row), a cross marks the last ``ok`` point, annotated with the
short reason and the length that failed (e.g. ``OOM at 32k``). Lines without any
``ok`` point, and failures between ``ok`` points, are listed under the figure.

The legend gives each line's fitted scaling exponents for time and memory
(:func:`fit_exponent`, the least-squares slope of log y against log n) computed over
the *larger half* of the line's ``ok`` lengths (the largest ``ceil(k / 2)`` of its
``k`` points, at least two), or over the points with ``n >= fit_min_n`` when that is
given. Short lengths are dominated by launch overheads and would bias the slope
low. Faint dashed grey lines show the reference slopes ``n`` and ``n^2``.

*Ratios* (:func:`plot_ratios`): speedup (baseline time / impl time) and memory
ratio (baseline memory / impl memory) against the sequence length, at the lengths
where both the baseline and the implementation are ``ok``, compared within the same
device, dtype, mode, pattern and shape.

Rows of the same measurement count once, the newest (:func:`attnbench.results.latest`).
Where a line still has several rows at one length (measured with other library
versions or thread counts), the newest is drawn.

Command line::

    python -m attnbench.plot results/scaling-h100.csv --baseline naive

Figures are drawn with matplotlib's Agg backend and never open a window.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from .registry import list_impls
from .results import latest

__all__ = [
    "REQUIRED_COLUMNS",
    "MAX_PATTERNS_PER_FIGURE",
    "ResultsError",
    "load_results",
    "filter_results",
    "fit_exponent",
    "impl_color",
    "impl_order",
    "short_reason",
    "pivot_results",
    "ratio_table",
    "scaling_figures",
    "ratio_figure",
    "plot_scaling",
    "plot_ratios",
    "main",
]

#: Columns a results table must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("impl", "seq_len", "status")

#: More patterns than this in one figure: one figure per pattern instead.
MAX_PATTERNS_PER_FIGURE = 4

#: Optional text columns and their defaults when a table lacks them.
_TEXT_DEFAULTS: dict[str, str] = {
    "study": "",
    "pattern": "",
    "dilation": "",
    "dtype": "",
    "device": "",
    "device_name": "",
    "mode": "",
    "reason": "",
    "host": "",
    "timestamp": "",
}

#: Optional numeric columns (NaN when missing or unparseable).
_NUMERIC_COLUMNS: tuple[str, ...] = (
    "window",
    "global_tokens",
    "batch",
    "heads",
    "head_dim",
    "time_ms_median",
    "time_ms_iqr",
    "time_ms_min",
    "first_call_ms",
    "n_timed",
    "peak_mem_bytes",
    "flops",
    "tflops",
    "max_abs_err",
    "mean_abs_err",
    "threads",
)

#: Columns that identify one line in a figure (besides the figure's own keys).
_LINE_KEYS: tuple[str, ...] = ("impl", "pattern", "dtype", "mode", "device_name")
#: Tensor shape columns; different shapes never share a figure.
_SHAPE_KEYS: tuple[str, ...] = ("batch", "heads", "head_dim")

#: Colours, colour-blind-friendly first: implementations take them in the registry's
#: order (:func:`attnbench.list_impls`), then other names in alphabetical order.
PALETTE: tuple[str, ...] = (
    "#0072B2", "#009E73", "#9467BD", "#CC79A7", "#8C564B", "#E69F00", "#222222", "#56B4E9", "#D55E00",
    "#BCBD22", "#17BECF", "#E7298A", "#66A61E", "#7570B3", "#A6761D", "#1B9E77", "#FB6A4A", "#6A3D9A",
)  # fmt: skip
_LINESTYLES: tuple[str, ...] = ("-", "--", ":", "-.")
_MARKERS: tuple[str, ...] = ("o", "s", "^", "D")
_GIB = 2**30
_MIB = 2**20


class ResultsError(ValueError):
    """A results table cannot be used: missing, empty, unparseable or incomplete."""


# --------------------------------------------------------------------------- loading


def _one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so a message fits on one line."""
    return " ".join(str(text).split())


def _line_numbers(mask: pd.Series) -> str:
    """CSV line numbers (header = line 1) of the rows where ``mask`` is true."""
    lines = [int(i) + 2 for i in np.flatnonzero(mask.to_numpy())]
    shown = ", ".join(map(str, lines[:5]))
    return shown + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")


def _read_one(path: Path) -> pd.DataFrame:
    """Read and validate one results CSV; raise :class:`ResultsError` when unusable."""
    if not path.exists():
        raise ResultsError(f"{path}: no such file")
    if path.is_dir():
        raise ResultsError(f"{path}: is a directory, expected a results CSV file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({_one_line(e.strerror or str(e))})") from e
    if not raw.strip():
        raise ResultsError(f"{path}: file is empty (expected a CSV with a header row)")
    if b"\x00" in raw:
        raise ResultsError(f"{path}: not a CSV text file (contains NUL bytes)")
    try:
        df = pd.read_csv(path, dtype={c: str for c in _TEXT_DEFAULTS} | {"impl": str, "status": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{path}: not a readable CSV file ({_one_line(e)})") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        found = ", ".join(df.columns[:8]) + (", ..." if len(df.columns) > 8 else "")
        raise ResultsError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            f"(found: {found or 'none'}); is this a results table?"
        )
    if df.empty:
        raise ResultsError(f"{path}: has a header but no data rows")
    for col in ("impl", "status"):
        blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if blank.any():
            raise ResultsError(f"{path}: empty {col!r} on line(s) {_line_numbers(blank)} (truncated or corrupted?)")
    n = pd.to_numeric(df["seq_len"], errors="coerce")
    bad = n.isna() | (n <= 0) | (n != n.round())
    if bad.any():
        examples = ", ".join(repr(str(v)) for v in df.loc[bad, "seq_len"].head(3))
        raise ResultsError(
            f"{path}: seq_len is not a positive integer on line(s) {_line_numbers(bad)} (values {examples})"
        )
    df["seq_len"] = n.astype("int64")
    df["source"] = path.name
    return df


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fill optional columns with defaults and give every column a usable dtype."""
    df = df.copy()
    for col, default in _TEXT_DEFAULTS.items():
        if col not in df.columns:
            df[col] = default
        df[col] = df[col].fillna(default).astype(str).str.strip()
    df["impl"] = df["impl"].astype(str).str.strip()
    df["status"] = df["status"].astype(str).str.strip().str.lower()
    for col in _NUMERIC_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    if "causal" in df.columns:
        df["causal"] = df["causal"].map(
            lambda v: str(v).strip().lower() in ("true", "1", "yes") if pd.notna(v) else False
        )
    else:
        df["causal"] = False
    no_name = df["device_name"] == ""
    df.loc[no_name, "device_name"] = df.loc[no_name, "device"].where(df.loc[no_name, "device"] != "", "unknown device")
    df["_order"] = np.arange(len(df))
    return df


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Load and validate one or more results CSV files into one table.

    Args:
        paths: a path or several; rows of all files are concatenated in order.

    Returns:
        The table, with optional columns filled in (text columns with ``""``,
        numeric ones with NaN; ``device_name`` falls back to ``device``), ``status``
        lower-cased, ``seq_len`` as integers, and a ``source`` column naming the file.

    Raises:
        ResultsError: no paths, or a file that is missing, empty, not a parseable
            CSV, lacks a required column (:data:`REQUIRED_COLUMNS`), or has rows
            with an empty ``impl``/``status`` or a non-integer ``seq_len``. The
            message names the file and what is wrong.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    path_list = [Path(p) for p in paths]
    if not path_list:
        raise ResultsError("no results files given")
    frames = [_read_one(p) for p in path_list]
    return _normalise(pd.concat(frames, ignore_index=True))


def _ensure_normalised(df: pd.DataFrame) -> pd.DataFrame:
    """Accept a table from :func:`load_results` or a bare DataFrame with the required columns."""
    if "_order" in df.columns:
        return df
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ResultsError(f"table is missing required column(s) {', '.join(missing)}")
    df = df.copy()
    df["seq_len"] = pd.to_numeric(df["seq_len"], errors="raise").astype("int64")
    return _normalise(df)


def filter_results(
    df: pd.DataFrame,
    *,
    patterns: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    impls: Sequence[str] | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """Rows matching every given filter (``None`` or empty: no filter on that column).

    ``device`` matches ``device`` exactly (``"cpu"``, ``"cuda"``) or is a
    case-insensitive substring of ``device_name`` (``"h100"``).

    Raises:
        ResultsError: no row matches; the message lists what the table holds.
    """
    df = _ensure_normalised(df)
    keep = pd.Series(True, index=df.index)
    asked = []
    for col, values in (("pattern", patterns), ("mode", modes), ("dtype", dtypes), ("impl", impls)):
        if values:
            keep &= df[col].isin(list(values))
            asked.append(f"{col} in {list(values)}")
    if device:
        keep &= (df["device"] == device) | df["device_name"].str.lower().str.contains(device.lower(), regex=False)
        asked.append(f"device {device!r}")
    out = df[keep]
    if out.empty:

        def held(col: str) -> str:
            return ", ".join(sorted(map(str, df[col].unique())))

        raise ResultsError(
            f"no rows match {' and '.join(asked)}; the table holds patterns [{held('pattern')}], "
            f"modes [{held('mode')}], dtypes [{held('dtype')}], impls [{held('impl')}], "
            f"devices [{held('device_name')}]"
        )
    return out


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    """One row per measurement (:func:`attnbench.results.latest`), then one point per
    line and length: the newest, where other environments measured it too."""
    keys = [*_LINE_KEYS, *_SHAPE_KEYS, "seq_len"]
    return latest(df).drop_duplicates(subset=keys, keep="last")


# --------------------------------------------------------------------------- analysis


def fit_exponent(n: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Least-squares slope of ``log y`` against ``log n``: ``y ~ n**slope``.

    Points where ``n`` or ``y`` is not positive and finite are ignored. Which points
    to use is the caller's choice (the figures use the larger half of the lengths).

    Returns:
        The slope, or NaN when fewer than two usable points at distinct ``n`` remain.
    """
    x = np.asarray(n, dtype=float)
    v = np.asarray(y, dtype=float)
    if x.shape != v.shape:
        raise ValueError(f"n and y differ in shape: {x.shape} vs {v.shape}")
    ok = np.isfinite(x) & np.isfinite(v) & (x > 0) & (v > 0)
    lx, ly = np.log(x[ok]), np.log(v[ok])
    if lx.size < 2 or np.ptp(lx) == 0:
        return float("nan")
    lx_c = lx - lx.mean()
    return float(np.dot(lx_c, ly - ly.mean()) / np.dot(lx_c, lx_c))


def _fit_larger_half(n: np.ndarray, y: np.ndarray, fit_min_n: int | None = None) -> float:
    """Exponent over the larger half of the usable points (or those with n >= fit_min_n)."""
    ok = np.isfinite(y) & (y > 0)
    n, y = n[ok], y[ok]
    order = np.argsort(n)
    n, y = n[order], y[order]
    if fit_min_n is not None:
        sel = n >= fit_min_n
        return fit_exponent(n[sel], y[sel])
    k = len(n)
    take = max(2, math.ceil(k / 2))
    return fit_exponent(n[k - take :], y[k - take :])


def short_reason(status: str, reason: str = "") -> str:
    """A short label for a non-ok row: ``OOM``, ``skipped: memory budget``, ``wrong``..."""
    status = str(status).strip().lower()
    reason = str(reason).strip().lower()
    if status == "oom":
        return "OOM"
    if status == "wrong":
        return "wrong result"
    if status == "skipped":
        for key, label in (
            ("memory budget", "skipped: memory budget"),
            ("time budget", "skipped: time budget"),
            ("unsupported", "unsupported"),
            ("unavailable", "unavailable"),
            ("out of memory", "OOM"),
        ):
            if key in reason:
                return label
        return "skipped"
    return status or "?"


def _long_reason(status: str, reason: str, limit: int = 70) -> str:
    """The reason text (shortened) of an unsupported / unavailable row, else :func:`short_reason`."""
    reason = _one_line(reason)
    short = short_reason(status, reason)
    if short in ("unsupported", "unavailable") and reason:
        return reason if len(reason) <= limit else reason[: limit - 1] + "…"
    return short


def _fmt_n(n: float) -> str:
    """Sequence length in k/M units when exact: 512, 4k, 64k, 1M."""
    n = int(n)
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}k"
    return str(n)


def _fmt_value(v: float, _pos: object = None) -> str:
    """Plain tick label for a log axis: 0.01, 0.5, 3, 200, 1e+05."""
    if v <= 0:
        return ""
    if 1e-3 <= v < 1e6:
        return f"{v:g}"
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def impl_order(impls: Iterable[str]) -> list[str]:
    """``impls`` in the registry's order, then names it does not know alphabetically."""
    known = list_impls()
    return sorted(set(impls), key=lambda s: (known.index(s) if s in known else len(known), s))


def impl_color(impl: str, others: Iterable[str] = ()) -> str:
    """The colour of an implementation: its place in the registry's order, so every
    figure agrees; names the registry does not know follow, in alphabetical order among
    ``others`` (the other names drawn)."""
    order = impl_order(set(list_impls()) | {impl, *others})
    return PALETTE[order.index(impl) % len(PALETTE)]


def _pattern_order(patterns: Iterable[str]) -> list[str]:
    """Simplest pattern first (it gets the solid line), then by label."""
    return sorted(set(patterns), key=lambda p: (len(p.split()), len(p), p))


@dataclass
class _Line:
    """One implementation x pattern on one device: its ok points and where it stopped."""

    impl: str
    pattern: str
    n: np.ndarray
    time_ms: np.ndarray
    mem: np.ndarray
    stop: tuple[int, str] | None = None  # (first failing n after the last ok one, short reason)
    never_ok: str | None = None  # short reason(s) when no point is ok
    gaps: list[tuple[int, str]] = field(default_factory=list)  # failures between ok points


def _analyse(rows: pd.DataFrame) -> _Line:
    """Split one line's rows (one impl x pattern x device) into ok points and failures."""
    rows = rows.sort_values("seq_len")
    ok = rows["status"] == "ok"
    good = rows[ok]
    line = _Line(
        impl=str(rows["impl"].iloc[0]),
        pattern=str(rows["pattern"].iloc[0]),
        n=good["seq_len"].to_numpy(dtype=float),
        time_ms=good["time_ms_median"].to_numpy(dtype=float),
        mem=good["peak_mem_bytes"].to_numpy(dtype=float),
    )
    bad = rows[~ok]
    labels = [short_reason(s, r) for s, r in zip(bad["status"], bad["reason"])]
    if good.empty:
        whys = [_long_reason(s, r) for s, r in zip(bad["status"], bad["reason"])]
        line.never_ok = "; ".join(dict.fromkeys(whys))
        return line
    last_ok = good["seq_len"].max()
    for n, label in zip(bad["seq_len"], labels):
        if n > last_ok:
            if line.stop is None:
                line.stop = (int(n), label)
        else:
            line.gaps.append((int(n), label))
    return line


# --------------------------------------------------------------------------- drawing


def _style_log_axes(ax: Axes, ns: Sequence[int]) -> None:
    """Log-2 x axis ticked at the measured lengths, log-10 y axis with plain labels."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(int(n) for n in ns))
    if len(ticks) > 10:
        ticks = ticks[:: math.ceil(len(ticks) / 10)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: _fmt_n(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(_fmt_value))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", color="#d9d9d9", linewidth=0.7)
    ax.grid(True, which="minor", axis="y", color="#eeeeee", linewidth=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _draw_reference_slopes(ax: Axes, x0: float, x1: float, y0: float) -> None:
    """Faint dashed ``n`` and ``n^2`` lines from ``(x0, y0)``; leaves the axis limits alone."""
    if not (x1 > x0 > 0 and y0 > 0):
        return
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    xs = np.geomspace(x0, x1, 50)
    for p, label in ((1, "∝ n"), (2, "∝ n²")):
        ys = y0 * (xs / x0) ** p
        ax.plot(xs, ys, ls=(0, (5, 4)), color="#9a9a9a", lw=0.9, alpha=0.8, zorder=1)
        inside = ys <= ylim[1] / 1.05
        if inside.any():
            i = int(np.flatnonzero(inside)[-1])
            exits = i < len(xs) - 1
            ax.annotate(
                label,
                (xs[i], ys[i]),
                xytext=(-4, 0) if exits else (-2, 3 if p == 2 else -3),
                textcoords="offset points",
                ha="right",
                va="top" if exits or p == 1 else "bottom",
                color="#8a8a8a",
                fontsize=7.5,
                zorder=1,
            )
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _annotate_stops(ax: Axes, items: Sequence[tuple[float, float, str, str]]) -> None:
    """Label the crosses where lines stop, avoiding overlapping labels.

    Crosses with the same label at the same length and nearly the same height share
    one label. Each label goes beside its cross (to the left near the right edge,
    else to the right), or above / below it when that spot would overlap an
    earlier label or leave the axes. Call after the figure layout is final.
    """
    fig = ax.get_figure()
    if fig is None or not items:
        return
    renderer = fig.canvas.get_renderer()
    (x_lo, x_hi) = ax.get_xlim()
    merged: list[tuple[float, float, str, str]] = []
    for x, y, text, color in sorted(items, key=lambda t: (t[0], t[2], t[1])):
        if merged:
            px, py, ptext, pcolor = merged[-1]
            if px == x and ptext == text and max(y, py) / min(y, py) < 2.0:
                merged[-1] = (x, max(y, py), text, pcolor if pcolor == color else "#444444")
                continue
        merged.append((x, y, text, color))
    box = ax.get_window_extent(renderer)
    placed = []
    for x, y, text, color in sorted(merged, key=lambda t: -t[1]):
        frac = math.log(x / x_lo) / math.log(x_hi / x_lo) if x_hi > x_lo > 0 else 0.0
        s = -1 if frac > 0.62 else 1
        ha = "right" if s < 0 else "left"
        candidates = [(8 * s, 0, "center"), (5 * s, 6, "bottom"), (5 * s, -6, "top")]
        candidates += [(5 * s, 6 + 10 * k, "bottom") for k in range(1, 4)]
        candidates += [(5 * s, -6 - 10 * k, "top") for k in range(1, 4)]
        for dx, dy, va in candidates:
            ann = _stop_label(ax, text, (x, y), (dx, dy), ha, va, color)
            ext = ann.get_window_extent(renderer)
            inside = ext.y0 >= box.y0 - 2 and ext.y1 <= box.y1 + 2 and ext.x0 >= box.x0 - 2 and ext.x1 <= box.x1 + 8
            if inside and not any(ext.overlaps(other) for other in placed):
                break
            ann.remove()
        else:  # no free spot: the first choice, beside the cross
            dx, dy, va = candidates[0]
            ann = _stop_label(ax, text, (x, y), (dx, dy), ha, va, color)
        placed.append(ann.get_window_extent(renderer))


def _stop_label(
    ax: Axes, text: str, xy: tuple[float, float], offset: tuple[float, float], ha: str, va: str, color: str
) -> Annotation:
    """One label next to a stop cross, ``offset`` points away from it."""
    return ax.annotate(
        text,
        xy,
        xytext=offset,
        textcoords="offset points",
        fontsize=7,
        color=color,
        va=va,
        ha=ha,
        zorder=5,
        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8),
    )


def _set_log_limits(ax: Axes, xs: Sequence[float], ys: Sequence[float], ypad: float = 1.6) -> None:
    """Axis limits that fit the data with a little room on a log scale."""
    x = np.asarray(xs, float)
    y = np.asarray(ys, float)
    y = y[np.isfinite(y) & (y > 0)]
    if x.size:
        ax.set_xlim(x.min() / 1.25, x.max() * 1.25)
    if y.size:
        lo, hi = y.min() / ypad, y.max() * ypad
        if hi / lo < 100:  # at least two decades, so the log axis has two labelled ticks
            widen = math.sqrt(100 / (hi / lo))
            lo, hi = lo / widen, hi * widen
        ax.set_ylim(lo, hi)


def _memory_unit(values: np.ndarray) -> tuple[float, str]:
    """GiB when the largest value is at least 2 GiB, else MiB."""
    v = values[np.isfinite(values)]
    if v.size and v.max() >= 2 * _GIB:
        return _GIB, "GiB"
    return _MIB, "MiB"


def _line_label(line: _Line, show_pattern: bool, fit_min_n: int | None) -> str:
    """Legend text: name, pattern when several, fitted exponents of time and memory."""
    name = f"{line.impl} · {line.pattern}" if show_pattern and line.pattern else line.impl
    et = _fit_larger_half(line.n, line.time_ms, fit_min_n)
    em = _fit_larger_half(line.n, line.mem, fit_min_n)
    parts = []
    if math.isfinite(et):
        parts.append(f"time $n^{{{et:.1f}}}$")
    if math.isfinite(em):
        parts.append(f"mem $n^{{{em:.1f}}}$")
    return f"{name}  ({', '.join(parts)})" if parts else name


def _footnote(lines: Sequence[_Line], show_pattern: bool, device: str | None) -> list[str]:
    """Notes under a figure: lines without any ok point, failures between ok points."""
    notes = []
    prefix = f"{device}: " if device else ""
    never = [
        f"{ln.impl}{' ' + ln.pattern if show_pattern and ln.pattern else ''} ({ln.never_ok})"
        for ln in lines
        if ln.never_ok
    ]
    if never:
        notes.append(prefix + "no ok point: " + "; ".join(never))
    gaps = [
        f"{ln.impl}{' ' + ln.pattern if show_pattern and ln.pattern else ''} n={_fmt_n(n)} ({why})"
        for ln in lines
        for n, why in ln.gaps
    ]
    if gaps:
        notes.append(prefix + "failed between ok points: " + "; ".join(gaps))
    return notes


def _finish_figure(fig: Figure, notes: Sequence[str], width_in: float) -> None:
    """Put wrapped notes under the axes and reserve room for them."""
    if not notes:
        return
    width_chars = max(60, int(width_in * 15))
    wrapped = [w for note in notes for w in textwrap.wrap(note, width_chars)]
    text = "\n".join(wrapped)
    height_in = fig.get_figheight()
    frac = min(0.4, (0.16 * len(wrapped) + 0.12) / height_in)
    fig.get_layout_engine().set(rect=(0, frac, 1, 1 - frac))
    fig.text(0.01, 0.01, text, ha="left", va="bottom", fontsize=7.5, color="#555555")


def _shape_text(key: dict[str, object]) -> str:
    """``B=1 H=12 D=64`` from the shape entries of a group key."""
    names = {"batch": "B", "heads": "H", "head_dim": "D"}
    parts = [f"{names[k]}={int(v)}" for k, v in key.items() if k in names and isinstance(v, float) and math.isfinite(v)]
    return " ".join(parts)


def _key_texts(key: dict[str, object], keys: Sequence[str]) -> list[str]:
    """Texts of the named entries of a group key (device, dtype, mode, shape), in that order."""
    texts = [str(key[k]) for k in ("device_name", "dtype", "mode") if k in keys and str(key[k]) not in ("", "nan")]
    shape = _shape_text({k: v for k, v in key.items() if k in keys})
    return [*texts, shape] if shape else texts


def _slug(key: dict[str, object], keys: Sequence[str]) -> str:
    """Safe file-name fragment from the named entries of a group key: ``bf16-fwd-b1-h12-d64``."""
    short = {"batch": "b", "heads": "h", "head_dim": "d"}
    parts = []
    for k in keys:
        v = key[k]
        if k in short:
            if isinstance(v, float) and math.isfinite(v):
                parts.append(f"{short[k]}{int(v)}")
        elif str(v) not in ("", "nan"):
            parts.append(str(v))
    return re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(parts)).strip("-").lower() or "all"


def _groups(df: pd.DataFrame, keys: Sequence[str]) -> list[tuple[dict[str, object], pd.DataFrame]]:
    """Group by ``keys`` (NaN kept as a value), in a stable sorted order."""
    if not keys:
        return [({}, df)]
    out = []
    for values, sub in df.groupby(list(keys), dropna=False, sort=True):
        if not isinstance(values, tuple):
            values = (values,)
        out.append((dict(zip(keys, values)), sub))
    return out


def _present_shape_keys(df: pd.DataFrame) -> list[str]:
    """Shape columns that vary or are known (all-NaN ones are left out)."""
    return [k for k in _SHAPE_KEYS if df[k].notna().any()]


def scaling_figures(
    df: pd.DataFrame,
    *,
    per_pattern: bool | None = None,
    fit_min_n: int | None = None,
    dpi: int = 110,
) -> list[tuple[str, Figure]]:
    """Build the time / memory scaling figures (without saving them).

    Args:
        df: results, from :func:`load_results` (optionally :func:`filter_results`).
        per_pattern: one figure per pattern; ``None``: only when a figure would
            otherwise hold more than :data:`MAX_PATTERNS_PER_FIGURE` patterns.
        fit_min_n: fit exponents over ``n >= fit_min_n`` instead of the larger half.
        dpi: figure resolution.

    Returns:
        ``(slug, figure)`` pairs; the slug names what the figure shows (dtype, mode,
        pattern, shape; only the parts that differ between figures) for file names.
    """
    df = _latest(_ensure_normalised(df))
    shape_keys = _present_shape_keys(df)
    fig_keys = ["dtype", "mode", *shape_keys]
    if per_pattern is None:
        per_pattern = any(sub["pattern"].nunique() > MAX_PATTERNS_PER_FIGURE for _, sub in _groups(df, fig_keys))
    if per_pattern:
        fig_keys.append("pattern")
    groups = _groups(df, fig_keys)
    varying = [k for k in fig_keys if df[k].nunique(dropna=False) > 1]
    impls = set(df["impl"])
    colors = {name: impl_color(name, impls) for name in impls}
    fit_note = (
        f"exponents: least-squares slope of log y vs log n over n >= {_fmt_n(fit_min_n)}"
        if fit_min_n
        else "exponents: least-squares slope of log y vs log n over the larger half of each line's lengths"
    )

    figures = []
    for key, sub in groups:
        fig = _scaling_figure(sub, key, colors, fit_min_n, fit_note, dpi)
        figures.append((_slug(key, varying), fig))
    return figures


def _side_legend(ax, handles: list, title: str) -> None:
    """The legend outside the right edge of ``ax``, shared by every figure."""
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        frameon=False,
        title=title,
        title_fontsize=8.5,
        alignment="left",
    )


def _scaling_figure(
    sub: pd.DataFrame,
    key: dict[str, object],
    colors: dict[str, str],
    fit_min_n: int | None,
    fit_note: str,
    dpi: int,
) -> Figure:
    """One scaling figure: a row of (time, memory) panels per device."""
    cpu_names = set(sub.loc[sub["device"] == "cpu", "device_name"])
    devices = sorted(sub["device_name"].unique(), key=lambda d: (d in cpu_names, d))
    patterns = _pattern_order(sub["pattern"])
    show_pattern = len(patterns) > 1
    style = {p: (_LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)]) for i, p in enumerate(patterns)}
    unit, unit_name = _memory_unit(sub.loc[sub["status"] == "ok", "peak_mem_bytes"].to_numpy(dtype=float))
    ns_all = sorted(sub["seq_len"].unique())

    n_rows = len(devices)
    width = 13.5 if show_pattern else 12.5
    ok_rows = sub[sub["status"] == "ok"]
    entries = ok_rows.groupby("device_name")[["impl", "pattern"]].apply(lambda g: len(g.drop_duplicates()))
    row_height = max(4.1, 0.8 + 0.2 * (int(entries.max()) + 1 if len(entries) else 0))  # room for the legend
    fig = Figure(figsize=(width, 0.6 + row_height * n_rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 2, squeeze=False, sharex=True)
    for r in range(1, n_rows):  # shared y per column, so devices compare directly
        axes[r, 0].sharey(axes[0, 0])
        axes[r, 1].sharey(axes[0, 1])

    notes: list[str] = []
    stops: dict[Axes, list[tuple[float, float, str, str]]] = {}
    all_t: list[float] = []
    all_m: list[float] = []
    for r, device in enumerate(devices):
        rows = sub[sub["device_name"] == device]
        lines = [
            _analyse(g)
            for _, g in sorted(
                rows.groupby(["impl", "pattern"], sort=False),
                key=lambda kv: (impl_order(rows["impl"]).index(kv[0][0]), patterns.index(kv[0][1])),
            )
        ]
        ax_t, ax_m = axes[r]
        handles = []
        for line in lines:
            ls, marker = style[line.pattern]
            color = colors[line.impl]
            label = _line_label(line, show_pattern, fit_min_n)
            kw = dict(color=color, ls=ls, marker=marker, ms=3.5, lw=1.6, zorder=3)
            for ax, vals in ((ax_t, line.time_ms), (ax_m, line.mem / unit)):
                good = np.isfinite(vals) & (vals > 0)
                if not good.any():
                    continue
                ax.plot(line.n[good], vals[good], **kw)
                if line.stop:
                    i = int(np.flatnonzero(good)[-1])
                    ax.plot(line.n[i], vals[i], marker="X", ms=9, color=color, mec="white", mew=0.8, zorder=4)
                    stops.setdefault(ax, []).append(
                        (line.n[i], vals[i], f"{line.stop[1]} at {_fmt_n(line.stop[0])}", color)
                    )
            all_t.extend(line.time_ms[np.isfinite(line.time_ms)])
            all_m.extend((line.mem / unit)[np.isfinite(line.mem)])
            if line.n.size:
                handles.append(Line2D([], [], label=label, **kw))
        if any(ln.stop for ln in lines):
            handles.append(
                Line2D([], [], ls="none", marker="X", ms=8, color="#555555", mec="white", label="last ok point")
            )
        notes += _footnote(lines, show_pattern, device if n_rows > 1 else None)

        prefix = f"{device}\n" if n_rows > 1 else ""
        mode = str(key.get("mode", "")) or sub["mode"].iloc[0]
        ax_t.set_title(f"{prefix}time per call ({mode})" if mode else f"{prefix}time per call", fontsize=10.5)
        ax_m.set_title(f"{prefix}peak memory", fontsize=10.5)
        ax_t.set_ylabel("median time [ms]")
        ax_m.set_ylabel(f"peak memory [{unit_name}]")
        if handles:
            _side_legend(
                ax_m, handles, "impl (fitted scaling)" if not show_pattern else "impl · pattern (fitted scaling)"
            )
        for ax, what in ((ax_t, "time"), (ax_m, "peak-memory")):
            if not ax.lines:
                ax.text(0.5, 0.5, f"no {what} measurement", transform=ax.transAxes, ha="center", color="#777777")

    for ax in axes.flat:
        _style_log_axes(ax, ns_all)
    for r in range(n_rows):
        axes[r, 0].set_xlabel("sequence length n [tokens]" if r == n_rows - 1 else "")
        axes[r, 1].set_xlabel("sequence length n [tokens]" if r == n_rows - 1 else "")
    ok_ns = sub.loc[sub["status"] == "ok", "seq_len"].to_numpy(dtype=float)
    if ok_ns.size:
        for c, vals in ((0, all_t), (1, all_m)):
            _set_log_limits(axes[0, c], ns_all, vals)
            firsts = _first_values(sub, c, unit)
            for r in range(n_rows):
                if firsts:
                    _draw_reference_slopes(axes[r, c], min(ok_ns), max(ns_all), min(firsts) / 2)

    title = [str(devices[0]) if n_rows == 1 else "", str(key.get("dtype", "")), str(mode)]
    if "pattern" in key:
        title.append(f"pattern {key['pattern']}")
    elif not show_pattern and patterns and patterns[0]:
        title.append(f"pattern {patterns[0]}")
    shape = _shape_text(key)
    if shape:
        title.append(shape)
    fig.suptitle(" · ".join(t for t in title if t), fontsize=12, fontweight="bold")
    _finish_figure(fig, [*notes, fit_note + "; x: last ok point before the failure named next to it"], width)
    fig.get_layout_engine().execute(fig)
    for ax, items in stops.items():
        _annotate_stops(ax, items)
    return fig


def _first_values(sub: pd.DataFrame, column: int, unit: float) -> list[float]:
    """Each line's value at its shortest ok length (time for column 0, memory for 1)."""
    ok = sub[sub["status"] == "ok"]
    col = "time_ms_median" if column == 0 else "peak_mem_bytes"
    ok = ok[np.isfinite(ok[col]) & (ok[col] > 0)]
    if ok.empty:
        return []
    first = ok.sort_values("seq_len").groupby(["impl", "pattern", "device_name"], sort=False)[col].first()
    scale = 1.0 if column == 0 else unit
    return [float(v) / scale for v in first]


def ratio_table(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Speedup and memory ratio of every implementation against ``baseline``.

    Rows are matched on device, dtype, mode, pattern, shape and seq_len, where both
    are ``ok``. Columns: the keys, ``impl``, ``speedup`` (baseline time / impl
    time) and ``mem_ratio`` (baseline memory / impl memory).

    Raises:
        ResultsError: ``baseline`` is not an implementation in the table.
    """
    df = _latest(_ensure_normalised(df))
    if baseline not in set(df["impl"]):
        raise ResultsError(f"baseline {baseline!r} is not in the table (impls: {', '.join(impl_order(df['impl']))})")
    keys = ["device_name", "dtype", "mode", "pattern", *_SHAPE_KEYS, "seq_len"]
    ok = df[df["status"] == "ok"]
    base = ok[ok["impl"] == baseline][[*keys, "time_ms_median", "peak_mem_bytes"]]
    other = ok[ok["impl"] != baseline][[*keys, "impl", "time_ms_median", "peak_mem_bytes"]]
    merged = other.merge(base, on=keys, suffixes=("", "_base"))
    merged["speedup"] = merged["time_ms_median_base"] / merged["time_ms_median"]
    merged["mem_ratio"] = merged["peak_mem_bytes_base"] / merged["peak_mem_bytes"]
    return merged[[*keys, "impl", "speedup", "mem_ratio"]].reset_index(drop=True)


def ratio_figure(df: pd.DataFrame, baseline: str, *, dpi: int = 110) -> Figure:
    """Build the speedup / memory-ratio figure against ``baseline`` (without saving it).

    One row of panels per (device, dtype, mode, shape); patterns by line style.
    A dotted vertical line marks where the baseline itself stops (e.g. runs out of
    memory), beyond which no ratio exists.

    Raises:
        ResultsError: ``baseline`` is not an implementation in the table.
    """
    df = _latest(_ensure_normalised(df))
    table = ratio_table(df, baseline)
    shape_keys = _present_shape_keys(df)
    row_keys = ["device_name", "dtype", "mode", *shape_keys]
    cpu_names = set(df.loc[df["device"] == "cpu", "device_name"])
    groups = sorted(_groups(df, row_keys), key=lambda kv: kv[0]["device_name"] in cpu_names)
    varying = [k for k in row_keys if df[k].nunique(dropna=False) > 1]
    patterns = _pattern_order(df["pattern"])
    show_pattern = len(patterns) > 1
    style = {p: (_LINESTYLES[i % len(_LINESTYLES)], _MARKERS[i % len(_MARKERS)]) for i, p in enumerate(patterns)}
    ns_all = sorted(df["seq_len"].unique())
    impls = set(df["impl"])
    colors = {name: impl_color(name, impls) for name in impls}

    n_rows = len(groups)
    width = 13.0
    fig = Figure(figsize=(width, 0.6 + 3.9 * n_rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 2, squeeze=False, sharex=True)
    notes = []
    for r, (key, rows) in enumerate(groups):
        ax_s, ax_m = axes[r]
        sel = pd.Series(True, index=table.index)
        for k in row_keys:
            v = key[k]
            sel &= table[k].isna() if isinstance(v, float) and math.isnan(v) else table[k] == v
        tab = table[sel]
        handles = []
        for impl in impl_order(tab["impl"]):
            for pat in patterns:
                t = tab[(tab["impl"] == impl) & (tab["pattern"] == pat)].sort_values("seq_len")
                if t.empty:
                    continue
                ls, marker = style[pat]
                kw = dict(color=colors[impl], ls=ls, marker=marker, ms=3.5, lw=1.6, zorder=3)
                for ax, col in ((ax_s, "speedup"), (ax_m, "mem_ratio")):
                    good = np.isfinite(t[col]) & (t[col] > 0)
                    ax.plot(t.loc[good, "seq_len"], t.loc[good, col], **kw)
                last = t.iloc[-1]
                label = f"{impl} · {pat}" if show_pattern and pat else impl
                label += f" (×{last['speedup']:.3g} time, ×{last['mem_ratio']:.3g} mem at {_fmt_n(last['seq_len'])})"
                handles.append(Line2D([], [], label=label, **kw))
        # where the baseline stops, no ratio exists beyond
        base_stops: dict[tuple[int, str], list[str]] = {}
        for pat in patterns:
            b = rows[(rows["impl"] == baseline) & (rows["pattern"] == pat)]
            if b.empty:
                continue
            line = _analyse(b)
            if line.stop:
                base_stops.setdefault(line.stop, []).append(pat)
            elif line.never_ok:
                notes.append(f"{baseline} {pat}: no ok point ({line.never_ok})")
        for (stop_n, why), pats in base_stops.items():
            which = f" {', '.join(pats)}" if show_pattern and len(pats) < len(patterns) else ""
            for ax in (ax_s, ax_m):
                ax.axvline(stop_n, color="#888888", ls=":", lw=1.2, zorder=2)
                ax.annotate(
                    f"{baseline}{which}: {why} from {_fmt_n(stop_n)}",
                    (stop_n, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(-3, -3),
                    textcoords="offset points",
                    rotation=90,
                    ha="right",
                    va="top",
                    fontsize=7,
                    color="#666666",
                )
        for ax in (ax_s, ax_m):
            ax.axhline(1.0, color="#444444", lw=1.0, zorder=2)
        desc = " · ".join(t for t in _key_texts(key, varying) if t)
        prefix = f"{desc}\n" if desc else ""
        ax_s.set_title(f"{prefix}speedup vs {baseline}", fontsize=10.5)
        ax_m.set_title(f"{prefix}memory ratio vs {baseline}", fontsize=10.5)
        ax_s.set_ylabel(f"speedup: {baseline} time / impl time [×]")
        ax_m.set_ylabel(f"memory ratio: {baseline} / impl peak [×]")
        if handles:
            _side_legend(ax_m, handles, "impl (ratio at its last common length)")
        else:
            for ax in (ax_s, ax_m):
                ax.text(
                    0.5,
                    0.7,
                    f"no length where {baseline} and another impl are both ok",
                    transform=ax.transAxes,
                    ha="center",
                    color="#777777",
                )
    for ax in axes.flat:
        _style_log_axes(ax, ns_all)
        ax.set_xlim(min(ns_all) / 1.25, max(ns_all) * 1.25)
        lo, hi = ax.get_ylim()
        lo, hi = min(lo, 0.5), max(hi, 2.0)
        if hi / lo < 100:  # at least two decades, so the log axis has labelled ticks
            widen = math.sqrt(100 / (hi / lo))
            lo, hi = lo / widen, hi * widen
        ax.set_ylim(lo, hi)
    for c in range(2):
        axes[-1, c].set_xlabel("sequence length n [tokens]")
    title = [f"ratios against {baseline}"]
    title += _key_texts(groups[0][0], [k for k in row_keys if k not in varying])
    if len(patterns) == 1 and patterns[0]:
        title.append(f"pattern {patterns[0]}")
    fig.suptitle(" · ".join(t for t in title if t and t != "nan"), fontsize=12, fontweight="bold")
    notes.append("above 1: better than the baseline; only lengths where both are ok")
    _finish_figure(fig, notes, width)
    return fig


# --------------------------------------------------------------------------- saving


def _save(fig: Figure, path: Path) -> Path:
    """Write a figure as an image (format from the suffix) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_figure(str(path), dpi=fig.dpi)
    return path


def plot_scaling(
    df: pd.DataFrame,
    out_path: str | Path,
    *,
    per_pattern: bool | None = None,
    fit_min_n: int | None = None,
    dpi: int = 110,
) -> list[Path]:
    """Draw the scaling figures (see :func:`scaling_figures`) and save them.

    With one figure it is written to ``out_path``; with several, each goes to
    ``<stem>-<slug><suffix>`` next to it (e.g. ``scaling-bf16-fwd.png``).

    Returns:
        The paths written.
    """
    out = Path(out_path)
    figures = scaling_figures(df, per_pattern=per_pattern, fit_min_n=fit_min_n, dpi=dpi)
    if len(figures) == 1:
        return [_save(figures[0][1], out)]
    paths = []
    for i, (slug, fig) in enumerate(figures):
        paths.append(_save(fig, out.with_name(f"{out.stem}-{slug or i}{out.suffix or '.png'}")))
    return paths


def plot_ratios(df: pd.DataFrame, baseline: str, out_path: str | Path, *, dpi: int = 110) -> Path:
    """Draw the speedup / memory-ratio figure against ``baseline`` and save it to ``out_path``.

    Raises:
        ResultsError: ``baseline`` is not an implementation in the table.
    """
    return _save(ratio_figure(df, baseline, dpi=dpi), Path(out_path))


def pivot_results(
    df: pd.DataFrame, value: str = "time_ms_median", *, scale: float = 1.0, digits: int | None = 3
) -> pd.DataFrame:
    """A table of ``value / scale``: one row per implementation, one column per seq_len.

    Cells of ok rows hold the number (rounded to ``digits`` significant digits
    unless ``None``); cells of other rows hold the short reason (``OOM``,
    ``skipped: memory budget``...). When the table holds several devices, patterns,
    dtypes, modes or shapes, those that vary lead the row index, so slices never mix.
    """
    df = _latest(_ensure_normalised(df))
    if value not in df.columns:
        raise ResultsError(f"no column {value!r} in the table")
    numbers = pd.to_numeric(df[value], errors="coerce") / scale
    if digits is not None:
        numbers = numbers.map(lambda v: float(f"{v:.{digits}g}") if math.isfinite(v) else v)
    labels = pd.Series([short_reason(s, r) for s, r in zip(df["status"], df["reason"])], index=df.index, dtype=object)
    cells = numbers.astype(object).where(df["status"] == "ok", labels)
    slice_keys = [k for k in ("device_name", "pattern", "dtype", "mode", *_SHAPE_KEYS) if df[k].nunique() > 1]
    index = [*slice_keys, "impl"]
    table = df.assign(_cell=cells).pivot(index=index, columns="seq_len", values="_cell")
    rank = {name: i for i, name in enumerate(impl_order(df["impl"]))}
    if slice_keys:
        order = sorted(table.index, key=lambda key: (*key[:-1], rank[key[-1]]))
    else:
        order = sorted(table.index, key=lambda impl: rank[impl])
    table = table.reindex(order)
    table.columns = pd.Index([int(c) for c in table.columns], name="seq_len")
    return table


# --------------------------------------------------------------------------- command line


def _build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m attnbench.plot",
        description=textwrap.fill(
            "Plot benchmark results: median time and peak memory against sequence length "
            "(log-log, one line per implementation, fitted scaling exponents in the legend, "
            "a cross where an implementation stopped: OOM, over a budget, wrong...). "
            "With --baseline also plot speedup and memory ratio against that implementation.",
            width=88,
        ),
        epilog=(
            "examples:\n"
            "  python -m attnbench.plot results/scaling-h100.csv\n"
            "  python -m attnbench.plot results/scaling-*.csv --baseline naive --out figs/scaling.png\n"
            "  python -m attnbench.plot results/scaling-h100.csv --pattern 'w512 g1' --mode fwd --dtype bf16\n\n"
            "Several figures (one per dtype / mode / shape, or per pattern) are written as\n"
            "<out stem>-<what>.png. Exit status: 0 ok, 2 unusable input or bad arguments."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("results", nargs="+", type=Path, help="results CSV file(s) written by the benchmark")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output image (.png, .pdf, .svg); default: next to the first CSV, same stem, .png",
    )
    p.add_argument(
        "--baseline",
        metavar="IMPL",
        default=None,
        help="also draw speedup and memory ratio against this implementation, to <out stem>-vs-IMPL.png",
    )
    p.add_argument("--pattern", action="append", metavar="LABEL", help="only this pattern, e.g. 'w512 g1' (repeatable)")
    p.add_argument("--mode", action="append", metavar="MODE", help="only this mode: fwd, bwd, fwd_bwd (repeatable)")
    p.add_argument("--dtype", action="append", metavar="DTYPE", help="only this dtype: fp32, bf16, fp16 (repeatable)")
    p.add_argument("--impl", action="append", metavar="IMPL", help="only this implementation (repeatable)")
    p.add_argument(
        "--device",
        metavar="TEXT",
        help="only this device: 'cpu'/'cuda' or a part of the device name, e.g. 'H100'",
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--per-pattern",
        dest="per_pattern",
        action="store_const",
        const=True,
        default=None,
        help=f"one figure per pattern (default: only with more than {MAX_PATTERNS_PER_FIGURE} patterns)",
    )
    split.add_argument(
        "--no-per-pattern",
        dest="per_pattern",
        action="store_const",
        const=False,
        help="all patterns in one figure, told apart by line style",
    )
    p.add_argument(
        "--fit-min-n",
        type=int,
        metavar="N",
        default=None,
        help="fit exponents over lengths >= N (default: the larger half of each line's lengths)",
    )
    p.add_argument("--dpi", type=int, default=110, help="image resolution (default 110)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on unusable input)."""
    args = _build_parser().parse_args(argv)
    try:
        df = load_results(args.results)
        df = filter_results(
            df, patterns=args.pattern, modes=args.mode, dtypes=args.dtype, impls=args.impl, device=args.device
        )
        if args.baseline is not None and args.baseline not in set(df["impl"]):
            raise ResultsError(
                f"baseline {args.baseline!r} is not in the table (impls: {', '.join(impl_order(df['impl']))})"
            )
        out = args.out if args.out is not None else args.results[0].with_suffix(".png")
        written = plot_scaling(df, out, per_pattern=args.per_pattern, fit_min_n=args.fit_min_n, dpi=args.dpi)
        if args.baseline is not None:
            suffix = out.suffix or ".png"
            written.append(
                plot_ratios(df, args.baseline, out.with_name(f"{out.stem}-vs-{args.baseline}{suffix}"), dpi=args.dpi)
            )
    except ResultsError as e:
        print(f"attnbench.plot: error: {_one_line(e)}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
