"""Result rows: the column schema, the row of a configuration, the identity of a
measurement, and the console table. Their files (tables, row files, merge, resume) are
:mod:`attnbench.tables`.

:data:`SCHEMA` is the one home of a column: its name, type, where its value comes from
(the configuration, the machine, or the measurement), whether it is part of a
measurement's identity, the value a table written before it existed had, and how the
terminal table shows it. The CSV header, the identity, resume, merge, a plan's entries,
the loader's types and the terminal table all derive from it: a new column is one
:class:`Column` here.

Two rows are *the same measurement* when their :func:`identity` is equal: the same
configuration, measured on the same kind of device with the same library versions.
Where it ran (``host``) and when (``timestamp``) are recorded but are not part of the
identity: an identical GPU with identical libraries measures the same thing, and a
re-run supersedes it (:func:`attnbench.tables.latest`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import torch

from .config import MODELS, BenchConfig

__all__ = [
    "Column",
    "SCHEMA",
    "STATUSES",
    "REASON_KINDS",
    "columns",
    "identity_columns",
    "plan_columns",
    "machine_columns",
    "column",
    "number",
    "base_row",
    "unmeasured",
    "window_value",
    "identity",
    "normalise",
    "positions_text",
    "format_rows",
]

STATUSES = ("ok", "wrong", "oom", "skipped", "error")
#: why a row has no measurement, as data (``reason`` says it in words): the case is not
#: supported, a dependency is missing, the memory or time guard stopped it, Triton's
#: interpreter would take too long, it ran out of memory, failed verification, or raised
REASON_KINDS = ("unsupported", "unavailable", "memory", "time", "interpreter", "oom", "wrong", "error")


@dataclass(frozen=True)
class Column:
    """One column of a result row.

    Attributes:
        name: the CSV header.
        kind: ``text``, ``int``, ``float``, ``bool``, or ``window`` (an int or ``[l,r]``);
            how identity compares it and how :func:`attnbench.tables.load` types it.
        source: ``config`` (a function of the configuration, known before anything runs),
            ``env`` (the machine and its libraries) or ``measured``.
        of: the value from the configuration, ``of(config, pattern)``; for ``config`` and
            ``env`` columns.
        identity: part of what makes two rows the same measurement.
        then: the value in a table written before the column existed, a constant or a
            function of the row (its other columns, e.g. ``kv_heads`` was ``heads``).
        show: the terminal table's header for it (None: not shown there).
        fmt: how the terminal table writes a value, ``fmt(value, row) -> str``.
        label: how figures name it on an axis.
    """

    name: str
    kind: str = "text"
    source: str = "measured"
    of: Callable[[BenchConfig, object], object] | None = None
    identity: bool = False
    then: object = ""
    show: str | None = None
    fmt: Callable[[object, Mapping], str] | None = None
    label: str = ""


def number(v: object) -> float | None:
    """A cell as a float; None when it is empty, not a number, or NaN."""
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _fixed(spec: str) -> Callable[[object, Mapping], str]:
    def fmt(v: object, row: Mapping) -> str:
        x = number(v)
        return "" if x is None else format(x, spec)

    return fmt


def _bytes_fmt(v: object, row: Mapping) -> str:
    x = number(v)
    return "" if x is None else _human_bytes(x)


def _interval_fmt(v: object, row: Mapping) -> str:
    lo, hi = number(v), number(row.get("time_ms_ci_high"))
    return "" if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"


def _impl_fmt(v: object, row: Mapping) -> str:
    return f"{v}" + (" in the model" if row.get("model") else "")


def _config(name: str, kind: str = "text", *, identity: bool = True, **kw) -> Column:
    """A column whose value is the configuration field of the same name."""
    return Column(name, kind, "config", kw.pop("of", lambda c, p: getattr(c, name)), identity, **kw)


def _env(name: str, of: Callable, kind: str = "text", *, identity: bool = True, **kw) -> Column:
    return Column(name, kind, "env", lambda c, p: of(c), identity, **kw)


def _measured(name: str, kind: str = "float", **kw) -> Column:
    return Column(name, kind, "measured", **kw)


# ---------------------------------------------------------------------- environment
#: the libraries whose version can change a row, and the distributions that provide them
LIBRARIES = {
    "torch_version": ("torch",),
    "triton_version": ("triton",),
    "cupy_version": ("cupy", "cupy-cuda12x", "cupy-cuda13x"),
    "transformers_version": ("transformers",),
    "flash_attn_version": ("flash-attn", "flash_attn"),
    "natten_version": ("natten",),
}


@cache
def library_version(column: str) -> str:
    """The installed version of a library of :data:`LIBRARIES` ("" when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    if column == "torch_version":
        return torch.__version__
    for dist in LIBRARIES[column]:
        with contextlib.suppress(PackageNotFoundError):
            return version(dist)
    return ""


@lru_cache(maxsize=1)
def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() if r.returncode == 0 else ""
    except Exception:
        return ""


@lru_cache(maxsize=4)
def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and core count."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def positions_text(tokens: Sequence[int]) -> str:
    """Global positions, exactly, with runs as ranges: ``0-63 100``."""
    out, run = [], []
    for t in tokens:
        if run and t == run[-1] + 1:
            run.append(t)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [t]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return " ".join(out)


#: work of each mode in forward passes (backward = 2.5x forward, as FlashAttention counts)
MODE_WORK = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def window_value(window: int | tuple[int, int]) -> int | str:
    """The ``window`` column: an int window as itself, ``(left, right)`` as ``[left,right]``
    (the override that measures it again)."""
    return f"[{window[0]},{window[1]}]" if isinstance(window, tuple) else window


def _flops(c: BenchConfig, p) -> float | None:
    """Useful attention work: ``4 * head_dim`` FLOPs per attended (query, key) pair of
    the query heads, from the pattern's exact pair count; none for a whole model, whose
    work is mostly elsewhere, or before the length is known."""
    if c.model_layers or c.seq_len is None:
        return None
    return 4.0 * c.head_dim * p.pairs(c.seq_len, c.heads) * c.batch * MODE_WORK[c.mode]


def _l2_cache(device: str, flush: bool) -> str:
    """What the timed calls found in the L2 cache: ``flushed`` on CUDA with ``flush_l2``,
    else ``warm``; "" until the device is known."""
    return "" if device == "auto" else "flushed" if device == "cuda" and flush else "warm"


def _dilation(c: BenchConfig, p) -> str:
    d = p.dilation
    return "/".join(map(str, d)) if isinstance(d, tuple) else str(d)


# ---------------------------------------------------------------------- the schema
SCHEMA: list[Column] = [
    # what was run
    _config("study"),
    _config("impl", show="impl", fmt=_impl_fmt),
    _config("model", of=lambda c, p: f"{MODELS[c.model]}, {c.model_layers} layers" if c.model_layers else ""),
    _config("pattern", of=lambda c, p: p.describe(), show="pattern"),
    _config("window", "window", of=lambda c, p: window_value(p.window)),
    _config("window_left", "int", of=lambda c, p: p.left, identity=False),
    _config("window_right", "int", of=lambda c, p: p.right, identity=False),
    _config("dilation", of=_dilation),
    _config("causal", "bool", of=lambda c, p: p.causal),
    _config("global_tokens", "int", of=lambda c, p: len(p.global_tokens), identity=False),
    _config("global_positions", of=lambda c, p: positions_text(p.global_tokens)),
    _config("batch", "int"),
    _config("heads", "int"),
    _config("kv_heads", "int", of=lambda c, p: c.heads if c.kv_heads is None else c.kv_heads,
            then=lambda v: v["heads"]),
    _config("seq_len", "int", show="n", label="sequence length n"),
    _config("head_dim", "int"),
    _config("dtype", show="dtype"),
    _config("device"),
    _env("device_name", lambda c: device_name(c.device)),
    _config("mode", show="mode"),
    # CUDA times cold-L2 calls (do_bench flushes the cache) unless flush_l2=false; a CPU has no flush
    _config("l2_cache", of=lambda c, p: _l2_cache(c.device, c.flush_l2), then=lambda v: _l2_cache(v["device"], True)),
    # what happened
    _measured("status", "text", show="status"),
    _measured("reason_kind", "text"),
    _measured("reason", "text"),
    # time
    _measured("time_ms_median", show="median ms", fmt=_fixed(".3f"), label="median time per call (ms)"),
    # the 95% interval of the median (attnbench.stats): from the repeats, else from the calls
    _measured("time_ms_ci_low", show="95% CI ms", fmt=_interval_fmt),
    _measured("time_ms_ci_high"),
    _config("repeats", "int", identity=False, then=1, show="reps"),
    _measured("time_ms_repeats", "text"),  # each repeat's median, in the order they ran
    _measured("time_ms_iqr"),
    _measured("time_ms_min"),
    _measured("first_call_ms"),
    _measured("setup_ms"),
    _measured("n_timed", "int"),
    _measured("timer", "text"),
    # the noise meter: relative IQR of a fixed matrix product timed between the jobs
    _measured("noise", show="noise", fmt=lambda v, row: "" if number(v) is None else f"{number(v):.0%}"),
    # memory and work
    _measured("peak_mem_bytes", show="peak mem", fmt=_bytes_fmt, label="peak memory (MiB)"),
    _measured("mem_estimate_bytes"),
    Column("flops", "float", "config", _flops),
    _measured("tflops", show="TFLOP/s", fmt=_fixed(".4f")),
    # verification
    _measured("verified", "text", show="verified"),
    _measured("max_abs_err", show="max err", fmt=_fixed(".1e")),
    _measured("mean_abs_err"),
    _measured("tol"),
    _measured("grad_max_abs_err"),
    _measured("tunables", "text"),
    _measured("profile", "text"),
    # the environment
    _env("threads", lambda c: torch.get_num_threads() if c.threads is None else c.threads, "int"),
    *(_env(col, lambda c, col=col: library_version(col)) for col in LIBRARIES),
    _env("git_commit", lambda c: _git_commit(), identity=False),
    _env("host", lambda c: socket.gethostname(), identity=False),
    _env("timestamp", lambda c: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), identity=False),
]  # fmt: skip


