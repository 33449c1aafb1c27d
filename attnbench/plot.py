"""Every figure of results tables: time and peak memory against sequence length (the
Longformer paper's Figure 1, on the machine at hand), ratios against a baseline, a
kernel's gain inside a model, and where the time goes.

    python -m attnbench.plot results/scaling-cpu.csv --baseline naive
    python -m attnbench.plot results/breakdown-cpu.csv --figure breakdown   # any figure, again

A run draws the figure its ``figure`` setting names (:data:`FIGURE_WRITERS`, through
:func:`write_figure`) from the study's table at its end: ``scaling``, ``model``,
``breakdown``, ``none``, or ``auto`` (:func:`auto_figure`: model when the study has
rows inside a model, breakdown when it has profiled rows of several implementations).

Tables are read by :func:`attnbench.tables.load` (typed, one row per measurement).
*Scaling* (:func:`scaling_figures`): median time and peak memory against n, log-log,
one line per implementation and pattern; colour is the implementation (the registry's
order), line style and a filled or hollow marker the pattern, so lines that coincide
stay visible. The legend gives each line's fitted exponents and, where it stops, why
(an ``X`` marks its last ``ok`` point). Faint lines show slopes n and n². One figure
per dtype, mode and shape; one row of panels per device; one figure per pattern with
more than :data:`MAX_PATTERNS_PER_FIGURE`.
*Ratios* (:func:`ratio_figure`): speed-up and memory ratio over a baseline, where both
were measured.
*Model* (:func:`model_figure`): at the largest n where the model's baseline was measured
alone and inside the model, each implementation's speed-up over it for the attention
call alone and for the whole model; a note names the implementations without a bar and why.
*Breakdown* (:func:`breakdown_figure`): each implementation's profiled call, its time
by category (:func:`attnbench.profile.breakdown`) stacked to 100%, and its peak memory.
A row that is not ``ok`` is named by :func:`short_reason`, from its ``status`` and
``reason_kind`` (never the words of its ``reason``). Figures use matplotlib's Agg
backend and never open a window.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from .config import FIGURES, MODES, setting_error
from .model import baseline_of
from .profile import CATEGORIES, breakdown
from .registry import list_impls
from .results import column as schema_column
from .results import number
from .stats import ratio_interval
from .tables import ResultsError, load, report_written

__all__ = ["PALETTE", "MAX_PATTERNS_PER_FIGURE", "ResultsError", "load_results", "filter_results", "fit_exponent",
           "impl_color", "impl_order", "REASON_WORDS", "short_reason", "pivot_results", "ratio_table", "ratio_text",
           "scaling_figures", "ratio_figure", "model_figure", "breakdown_figure", "plot_scaling", "plot_ratios",
           "write_model_figure", "write_breakdown", "FIGURE_WRITERS", "auto_figure", "write_figure", "main",
]  # fmt: skip

#: colours, colour-blind-friendly first; implementations take them in the registry's order
PALETTE: tuple[str, ...] = (
    "#0072B2", "#009E73", "#9467BD", "#CC79A7", "#8C564B", "#E69F00", "#222222", "#56B4E9", "#D55E00",
    "#BCBD22", "#17BECF", "#E7298A", "#66A61E", "#7570B3", "#A6761D", "#1B9E77", "#FB6A4A", "#6A3D9A",
)  # fmt: skip
#: per pattern, in order: line style, marker, filled
STYLES = (("-", "o", True), ("--", "s", False), (":", "^", True), ("-.", "D", False))
MAX_PATTERNS_PER_FIGURE = len(STYLES)
LINE_KEYS = ("impl", "pattern", "device_name")
SHAPE_KEYS = ("batch", "heads", "head_dim")

load_results = load  # the name the notebooks use


def filter_results(
    df: pd.DataFrame, *, patterns=None, modes=None, dtypes=None, impls=None, device=None
) -> pd.DataFrame:
    """Rows matching every filter given; ``device`` is ``cpu``/``cuda`` or a part of the
    device's name. Raises :class:`ResultsError` listing what the table holds."""
    keep = pd.Series(True, index=df.index)
    asked = []
    for col, values in (("pattern", patterns), ("mode", modes), ("dtype", dtypes), ("impl", impls)):
        if values:
            keep &= df[col].isin(list(values))
            asked.append(f"{col} in {list(values)}")
    if device:
        keep &= (df["device"] == device) | df["device_name"].str.lower().str.contains(device.lower(), regex=False)
        asked.append(f"device {device!r}")
    if not keep.any():
        held = {
            c: ", ".join(sorted(map(str, df[c].unique()))) for c in ("pattern", "mode", "dtype", "impl", "device_name")
        }
        raise ResultsError(f"no rows match {' and '.join(asked)}; the table holds patterns [{held['pattern']}], "
                           f"modes [{held['mode']}], dtypes [{held['dtype']}], impls [{held['impl']}], "
                           f"devices [{held['device_name']}]")  # fmt: skip
    return df[keep]


