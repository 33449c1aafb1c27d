"""Result rows and tables: the columns, the identity of a measurement, appending,
row files, merging and resume.

A table is a CSV file, ``<results_dir>/<study>.csv``, one row per measurement
(:data:`COLUMNS`), every row on one line. Two rows are *the same measurement* when
their :func:`identity` is equal: the same configuration, measured on the same kind of
device with the same library versions. Where it ran (``host``) and when
(``timestamp``) are recorded but are not part of the identity: an identical GPU with
identical libraries measures the same thing, and a re-run supersedes (``latest``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import fcntl
import hashlib
import io
import logging
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch

from .config import BenchConfig

log = logging.getLogger("attnbench")

__all__ = [
    "COLUMNS",
    "STATUSES",
    "IDENTITY",
    "base_row",
    "identity",
    "table_path",
    "rows_dir",
    "check_writable",
    "append_row",
    "read_table",
    "read_rows",
    "write_row_file",
    "row_file_paths",
    "read_row_files",
    "latest",
    "merge_into",
    "done",
    "format_rows",
]

STATUSES = ("ok", "wrong", "oom", "skipped", "error")

COLUMNS = [
    "study", "impl", "pattern", "window", "dilation", "causal", "global_tokens", "global_positions",
    "batch", "heads", "seq_len", "head_dim", "dtype", "device", "device_name", "mode",
    "status", "reason",
    "time_ms_median", "time_ms_iqr", "time_ms_min", "first_call_ms", "setup_ms", "n_timed",
    "peak_mem_bytes", "mem_estimate_bytes", "flops", "tflops",
    "verified", "max_abs_err", "mean_abs_err", "tol", "grad_max_abs_err",
    "tunables", "profile",
    "threads", "torch_version", "triton_version", "cupy_version", "git_commit", "host", "timestamp",
]  # fmt: skip

#: what makes two rows the same measurement: the configuration, the kind of device and
#: the library versions (not the host, not the time)
IDENTITY = (
    "study", "impl", "pattern", "window", "dilation", "causal", "global_positions", "batch", "heads", "seq_len",
    "head_dim", "dtype", "device", "device_name", "mode", "threads", "torch_version", "triton_version", "cupy_version",
)  # fmt: skip
_INT_COLUMNS = {"window", "batch", "heads", "seq_len", "head_dim", "threads"}
ROWS_SUFFIX = ".rows"


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
        "window": p.window,
        "dilation": "/".join(map(str, d)) if isinstance(d, tuple) else str(d),
        "causal": p.causal,
        "global_tokens": len(p.global_tokens),
        "global_positions": positions_text(p.global_tokens),
        "batch": c.batch,
        "heads": c.heads,
        "seq_len": c.seq_len,
        "head_dim": c.head_dim,
        "dtype": c.dtype,
        "device": c.device,
        "device_name": device_name(c.device),
        "mode": c.mode,
        "flops": 4.0 * c.head_dim * p.pairs(c.seq_len, c.heads) * c.batch * MODE_WORK[c.mode],
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
    if col == "causal":
        return str(v).strip().lower() in ("true", "1")
    return str(v).strip()


def identity(row: Mapping) -> tuple:
    """The identity of a measurement (:data:`IDENTITY`), normalised so that a row read
    back from a CSV file equals the row as measured."""
    return tuple(normalise(c, row.get(c)) for c in IDENTITY)


# ---------------------------------------------------------------------- where
def table_path(c: BenchConfig) -> Path:
    return Path(c.results_dir) / f"{c.study}.csv"


def rows_dir(c: BenchConfig) -> Path:
    """Where row files go: ``<results_dir>/<study>.rows/``."""
    return Path(c.results_dir) / f"{c.study}{ROWS_SUFFIX}"


def check_writable(path: Path) -> None:
    """Raise ``ValueError`` unless a row can be written to ``path`` (a table, or a file in
    a rows folder) and an existing table has our columns. Writes nothing that stays."""
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    why = ""
    if not probe.is_dir():
        why = f"{probe} is not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as e:
            why = f"cannot write in {probe}: {e.strerror or e}"
    if why:
        raise ValueError(f"results_dir={str(folder)!r}: {why}; choose a folder you can write to")
    if path.is_file() and path.stat().st_size:
        if not os.access(path, os.W_OK):
            raise ValueError(f"{path}: not writable; choose another results_dir= or study=")
        with open(path, newline="") as f:
            header = next(csv.reader([f.readline()]), [])
        missing = [k for k in IDENTITY if k not in header]
        if missing:  # newer columns are added when a row is appended; these say what was measured
            raise ValueError(
                f"{path}: not a results table of this attnbench (its header lacks {missing}); "
                "use another study= or move the file away"
            )


# ---------------------------------------------------------------------- writing
def _cell(v: object) -> object:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, str):
        return v.replace("\r", " ").replace("\n", " ")  # one row, one line
    return "" if v is None else v


def _line(row: Mapping, header: Sequence[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(k)) for k in header])
    return buf.getvalue().encode()


def _drop_cut_line(data: bytes, path: Path) -> int:
    """Length of ``data`` without a last line that lacks its newline (a writer that
    stopped mid-row); logs what is dropped."""
    if not data or data.endswith(b"\n"):
        return len(data)
    keep = data.rfind(b"\n") + 1
    cut = data[keep:].decode(errors="replace")
    log.warning("%s: its last line was cut off (a writer stopped mid-row); dropped %r", path, cut[:80])
    return keep


def append_row(path: str | Path, row: Mapping) -> None:
    """Append one row and flush it to disk at once. Safe with several writers on one
    machine (an exclusive lock around the header check and the append); a last line
    cut off by an earlier crash is dropped first, so the table stays readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            data = f.read()
            keep = _drop_cut_line(data, path)
            if keep < len(data):
                f.truncate(keep)
            header = next(csv.reader([data.split(b"\n", 1)[0].decode()])) if keep else []
            if not header or any(k not in header for k in COLUMNS):  # new, or written before a column existed
                old = _frame(data[:keep], path)
                header = COLUMNS + [k for k in old.columns if k not in COLUMNS]
                f.seek(0)
                f.truncate()
                f.write(_line(dict(zip(header, header)), header))
                f.write(b"".join(_line(r, header) for r in old.to_dict("records")))
            f.write(_line(row, header))
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_row_file(directory: str | Path, row: Mapping) -> Path:
    """Write one row as its own small CSV file, atomically (a hidden temporary name,
    flushed, then renamed): safe with concurrent writers on a shared (NFS) filesystem,
    where locks are not to be relied on. The name, ``<host>-<pid>-<hash>.csv``, is
    unique per writer and measurement."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9._-]", "_", str(row.get("host") or socket.gethostname()))
    digest = hashlib.sha1(repr(identity(row)).encode()).hexdigest()[:12]
    final = directory / f"{host}-{os.getpid()}-{digest}.csv"
    tmp = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(_line(dict(zip(COLUMNS, COLUMNS)), COLUMNS) + _line(row, COLUMNS))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return final


# ---------------------------------------------------------------------- reading
def _frame(data: bytes, path: Path) -> pd.DataFrame:
    data = data[: _drop_cut_line(data, path)]
    if not data.strip():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)


def read_table(path: str | Path) -> pd.DataFrame:
    """A table as text columns (empty cells are ``""``); a cut-off last line is left
    out. A missing file is an empty table."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return _frame(path.read_bytes(), path)


