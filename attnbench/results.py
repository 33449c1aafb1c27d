"""Result rows: the columns, the row of a configuration, the identity of a measurement,
and the console table. Their files (tables, row files, merge, resume) are
:mod:`attnbench.tables`.

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
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from .config import MODELS, BenchConfig

__all__ = [
    "COLUMNS",
    "STATUSES",
    "IDENTITY",
    "ADDED",
    "base_row",
    "window_value",
    "identity",
    "normalise",
    "positions_text",
    "format_rows",
]

STATUSES = ("ok", "wrong", "oom", "skipped", "error")

COLUMNS = [
    "study", "impl", "model", "pattern", "window", "window_left", "window_right", "dilation", "causal",
    "global_tokens", "global_positions", "batch", "heads", "kv_heads", "seq_len", "head_dim", "dtype", "device",
    "device_name", "mode",
    "status", "reason",
    "time_ms_median", "time_ms_iqr", "time_ms_min", "first_call_ms", "setup_ms", "n_timed", "timer",
    "peak_mem_bytes", "mem_estimate_bytes", "flops", "tflops",
    "verified", "max_abs_err", "mean_abs_err", "tol", "grad_max_abs_err",
    "tunables", "profile",
    "threads", "torch_version", "triton_version", "cupy_version", "git_commit", "host", "timestamp",
]  # fmt: skip

#: what makes two rows the same measurement: the configuration, the kind of device and
#: the library versions (not the host, not the time)
IDENTITY = (
    "study", "impl", "model", "pattern", "window", "dilation", "causal", "global_positions", "batch", "heads",
    "kv_heads", "seq_len", "head_dim", "dtype", "device", "device_name", "mode", "threads",
    "torch_version", "triton_version", "cupy_version",
)  # fmt: skip
#: identity columns a table written before they existed may lack, and what they were then
#: (a function of the row's other normalised values)
ADDED = {"kv_heads": lambda v: v["heads"]}
_INT_COLUMNS = {"window_left", "window_right", "batch", "heads", "kv_heads", "seq_len", "head_dim", "threads"}


# ---------------------------------------------------------------------- environment
@lru_cache(maxsize=1)
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch_version": torch.__version__, "triton_version": "", "cupy_version": ""}
    for key, dists in (("triton_version", ("triton",)), ("cupy_version", ("cupy", "cupy-cuda12x", "cupy-cuda13x"))):
        for dist in dists:
            with contextlib.suppress(PackageNotFoundError):
                out[key] = version(dist)
                break
    return out


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


def base_row(c: BenchConfig) -> dict:
    """The row of a resolved configuration before anything is measured: what, where and
    the useful work (``4 * head_dim`` FLOPs per attended pair, from the pattern's exact
    pair count); every measured column empty."""
    p = c.pattern()
    d = p.dilation
    return {
        **dict.fromkeys(COLUMNS),
        "study": c.study,
        "impl": c.impl,
        "pattern": p.describe(),
        "window": window_value(p.window),
        "window_left": p.left,
        "window_right": p.right,
        "dilation": "/".join(map(str, d)) if isinstance(d, tuple) else str(d),
        "causal": p.causal,
        "global_tokens": len(p.global_tokens),
        "global_positions": positions_text(p.global_tokens),
        "batch": c.batch,
        "heads": c.heads,
        "kv_heads": c.heads if c.kv_heads is None else c.kv_heads,
        "seq_len": c.seq_len,
        "head_dim": c.head_dim,
        "dtype": c.dtype,
        "device": c.device,
        "device_name": device_name(c.device),
        "mode": c.mode,
        "model": f"{MODELS[c.model]}, {c.model_layers} layers" if c.model_layers else "",
        # useful attention work; none for a whole model, whose work is mostly elsewhere
        "flops": None
        if c.model_layers
        else 4.0 * c.head_dim * p.pairs(c.seq_len, c.heads) * c.batch * MODE_WORK[c.mode],  # query heads' pairs
        "status": "",
        "reason": "",
        "threads": torch.get_num_threads() if c.threads is None else c.threads,
        **_versions(),
        "git_commit": _git_commit(),
        "host": socket.gethostname(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def normalise(col: str, v: object) -> object:
    """A column's value as identity compares it: ints as ints, causal as a bool, the rest as text."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = ""
    if col in _INT_COLUMNS:
        s = str(v).strip()
        return int(float(s)) if s else None
    if col == "window":  # an int, or [left,right]
        s = "".join(str(v).split())
        try:
            return str(int(float(s)))
        except ValueError:
            return s
    if col == "causal":
        return str(v).strip().lower() in ("true", "1")
    return str(v).strip()


def identity(row: Mapping) -> tuple:
    """The identity of a measurement (:data:`IDENTITY`), normalised so that a row read
    back from a CSV file equals the row as measured; a column a table lacks because it
    predates it (:data:`ADDED`) has the value it had then."""
    v = {c: normalise(c, row.get(c)) for c in IDENTITY}
    for col, then in ADDED.items():
        if v[col] in (None, ""):
            v[col] = then(v)
    return tuple(v[c] for c in IDENTITY)


# ---------------------------------------------------------------------- console
def _human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024:
            return f"{int(b)} B" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def format_rows(rows: Sequence[Mapping]) -> str:
    """A readable table of result rows, with the verification of each."""

    def num(v: object) -> float | None:
        try:
            x = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return None if math.isnan(x) else x

    heads = ["impl", "pattern", "n", "dtype", "mode", "status", "verified", "max err", "median ms", "peak mem"]
    heads.append("TFLOP/s")
    cells = []
    for r in rows:
        t, m, f, e = (num(r.get(k)) for k in ("time_ms_median", "peak_mem_bytes", "tflops", "max_abs_err"))
        cells.append(
            [
                str(r.get("impl", "")) + (" in the model" if r.get("model") else ""),
                str(r.get("pattern", "")),
                str(r.get("seq_len", "")),
                str(r.get("dtype", "")),
                str(r.get("mode", "")),
                str(r.get("status", "")),
                str(r.get("verified") or ""),
                "" if e is None else f"{e:.1e}",
                "" if t is None else f"{t:.3f}",
                "" if m is None else _human_bytes(m),
                "" if f is None else f"{f:.4f}",
            ]
        )
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    for r, line in zip(rows, cells):
        out.append("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
        if r.get("status") != "ok" and r.get("reason"):
            out.append("    -> " + str(r["reason"])[:200])
    return "\n".join(out)