def columns() -> list[str]:
    """Every column, in table order."""
    return [col.name for col in SCHEMA]


def column(name: str) -> Column:
    """The schema's column ``name`` (``KeyError`` if there is none)."""
    for col in SCHEMA:
        if col.name == name:
            return col
    raise KeyError(name)


def identity_columns() -> list[str]:
    """What makes two rows the same measurement: the configuration, the kind of device
    and the library versions (not the host, not the time)."""
    return [col.name for col in SCHEMA if col.identity]


def plan_columns() -> list[str]:
    """What a plan entry says of a configuration: its identity columns known before it runs."""
    return [col.name for col in SCHEMA if col.identity and col.source == "config"]


def machine_columns() -> list[str]:
    """The identity columns the machine and its libraries decide."""
    return [col.name for col in SCHEMA if col.identity and col.source == "env"]


def config_cells(c: BenchConfig, source: str = "config") -> dict:
    """The cells of the columns from ``source`` (``config`` or ``env``) for configuration ``c``."""
    p = c.pattern()
    return {col.name: col.of(c, p) for col in SCHEMA if col.source == source}


def base_row(c: BenchConfig) -> dict:
    """The row of a resolved configuration before anything is measured: what, where and
    the useful work; every measured column empty (``status`` and the reasons "")."""
    row = dict.fromkeys(columns())
    row.update(config_cells(c), **config_cells(c, "env"), status="", reason_kind="", reason="")
    return row