def read_rows(path: str | Path) -> list[dict]:
    """A table's rows as dicts of text."""
    return read_table(path).to_dict("records")


def row_file_paths(directory: str | Path) -> list[Path]:
    """The finished row files in ``directory`` (writers' temporary files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == ".csv" and not p.name.startswith("."))


def read_row_files(directory: str | Path) -> list[dict]:
    return [r for p in row_file_paths(directory) for r in read_rows(p)]


def latest(rows: pd.DataFrame | Iterable[Mapping]) -> pd.DataFrame:
    """One row per measurement (:func:`identity`): the newest by ``timestamp``, the later
    row on a tie; in time order."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if df.empty:
        return df
    stamps = df["timestamp"] if "timestamp" in df else pd.Series([""] * len(df), index=df.index)
    ts = pd.to_datetime(stamps, errors="coerce", utc=True, format="mixed")
    keys = df.apply(lambda r: identity(r), axis=1)
    ordered = df.assign(_ts=ts.to_numpy(), _key=keys.to_numpy(), _i=range(len(df)))
    ordered = ordered.sort_values(["_ts", "_i"], na_position="first", kind="stable")
    return ordered.drop_duplicates("_key", keep="last").drop(columns=["_ts", "_key", "_i"])


def merge_into(path: Path, incoming: Iterable[Mapping]) -> tuple[int, int]:
    """Merge rows into the table at ``path`` in place, keeping :func:`latest`, under the
    lock :func:`append_row` takes (a sweep appending meanwhile loses nothing). Returns
    (rows before, rows after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            before = _frame(f.read(), path)
            merged = latest(pd.concat([before, pd.DataFrame(list(incoming), dtype=object)], ignore_index=True))
            header = COLUMNS + [c for c in merged.columns if c not in COLUMNS]
            text = _line(dict(zip(header, header)), header)
            text += b"".join(_line(r, header) for r in merged.to_dict("records"))
            f.seek(0)
            f.truncate()
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return len(before), len(merged)


def done(c: BenchConfig) -> set[tuple]:
    """Identities already measured for ``c``'s study (in its table or its row files),
    for ``resume``. An ``error`` row is not done: it is tried again."""
    rows = read_rows(table_path(c)) + read_row_files(rows_dir(c))
    return {identity(r) for r in rows if r.get("status") != "error"}


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
                str(r.get("impl", "")),
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
