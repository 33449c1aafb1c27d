"""Figures of results tables: time and peak memory against sequence length (the
Longformer paper's Figure 1, on the machine at hand), and ratios against a baseline.

    python -m attnbench.plot results/scaling-cpu.csv --baseline naive

Tables are read by :func:`attnbench.tables.load` (typed, one row per measurement).
*Scaling* (:func:`scaling_figures`): median time and peak memory against n, log-log,
one line per implementation and pattern; colour is the implementation (the registry's
order), line style and a filled or hollow marker the pattern, so lines that coincide
stay visible. The legend gives each line's fitted exponents and, where it stops, why
(an ``X`` marks its last ``ok`` point). Faint lines show slopes n and n². One figure
per dtype, mode and shape; one row of panels per device; one figure per pattern with
more than :data:`MAX_PATTERNS_PER_FIGURE`.
*Ratios* (:func:`ratio_figure`): speed-up and memory ratio over a baseline, where both
were measured. Figures use matplotlib's Agg backend and never open a window.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .registry import list_impls
from .tables import ResultsError, load, report_written

__all__ = ["PALETTE", "MAX_PATTERNS_PER_FIGURE", "ResultsError", "load_results", "filter_results", "fit_exponent",
           "impl_color", "impl_order", "short_reason", "pivot_results", "ratio_table", "scaling_figures",
           "ratio_figure", "plot_scaling", "plot_ratios", "main"]  # fmt: skip

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


def short_reason(status: str, reason: str = "") -> str:
    """A few words for a row that is not ``ok``: OOM, skipped: memory budget, ..."""
    status, reason = str(status).lower(), str(reason).lower()
    if status == "oom":
        return "OOM"
    if status == "wrong":
        return "wrong result"
    if status == "error":
        return "error"
    if "unsupported" in reason:
        return "unsupported"
    if "unavailable" in reason:
        return "unavailable"
    for what in ("memory budget", "time budget"):
        if what in reason:
            return f"skipped: {what}"
    return status or "?"


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
    """What the pattern labels' parts mean, for the ones shown."""
    words = {w for p in patterns for w in p.split()}
    parts = []
    ints = sorted(int(w[1:]) for w in words if re.fullmatch(r"w\d+", w))
    if ints:
        w = ints[-1]
        parts.append(f"w{w} = window {w} ({w // 2} keys each side, or the {w} before when causal)")
    pairs = sorted(w for w in words if re.fullmatch(r"w\[\d+,\d+\]", w))
    if pairs:
        left, right = pairs[-1][2:-1].split(",")
        parts.append(f"{pairs[-1]} = {left} keys before each query, {right} after")
    if any(re.fullmatch(r"d[\d/]+", w) for w in words):
        parts.append("d2 = dilation 2 (per head: 1/2/...)")
    if "causal" in words:
        parts.append("causal = the window's keys to the left")
    if any(re.fullmatch(r"g\d+", w) for w in words):
        parts.append("g1 = 1 global token (attends to and is attended by every token)")
    return "; ".join(parts)


class _Line:
    """One implementation and pattern on one device: its ok points, and where it stops."""

    def __init__(self, rows: pd.DataFrame):
        rows = rows.sort_values("seq_len")
        ok = rows[rows["status"] == "ok"]
        self.n = ok["seq_len"].to_numpy()
        self.time = ok["time_ms_median"].to_numpy()
        self.mem = ok["peak_mem_bytes"].to_numpy()
        after = rows[(rows["status"] != "ok") & (rows["seq_len"] > (self.n.max() if len(self.n) else 0))]
        first = after.iloc[0] if len(after) else None
        self.stop = None if first is None else (int(first["seq_len"]), short_reason(first["status"], first["reason"]))


def _analyse(rows: pd.DataFrame) -> _Line:
    return _Line(rows)


def pivot_results(df: pd.DataFrame, column: str = "time_ms_median", scale: float = 1.0) -> pd.DataFrame:
    """Implementations x sequence lengths: ``column / scale`` where ok, else the reason."""
    cells = df.assign(cell=[r[column] / scale if r["status"] == "ok" else short_reason(r["status"], r["reason"])
                            for _, r in df.iterrows()])  # fmt: skip
    table = cells.pivot_table(index="impl", columns="seq_len", values="cell", aggfunc="last")
    return table.reindex(impl_order(table.index))