def unmeasured(c: BenchConfig, status: str, kind: str, reason: str) -> dict:
    """The one way to make a row that has no measurement: ``status`` (of
    :data:`STATUSES`), the kind of reason (:data:`REASON_KINDS`) and the reason in words."""
    if status not in STATUSES or status == "ok" or kind not in REASON_KINDS:
        raise ValueError(f"unmeasured({status!r}, {kind!r}): status one of {STATUSES[1:]}, kind one of {REASON_KINDS}")
    row = base_row(c)
    row.update(status=status, reason_kind=kind, reason=reason)
    return row


def normalise(col: str, v: object, kind: str | None = None) -> object:
    """A column's value as identity compares it, by its kind (``kind``, or the schema's):
    ints as ints, bools as bools, a window without spaces, the rest as text."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = ""
    if kind is None:
        kind = next((c.kind for c in SCHEMA if c.name == col), "text")
    if kind == "int":
        s = str(v).strip()
        return int(float(s)) if s else None
    if kind == "window":  # an int, or [left,right]
        s = "".join(str(v).split())
        try:
            return str(int(float(s)))
        except ValueError:
            return s
    if kind == "bool":
        return str(v).strip().lower() in ("true", "1")
    return str(v).strip()


def identity(row: Mapping) -> tuple:
    """The identity of a measurement (:func:`identity_columns`), normalised so that a row
    read back from a CSV file equals the row as measured; a column a table lacks because
    it predates it has the value it had then (:attr:`Column.then`)."""
    cols = [col for col in SCHEMA if col.identity]
    v = {col.name: normalise(col.name, row.get(col.name), col.kind) for col in cols}
    for col in cols:
        if v[col.name] in (None, "") and callable(col.then):
            v[col.name] = col.then(v)
    return tuple(v[col.name] for col in cols)


# ---------------------------------------------------------------------- console
def _human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024:
            return f"{int(b)} B" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def format_rows(rows: Sequence[Mapping]) -> str:
    """A readable table of result rows (the schema's columns with a ``show`` header), and
    under a row that is not ``ok`` its reason."""
    shown = [col for col in SCHEMA if col.show]
    heads = [col.show for col in shown]
    cells = [
        [
            (col.fmt(r.get(col.name), r) if col.fmt else "" if r.get(col.name) is None else str(r.get(col.name)))
            for col in shown
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    for r, line in zip(rows, cells):
        out.append("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
        if r.get("status") != "ok" and r.get("reason"):
            out.append("    -> " + str(r["reason"])[:200])
    return "\n".join(out)