def fit_exponent(n: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y against log n (NaN with fewer than two usable lengths)."""
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(n) & np.isfinite(y) & (n > 0) & (y > 0)
    if len(np.unique(n[ok])) < 2:
        return math.nan
    return float(np.polyfit(np.log(n[ok]), np.log(y[ok]), 1)[0])


def _fit_larger_half(n: np.ndarray, y: np.ndarray) -> float:
    """The exponent over the larger half of the lengths (at least two): short lengths are
    dominated by fixed costs and would bias the slope low."""
    k = max(2, math.ceil(len(n) / 2))
    return fit_exponent(n[-k:], y[-k:])


def impl_order(impls: Iterable[str]) -> list[str]:
    """``impls`` in the registry's order, then names it does not know alphabetically."""
    known = list_impls()
    return sorted(set(impls), key=lambda s: (known.index(s) if s in known else len(known), s))


def impl_color(impl: str, others: Iterable[str] = ()) -> str:
    """An implementation's colour: its place in the registry's order (every figure
    agrees); other names follow alphabetically among ``others``."""
    order = impl_order(set(list_impls()) | {impl, *others})
    return PALETTE[order.index(impl) % len(PALETTE)]


#: a few words for each ``reason_kind`` of a row that is not ok (and for its status,
#: where a table predates reason_kind)
REASON_WORDS = {
    "unsupported": "unsupported", "unavailable": "unavailable", "memory": "skipped: memory budget",
    "time": "skipped: time budget", "interpreter": "skipped: interpreter", "oom": "OOM", "wrong": "wrong result",
    "error": "error",
}  # fmt: skip


def short_reason(status: str, reason_kind: str = "") -> str:
    """A few words for a row that is not ``ok``: OOM, skipped: memory budget, ... From
    ``status`` and ``reason_kind`` alone; a row without a reason_kind (an older table)
    shows its status."""
    kind, status = str(reason_kind or "").strip().lower(), str(status or "").strip().lower()
    return REASON_WORDS.get(kind) or REASON_WORDS.get(status) or status or "?"


def _row_reason(row) -> str:
    """:func:`short_reason` of a row (a mapping or a frame's row)."""
    return short_reason(row["status"], row.get("reason_kind", ""))


def _fmt_n(n: float) -> str:
    """512, 4k, 64k, 1M."""
    n = int(n)
    for unit, size in (("M", 2**20), ("k", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _pattern_order(patterns: Iterable[str]) -> list[str]:
    return sorted(set(patterns), key=lambda p: (len(p.split()), len(p), p))  # simplest first: the solid line


def _explain_patterns(patterns: Iterable[str]) -> str:
    """What the parts of the pattern labels given mean (pass only the ones drawn)."""
    words = {w for p in patterns for w in p.split()}
    causal = "causal" in words
    parts = []
    for w in sorted(int(w[1:]) for w in words if re.fullmatch(r"w\d+", w)):
        parts.append(f"w{w} = window {w} ({w // 2} keys each side" + (f", or the {w} before when causal)" if causal
                                                                       else ")"))  # fmt: skip
    for pair in sorted(w for w in words if re.fullmatch(r"w\[\d+,\d+\]", w)):
        left, right = pair[2:-1].split(",")
        parts.append(f"{pair} = {left} keys before each query, {right} after")
    for d in sorted(w for w in words if re.fullmatch(r"d[\d/]+", w)):
        parts.append(f"{d} = dilation {d[1:]}" + (" (per head)" if "/" in d else ""))
    if causal:
        parts.append("causal = the window's keys to the left")
    for g in sorted((w for w in words if re.fullmatch(r"g\d+", w)), key=lambda g: int(g[1:])):
        k = int(g[1:])
        parts.append(f"{g} = {k} global token{'s' if k > 1 else ''} (attending to and attended by every token)")
    return "; ".join(parts)


class _Line:
    """One implementation and pattern on one device: its ok points, and where it stops."""

    def __init__(self, rows: pd.DataFrame):
        rows = rows.sort_values("seq_len")
        ok = rows[rows["status"] == "ok"]
        self.n = ok["seq_len"].to_numpy()
        self.time = ok["time_ms_median"].to_numpy()
        self.low = ok["time_ms_ci_low"].to_numpy(dtype=float)  # the 95% interval (NaN: none)
        self.high = ok["time_ms_ci_high"].to_numpy(dtype=float)
        self.mem = ok["peak_mem_bytes"].to_numpy()
        after = rows[(rows["status"] != "ok") & (rows["seq_len"] > (self.n.max() if len(self.n) else 0))]
        first = after.iloc[0] if len(after) else None
        self.stop = None if first is None else (int(first["seq_len"]), _row_reason(first))


def _analyse(rows: pd.DataFrame) -> _Line:
    return _Line(rows)


def pivot_results(df: pd.DataFrame, column: str = "time_ms_median", scale: float = 1.0) -> pd.DataFrame:
    """Implementations x sequence lengths: ``column / scale`` where ok, else the reason."""
    cells = df.assign(cell=[r[column] / scale if r["status"] == "ok" else _row_reason(r) for _, r in df.iterrows()])
    table = cells.pivot_table(index="impl", columns="seq_len", values="cell", aggfunc="last")
    return table.reindex(impl_order(table.index))


def ratio_table(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Speed-up (baseline time / time) with its 95% interval (:func:`attnbench.stats.ratio_interval`:
    ``speedup_low``, ``speedup_high``) and memory ratio (baseline memory / memory) of every
    other implementation, where both are ok, on the same device, dtype, mode, pattern, shape."""
    if baseline not in set(df["impl"]):
        raise ResultsError(f"baseline {baseline!r} is not in the table (impls: {', '.join(impl_order(df['impl']))})")
    keys = ["device_name", "dtype", "mode", "pattern", *SHAPE_KEYS, "seq_len"]
    ok = df[df["status"] == "ok"]
    base = {tuple(r[k] for k in keys): r for r in ok[ok["impl"] == baseline].to_dict("records")}
    out = []
    for r in ok[ok["impl"] != baseline].to_dict("records"):
        b = base.get(tuple(r[k] for k in keys))
        if b is None:
            continue
        speedup, low, high = ratio_interval(b, r)
        mb, mr = number(b["peak_mem_bytes"]), number(r["peak_mem_bytes"])
        out.append({"impl": r["impl"], **{k: r[k] for k in keys}, "speedup": speedup, "speedup_low": low,
                    "speedup_high": high, "mem_ratio": mb / mr if mb is not None and mr else math.nan})  # fmt: skip
    columns = ["impl", *keys, "speedup", "speedup_low", "speedup_high", "mem_ratio"]
    return pd.DataFrame(out, columns=columns)


def ratio_text(table: pd.DataFrame, baseline: str) -> str:
    """The ratio table as the terminal shows it: each speed-up with its 95% interval."""
    if table.empty:
        return f"(no implementation measured beside {baseline})"
    head = f"speed-up over {baseline} [95% interval]"
    spans = zip(table["speedup"], table["speedup_low"], table["speedup_high"])
    cells = table.assign(**{head: [f"{s:.3g}x " + ("(no interval)" if lo != lo else f"[{lo:.3g}, {hi:.3g}]")
                                   for s, lo, hi in spans],
                            "memory ratio": [f"{m:.3g}x" if m == m else "-" for m in table["mem_ratio"]]})  # fmt: skip
    cols = ["impl", "pattern", "dtype", "mode", "seq_len", head, "memory ratio"]
    return cells[cols].rename(columns={"seq_len": "n"}).to_string(index=False)


# ---------------------------------------------------------------------- drawing
def _log_axes(ax, ns: Sequence[float], ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(int(n) for n in ns))
    ax.set_xticks(ticks, [_fmt_n(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel(schema_column("seq_len").label)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", color="#e0e0e0", lw=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _slopes(ax, xs: np.ndarray, ys: np.ndarray) -> None:
    """Faint n and n² from the lowest first point; each label where its line is inside."""
    if len(xs) == 0 or not np.isfinite(ys).any():
        return
    (x0, x1), (ylo, yhi) = (xs.min(), xs.max()), ax.get_ylim()
    y0 = np.nanmin(ys[xs == x0])
    grid = np.geomspace(x0, x1, 30)
    for k, label in ((1, "∝ n"), (2, "∝ n²")):
        line = y0 * (grid / x0) ** k
        ax.plot(grid, line, ls=(0, (4, 4)), color="#a0a0a0", lw=0.8, zorder=1)
        inside = np.flatnonzero(line < yhi / 1.5)
        i = inside[-1] if len(inside) else 0
        ax.text(grid[i], line[i], label, color="#909090", fontsize=7, ha="right", va="bottom", clip_on=True)
    ax.set_ylim(ylo, yhi)


def _scaling_figure(sub: pd.DataFrame, title: str, dpi: int) -> Figure:
    devices = sorted(sub["device_name"].unique())
    patterns = _pattern_order(sub["pattern"])
    impls = impl_order(sub["impl"])
    legend_rows = math.ceil((len(sub.groupby(["impl", "pattern"])) + 1) / 2)
    bottom_in = 0.75 + 0.2 * legend_rows  # the legend and the notes, under the panels
    fig = Figure(figsize=(11, 3.9 * len(devices) + 0.5 + bottom_in), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(devices), 2, squeeze=False, sharex=True)
    handles, dropped, drawn, fitted, banded = {}, [], set(), False, False
    for row, device in zip(axes, devices):
        panels = ((row[0], "time", 1.0, schema_column("time_ms_median").label),
                  (row[1], "mem", 2**20, schema_column("peak_mem_bytes").label))  # fmt: skip
        for col, (ax, what, scale, unit) in enumerate(panels):
            xs, ys = [], []
            for impl in impls:
                for p_i, pattern in enumerate(patterns):
                    rows = sub[(sub["impl"] == impl) & (sub["pattern"] == pattern) & (sub["device_name"] == device)]
                    if rows.empty:
                        continue
                    line = _Line(rows)
                    vals = getattr(line, what) / scale
                    good = np.isfinite(vals)
                    if not good.any():
                        if col == 0:
                            dropped.append(f"{impl} {pattern}: {line.stop[1] if line.stop else 'no ok row'}")
                        continue
                    ls, marker, filled = STYLES[p_i % len(STYLES)]
                    color = impl_color(impl, impls)
                    style = dict(color=color, ls=ls, marker=marker, ms=4, lw=1.5, mfc=color if filled else "white")
                    ax.plot(line.n[good], vals[good], **style)
                    if what == "time" and np.isfinite(line.low[good]).any():  # the 95% intervals, as a band
                        ax.fill_between(line.n[good], line.low[good], line.high[good], color=color, alpha=0.18, lw=0)
                        banded = True
                    drawn.add(pattern)
                    if line.stop:
                        ax.plot(line.n[good][-1], vals[good][-1], marker="X", ms=9, color=color, mec="white", zorder=4)
                    xs += list(line.n[good])
                    ys += list(vals[good])
                    if col == 0 and (impl, pattern) not in handles:
                        t, m = _fit_larger_half(line.n, line.time), _fit_larger_half(line.n, line.mem)
                        fits = [f"{k} n^{x:.1f}" for k, x in (("time", t), ("memory", m)) if x == x]  # one n: none
                        label = f"{impl} {pattern}" + (": " + ", ".join(fits) if fits else "")
                        fitted |= bool(fits)
                        if line.stop:
                            label += f"; stops: {line.stop[1]} at {_fmt_n(line.stop[0])}"
                        handles[(impl, pattern)] = Line2D([], [], label=label, **style)
            if xs:
                _log_axes(ax, xs, unit)
                _slopes(ax, np.array(xs), np.array(ys))
            else:
                ax.text(0.5, 0.5, f"no {'time' if what == 'time' else 'memory'} measurement", ha="center",
                        transform=ax.transAxes, color="#777777")  # fmt: skip
            ax.set_title(f"{device}: {'time' if what == 'time' else 'peak memory'}", fontsize=9)
    stop = Line2D([], [], ls="none", marker="X", ms=8, color="#555555", mec="white", label="last ok point of a line")
    height = fig.get_figheight()
    title_ = "implementation pattern" + (": fitted exponents n^x (over the larger half of each line's n)" if fitted
                                         else "")  # fmt: skip
    fig.legend(handles=[*handles.values(), stop], loc="upper center", ncol=2, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, (bottom_in - 0.15) / height), title=title_)  # fmt: skip
    notes = [_explain_patterns(drawn)] + (["no ok point: " + "; ".join(dropped)] if dropped else [])
    if banded:
        notes.append(_INTERVAL_NOTE.format(_repeats_text(sub)))
    fig.text(0.01, 0.008, "\n".join(n for n in notes if n), fontsize=7.5, color="#555555", va="bottom")
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.62 / height, bottom=(bottom_in + 0.5) / height, wspace=0.22,
                        hspace=0.35)  # fmt: skip
    return fig


def _groups(df: pd.DataFrame, keys: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    if not keys:
        return [({}, df)]
    return [(dict(zip(keys, k if isinstance(k, tuple) else (k,))), g) for k, g in df.groupby(keys, sort=True)]


def _slug(key: dict) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(v)).strip("-") for v in key.values())


def _shape(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    parts = [f"{k} {int(r[k])}" for k in SHAPE_KEYS if r[k] == r[k]]
    return ", ".join([str(r[k]) for k in ("dtype", "mode") if r[k]] + parts)


def scaling_figures(df: pd.DataFrame, *, per_pattern: bool | None = None, dpi: int = 110) -> list[tuple[str, Figure]]:
    """(slug, figure) of every scaling figure of ``df``: one per dtype, mode and shape
    (and pattern, when asked or when a figure would hold too many)."""
    df = df.drop_duplicates(subset=[*LINE_KEYS, "dtype", "mode", *SHAPE_KEYS, "seq_len"], keep="last")
    keys = [k for k in ("dtype", "mode", *SHAPE_KEYS) if df[k].nunique() > 1]
    if per_pattern is None:
        per_pattern = df["pattern"].nunique() > MAX_PATTERNS_PER_FIGURE
    keys += ["pattern"] if per_pattern else []
    return [(_slug(key), _scaling_figure(sub, _shape(sub), dpi)) for key, sub in _groups(df, keys)]


def ratio_figure(df: pd.DataFrame, baseline: str, *, dpi: int = 110) -> Figure:
    """Speed-up and memory ratio over ``baseline`` against n, only where both were measured."""
    table = ratio_table(df, baseline)
    patterns = _pattern_order(df["pattern"])
    fig = Figure(figsize=(11, 4.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, column, label in ((axes[0], "speedup", f"speed-up over {baseline}"),
                              (axes[1], "mem_ratio", f"{baseline}'s memory / memory")):  # fmt: skip
        for (impl, pattern, _dev), part in table.groupby(["impl", "pattern", "device_name"], sort=False):
            ls, marker, filled = STYLES[patterns.index(pattern) % len(STYLES)]
            color = impl_color(impl, table["impl"])
            part = part.sort_values("seq_len")
            ax.plot(part["seq_len"], part[column], ls=ls, marker=marker, color=color, mfc=color if filled else "white",
                    label=f"{impl} {pattern}")  # fmt: skip
            if column == "speedup":
                ax.fill_between(part["seq_len"], part["speedup_low"], part["speedup_high"], color=color, alpha=0.18,
                                lw=0)  # fmt: skip
        if not table.empty:
            _log_axes(ax, table["seq_len"], label)
            ax.axhline(1.0, color="#444444", lw=0.8)
        stop = _Line(df[(df["impl"] == baseline) & (df["pattern"] == patterns[0])]).stop
        if stop:
            ax.set_title(f"{baseline} stops at {_fmt_n(stop[0])}: {stop[1]}", fontsize=8.5)
    axes[1].legend(fontsize=7.5, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Against {baseline} ({_shape(df)}); {_explain_patterns(table['pattern'])}", fontsize=8.5)
    fig.text(0.01, 0.01, _INTERVAL_NOTE.format(_repeats_text(df)), fontsize=7.5, color="#555555", va="bottom")
    fig.subplots_adjust(left=0.07, right=0.78, wspace=0.3, top=0.85, bottom=0.18)
    return fig


_INTERVAL_NOTE = "bands and bars: 95% intervals ({})"


def _repeats_text(df: pd.DataFrame) -> str:
    """How the ok rows' intervals were obtained: repeats, or the calls of one process."""
    reps = sorted({int(x) for x in pd.to_numeric(df.loc[df["status"] == "ok", "repeats"], errors="coerce").dropna()})
    many = [r for r in reps if r > 1]
    return ("from " + "/".join(map(str, many)) + " fresh processes a point" if many else "") + (
        ("; " if many else "") + "from the calls of one process where measured once" if 1 in reps or not reps else ""
    )


def _sparse_label(v: float, _pos: int) -> str:
    """A log axis' minor tick label only at 2, 3 and 5 times a power of ten."""
    mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
    return f"{v:g}" if mantissa in (2, 3, 5) else ""


def model_figure(df: pd.DataFrame, *, dpi: int = 110) -> Figure | None:
    """For each mode, at the largest n where the model's baseline (hf_longformer, or
    sdpa) was measured both alone and inside the model, each implementation's speed-up
    over it for the attention call alone (plain) and for the whole model (hatched): how
    much of the kernel's gain reaches the model. A note under each panel names the
    implementations without a bar and why. None unless ``df`` (a loaded table) has ok
    rows both inside a model and alone."""
    df = df.assign(where=np.where(df["model"].astype(str) != "", "model", "attention"))
    ok = df[df["status"] == "ok"]
    if set(ok["where"]) != {"attention", "model"}:
        return None
    model = next(m for m in df["model"] if m)
    baseline = baseline_of(model)
    modes = [m for m in MODES if m in set(df["mode"])]
    fig = Figure(figsize=(6.2 * len(modes), 4.8), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        sub = df[df["mode"] == mode]
        # the baseline's newest row at each (where, n), as every other bar takes its newest (r.iloc[-1]):
        # a row measured again (with other library versions) replaces the earlier one here too
        newest = {(r["where"], r["seq_len"]): r for r in sub[sub["impl"] == baseline].to_dict("records")}
        base = {k: r for k, r in newest.items() if r["status"] == "ok"}
        both = [n for n in sorted(set(sub["seq_len"])) if ("attention", n) in base and ("model", n) in base]
        if not both:
            ax.text(0.5, 0.5, f"{mode}: no n where {baseline} was measured\nboth alone and inside the model",
                    ha="center", va="center", transform=ax.transAxes, color="#777777")  # fmt: skip
            ax.set_axis_off()
            continue
        n = both[-1]
        impls = [i for i in impl_order(sub["impl"]) if i != baseline]
        missing = []
        for x, impl in enumerate(impls):
            why = {}
            for dx, where, hatch in ((-0.2, "attention", ""), (0.2, "model", "//")):
                r = sub[(sub["impl"] == impl) & (sub["where"] == where) & (sub["seq_len"] == n)]
                if r.empty or r.iloc[-1]["status"] != "ok":
                    why[where] = _row_reason(r.iloc[-1]) if len(r) else "not measured"
                    continue
                speedup, low, high = ratio_interval(base[(where, n)], r.iloc[-1].to_dict())
                ax.bar(x + dx, speedup, 0.38, color=impl_color(impl), hatch=hatch, edgecolor="white")
                if high == high:  # the 95% interval (NaN: none)
                    ax.errorbar(x + dx, speedup, yerr=[[speedup - low], [high - speedup]], fmt="none", ecolor="#333333",
                                elinewidth=0.8, capsize=2)  # fmt: skip
                top = high if high == high else speedup
                ax.text(x + dx + 0.02, top, f"{speedup:.2g}", ha="center", va="bottom", fontsize=7)
            if len(set(why.values())) == 1 and len(why) == 2:  # no bar at all, for one reason
                missing.append(f"{impl}: {why['attention']}")
            elif why:
                missing.append(f"{impl} ({', '.join(f'{w}: {r}' for w, r in why.items())})")
        ax.axhline(1.0, color="#444444", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_sparse_label))  # 0.2, 0.3, 0.5, 2, 3, 5: no crowding near 1
        ax.set_xticks(range(len(impls)), impls, rotation=20)
        ax.set_ylabel(f"speed-up over {baseline} (log)")
        ax.set_title(f"{mode}, n = {n}: attention alone (plain) and whole model (hatched)", fontsize=9)
        if missing:
            note = textwrap.fill("no bar: " + "; ".join(missing), 80)
            ax.text(0.0, -0.22, note, transform=ax.transAxes, va="top", fontsize=7, color="#555555")
    r = df.iloc[0]
    fig.suptitle(f"{model}; {r['device_name']}, {r['dtype']}; {_INTERVAL_NOTE.format(_repeats_text(df))}", fontsize=9)
    fig.tight_layout()
    return fig


#: colours of the breakdown's categories
_CATEGORY_COLORS = dict(zip(CATEGORIES, ("#9a9a9a", "#CC79A7", "#0072B2", "#E69F00", "#009E73", "#56B4E9", "#D9D9D9")))
assert len(_CATEGORY_COLORS) == len(CATEGORIES)


def breakdown_figure(table: pd.DataFrame, title: str, *, dpi: int = 110) -> Figure:
    """A bar per implementation (and pattern) of where its time goes, as shares of its
    profiled call stacked to 100% and labelled with the call's time, and its peak memory
    beside it; ``table`` is :func:`attnbench.profile.breakdown`'s."""
    keys = table[["impl", "pattern"]].drop_duplicates()
    order = impl_order(keys["impl"])
    keys = sorted(map(tuple, keys.to_numpy()), key=lambda k: (order.index(k[0]), len(k[1]), k[1]), reverse=True)
    fig = Figure(figsize=(11, 0.45 * len(keys) + 1.8), dpi=dpi)
    FigureCanvasAgg(fig)
    ax, mem_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    for y, (impl, pattern) in enumerate(keys):
        sub = table[(table["impl"] == impl) & (table["pattern"] == pattern)].set_index("category")
        left = 0.0
        for cat, color in _CATEGORY_COLORS.items():
            share = float(sub["percent"].get(cat, 0.0))
            ax.barh(y, share, left=left, color=color, label=cat if y == 0 else None, edgecolor="white", lw=0.4)
            if share >= 8:
                ax.text(left + share / 2, y, f"{share:.0f}", ha="center", va="center", fontsize=7, color="white")
            left += share
        ax.text(101, y, f"{sub['ms'].sum():.0f} ms", va="center", fontsize=8)
        peak = pd.to_numeric(sub["peak_mem_bytes"], errors="coerce").iloc[0] if len(sub) else float("nan")
        mem_ax.barh(y, peak / 2**20, color="#555555")
        if peak == peak:
            mem_ax.text(peak / 2**20, y, f" {peak / 2**20:.0f}", va="center", fontsize=8)
    ax.set_yticks(range(len(keys)), [f"{i}  {p}" for i, p in keys])
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("share of the profiled call's time (%), by category; its total on the right")
    mem_ax.set_xscale("log")
    mem_ax.set_xlabel("peak memory (MiB, log)")
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.2 / max(len(keys), 1)), ncol=4, fontsize=8, frameon=False
    )
    ax.grid(True, axis="x", color="#e6e6e6")
    mem_ax.grid(True, axis="x", color="#e6e6e6")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_scaling(df: pd.DataFrame, out: str | Path, *, per_pattern: bool | None = None, dpi: int = 110) -> list[Path]:
    """Write the scaling figures: ``out``, or ``<stem>-<slug>.png`` when there are several."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = scaling_figures(df, per_pattern=per_pattern, dpi=dpi)
    paths = []
    for slug, fig in figures:
        path = out if len(figures) == 1 else out.with_name(f"{out.stem}-{slug}{out.suffix or '.png'}")
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_ratios(df: pd.DataFrame, baseline: str, out: str | Path, *, dpi: int = 110) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ratio_figure(df, baseline, dpi=dpi).savefig(out)
    return out


def write_model_figure(df: pd.DataFrame, table: Path, *, dpi: int = 110) -> list[Path]:
    """``<study>.png`` beside the table: :func:`model_figure`."""
    fig = model_figure(df, dpi=dpi)
    if fig is None:
        raise ResultsError(f"{table}: no ok rows both inside a model and alone (measure with model_layers=0 and L)")
    path = Path(table).with_suffix(".png")
    fig.savefig(path)
    return [path]


def write_breakdown(df: pd.DataFrame, table: Path, *, dpi: int = 110) -> list[Path]:
    """``<study>-breakdown.csv`` (:func:`attnbench.profile.breakdown`) and ``.png``
    (:func:`breakdown_figure`) beside the table, from its profiled rows."""
    table = Path(table)
    rows = [r for r in df.to_dict("records") if r.get("profile")]
    parts = breakdown(rows)
    if parts.empty:
        raise ResultsError(f"{table}: no profiled rows (measure with profile=true)")
    csv_path = table.with_name(f"{table.stem}-breakdown.csv")
    parts["peak_mem_bytes"] = pd.to_numeric(parts["peak_mem_bytes"]).round().astype("Int64")  # bytes, not 7.549e+08
    parts.to_csv(csv_path, index=False, float_format="%.4g")
    r = rows[0]
    title = f"Where the time goes: {r['device_name']}, {r['dtype']}, n = {r['seq_len']}, {r['mode']}"
    png = table.with_name(f"{table.stem}-breakdown.png")
    breakdown_figure(parts, title, dpi=dpi).savefig(png)
    return [csv_path, png]


def _write_scaling(df: pd.DataFrame, table: Path, *, dpi: int = 110) -> list[Path]:
    """``<study>.png`` beside the table (several: ``<study>-<slug>.png``): :func:`plot_scaling`."""
    return plot_scaling(df, Path(table).with_suffix(".png"), dpi=dpi)


#: the figures a run draws by name (the ``figure`` setting): ``writer(loaded table, its path) -> files``
FIGURE_WRITERS: dict[str, Callable[..., list[Path]]] = {
    "scaling": _write_scaling,
    "model": write_model_figure,
    "breakdown": write_breakdown,
}
assert set(FIGURE_WRITERS) | {"auto", "none"} == set(FIGURES)


def auto_figure(df: pd.DataFrame) -> str:
    """The figure ``figure=auto`` draws for a loaded table: ``model`` when it has rows
    inside a model, ``breakdown`` when it has profiled rows of several implementations,
    else ``none``."""
    if (df["model"].astype(str) != "").any():
        return "model"
    if df.loc[df["profile"].astype(str) != "", "impl"].nunique() > 1:
        return "breakdown"
    return "none"


def write_figure(name: str, table: str | Path, *, dpi: int = 110) -> list[Path]:
    """Draw the figure ``name`` (one of :data:`attnbench.config.FIGURES`) of the table at
    ``table`` beside it; the files written ([] for ``none``). Raises
    :class:`ResultsError` when the table cannot give that figure."""
    if setting_error("figure", name):
        raise ValueError(setting_error("figure", name))
    if name == "none":
        return []
    df = load(table)
    name = auto_figure(df) if name == "auto" else name
    return [] if name == "none" else FIGURE_WRITERS[name](df, Path(table), dpi=dpi)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnbench.plot", description="Figures from results tables: time and "
                                 "peak memory against sequence length (and ratios against a baseline), or a study's "
                                 "other figure (--figure).")  # fmt: skip
    ap.add_argument("results", nargs="+", type=Path, help="results CSV file(s) the benchmark wrote")
    ap.add_argument("--figure", default="scaling", choices=list(FIGURE_WRITERS),
                    help="which figure: scaling (the default, with the options below), or model or breakdown, each "
                         "drawn beside its table as the study's run draws it")  # fmt: skip
    ap.add_argument("--out", type=Path, help="figure path (default: beside the first table, .png)")
    ap.add_argument("--baseline", help="also draw ratios against this implementation (<out>-vs-<baseline>.png)")
    for opt in ("pattern", "mode", "dtype", "impl"):
        ap.add_argument(f"--{opt}", action="append", help=f"keep only this {opt} (repeatable)")
    ap.add_argument("--device", help="keep only this device (cpu, cuda, or part of the GPU's name)")
    ap.add_argument("--per-pattern", action="store_true", help="one figure per attention pattern")
    ap.add_argument("--dpi", type=int, default=110)
    a = ap.parse_args(argv)
    out = a.out or a.results[0].with_suffix(".png")

    def draw() -> list[Path]:
        if a.figure != "scaling":
            return [p for table in a.results for p in write_figure(a.figure, table, dpi=a.dpi)]
        df = filter_results(load(a.results), patterns=a.pattern, modes=a.mode, dtypes=a.dtype, impls=a.impl,
                            device=a.device)  # fmt: skip
        if a.baseline:
            ratio_table(df, a.baseline)  # an unknown baseline fails before anything is drawn
        paths = plot_scaling(df, out, per_pattern=a.per_pattern or None, dpi=a.dpi)
        if a.baseline:
            print(ratio_text(ratio_table(df, a.baseline), a.baseline))
            paths.append(plot_ratios(df, a.baseline, out.with_name(f"{out.stem}-vs-{a.baseline}.png"), dpi=a.dpi))
        return paths

    return report_written("attnbench.plot", draw)


if __name__ == "__main__":
    raise SystemExit(main())