def ratio_table(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Speed-up (baseline time / time) and memory ratio (baseline memory / memory) of every
    other implementation, where both are ok, on the same device, dtype, mode, pattern, shape."""
    if baseline not in set(df["impl"]):
        raise ResultsError(f"baseline {baseline!r} is not in the table (impls: {', '.join(impl_order(df['impl']))})")
    keys = ["device_name", "dtype", "mode", "pattern", *SHAPE_KEYS, "seq_len"]
    ok = df[df["status"] == "ok"]
    base = ok[ok["impl"] == baseline][[*keys, "time_ms_median", "peak_mem_bytes"]]
    both = ok[ok["impl"] != baseline].merge(base, on=keys, suffixes=("", "_base"))
    both["speedup"] = both["time_ms_median_base"] / both["time_ms_median"]
    both["mem_ratio"] = both["peak_mem_bytes_base"] / both["peak_mem_bytes"]
    return both[["impl", *keys, "speedup", "mem_ratio"]].reset_index(drop=True)


# ---------------------------------------------------------------------- drawing
def _log_axes(ax, ns: Sequence[float], ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(set(int(n) for n in ns))
    ax.set_xticks(ticks, [_fmt_n(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length n")
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
    handles, dropped = {}, []
    for row, device in zip(axes, devices):
        for col, (ax, what, scale, unit) in enumerate(((row[0], "time", 1.0, "median time per call (ms)"),
                                                       (row[1], "mem", 2**20, "peak memory (MiB)"))):  # fmt: skip
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
                    if line.stop:
                        ax.plot(line.n[good][-1], vals[good][-1], marker="X", ms=9, color=color, mec="white", zorder=4)
                    xs += list(line.n[good])
                    ys += list(vals[good])
                    if col == 0 and (impl, pattern) not in handles:
                        t, m = _fit_larger_half(line.n, line.time), _fit_larger_half(line.n, line.mem)
                        label = f"{impl} {pattern}: time n^{t:.1f}" + (f", memory n^{m:.1f}" if m == m else "")
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
    title_ = "implementation pattern: fitted exponents n^x (over the larger half of each line's n)"
    fig.legend(handles=[*handles.values(), stop], loc="upper center", ncol=2, fontsize=7.5, frameon=False,
               bbox_to_anchor=(0.5, (bottom_in - 0.15) / height), title=title_)  # fmt: skip
    notes = [_explain_patterns(patterns)] + (["no ok point: " + "; ".join(dropped)] if dropped else [])
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
        if not table.empty:
            _log_axes(ax, table["seq_len"], label)
            ax.axhline(1.0, color="#444444", lw=0.8)
        stop = _Line(df[(df["impl"] == baseline) & (df["pattern"] == patterns[0])]).stop
        if stop:
            ax.set_title(f"{baseline} stops at {_fmt_n(stop[0])}: {stop[1]}", fontsize=8.5)
    axes[1].legend(fontsize=7.5, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Against {baseline} ({_shape(df)}); {_explain_patterns(patterns)}", fontsize=8.5)
    fig.subplots_adjust(left=0.07, right=0.78, wspace=0.3, top=0.85, bottom=0.14)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnbench.plot", description="Time and peak memory against sequence "
                                 "length from results tables, and ratios against a baseline.")  # fmt: skip
    ap.add_argument("results", nargs="+", type=Path, help="results CSV file(s) the benchmark wrote")
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
        df = filter_results(load(a.results), patterns=a.pattern, modes=a.mode, dtypes=a.dtype, impls=a.impl,
                            device=a.device)  # fmt: skip
        if a.baseline:
            ratio_table(df, a.baseline)  # an unknown baseline fails before anything is drawn
        paths = plot_scaling(df, out, per_pattern=a.per_pattern or None, dpi=a.dpi)
        if a.baseline:
            paths.append(plot_ratios(df, a.baseline, out.with_name(f"{out.stem}-vs-{a.baseline}.png"), dpi=a.dpi))
        return paths

    return report_written("attnbench.plot", draw)


if __name__ == "__main__":
    raise SystemExit(main())
