"""Result tables on disk: a study's table, its row files, appending, reading back,
merging and resume.

A table is a CSV file, ``<results_dir>/<study>.csv``, one row per measurement
(:data:`attnbench.results.SCHEMA`), every row on one line. A cluster sweep's jobs write
a file per row into ``<results_dir>/<study>.rows/`` instead, which
``python -m attnbench.merge`` merges into the table. :func:`load` reads tables for
figures and notebooks, typed, and says exactly what is wrong with a file that is not one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import logging
import math
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .config import BenchConfig
from .results import SCHEMA, columns, identity

log = logging.getLogger("attnbench")

__all__ = [
    "ROWS_SUFFIX",
    "ResultsError",
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
    "load",
    "report_written",
]

ROWS_SUFFIX = ".rows"


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
        missing = [k for k in REQUIRED if k not in header]  # columns added since are filled in on append
        if missing:
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
            if not header or any(k not in header for k in columns()):  # new, or written before a column existed
                old = upgrade(_frame(data[:keep], path))
                header = columns() + [k for k in old.columns if k not in columns()]
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
            names = columns()
            f.write(_line(dict(zip(names, names)), names) + _line(row, names))
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
        return pd.DataFrame(columns=columns())
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)


def upgrade(df: pd.DataFrame) -> pd.DataFrame:
    """A table written by an earlier attnbench, with the columns added since: each with
    the value it had then (:attr:`attnbench.results.Column.then`; "" for a measured one)."""
    df = df.copy()
    for col in SCHEMA:
        if col.name not in df.columns:
            df[col.name] = "" if callable(col.then) else col.then
    for col in SCHEMA:  # derived values last: they read the others
        if callable(col.then):
            blank = df[col.name].astype(str).str.strip() == ""
            if blank.any():
                filled = [str(col.then(r)) for r in df.loc[blank].to_dict("records")]
                df.loc[blank, col.name] = filled
    return df


def read_table(path: str | Path) -> pd.DataFrame:
    """A table as text columns (empty cells are ``""``); a cut-off last line is left
    out. A missing file is an empty table."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=columns())
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
            merged = upgrade(merged)
            header = columns() + [c for c in merged.columns if c not in columns()]
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


def done(c: BenchConfig) -> dict[tuple, dict]:
    """The measurements already in ``c``'s study (its table and its row files), for
    ``resume``: identity -> the row. An ``error`` row is not done: it is tried again."""
    rows = read_rows(table_path(c)) + read_row_files(rows_dir(c))
    return {identity(r): r for r in rows if r.get("status") != "error"}


# ---------------------------------------------------------------------- loading, for figures and notebooks
class ResultsError(ValueError):
    """A results table cannot be used: missing, empty, unparseable or incomplete."""


def report_written(prog: str, write: Callable[[], Iterable[Path]]) -> int:
    """The end of a command that draws from tables (``python -m attnbench.plot``,
    ``attnbench.profile``): runs ``write()`` and prints the files it wrote, one a line
    (exit status 0), or its :class:`ResultsError` in one line on stderr (status 2)."""
    try:
        paths = list(write())
    except ResultsError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print("\n".join(map(str, paths)))
    return 0


#: what every table must have to be drawn; the rest may be missing (older tables, other tools)
REQUIRED = ("impl", "seq_len", "status")


def _line_numbers(bad: pd.Series) -> str:
    lines = [int(i) + 2 for i in np.flatnonzero(bad.to_numpy())]  # the header is line 1
    return ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")


def _load_one(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ResultsError(f"{path}: no such file")
    if path.is_dir():
        raise ResultsError(f"{path}: is a directory, expected a results CSV file")
    raw = path.read_bytes()
    if not raw.strip():
        raise ResultsError(f"{path}: file is empty (expected a CSV with a header row)")
    if b"\x00" in raw:
        raise ResultsError(f"{path}: not a CSV text file (contains NUL bytes)")
    try:
        df = _frame(raw, path)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ResultsError(f"{path}: not a readable CSV file ({' '.join(str(e).split())})") from e
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        found = ", ".join(df.columns[:8]) + (", ..." if len(df.columns) > 8 else "")
        raise ResultsError(f"{path}: missing required column(s) {', '.join(missing)} (found: {found or 'none'}); "
                           "is this a results table?")  # fmt: skip
    if df.empty:
        raise ResultsError(f"{path}: has a header but no data rows")
    for col in ("impl", "status"):
        blank = df[col].str.strip() == ""
        if blank.any():
            raise ResultsError(f"{path}: empty {col!r} on line(s) {_line_numbers(blank)} (truncated or corrupted?)")
    n = pd.to_numeric(df["seq_len"], errors="coerce")
    bad = n.isna() | (n <= 0) | (n != n.round())
    if bad.any():
        examples = ", ".join(repr(v) for v in df.loc[bad, "seq_len"].head(3))
        raise ResultsError(f"{path}: seq_len is not a positive integer on line(s) {_line_numbers(bad)} "
                           f"(values {examples})")  # fmt: skip
    return df.assign(source=path.name)


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Results tables as one typed frame, by the schema's kinds: text as text ("" when
    missing), numbers as floats (NaN where empty), ``seq_len`` as ints, bools as bools;
    columns added since a table was written filled in (:func:`upgrade`), ``status``
    lower-cased, ``device_name`` falling back to ``device``; one row per measurement
    (:func:`latest`). Raises :class:`ResultsError` naming the file and what is wrong."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ResultsError("no results files given")
    df = upgrade(pd.concat([_load_one(p) for p in paths], ignore_index=True))
    df["status"] = df["status"].str.strip().str.lower()
    for col in SCHEMA:
        if col.kind in ("int", "float"):
            df[col.name] = pd.to_numeric(df[col.name], errors="coerce").astype("float64")
        elif col.kind == "bool":
            df[col.name] = df[col.name].astype(str).str.strip().str.lower().isin(("true", "1"))
    df["seq_len"] = df["seq_len"].astype("int64")
    unnamed = df["device_name"] == ""
    device = df.loc[unnamed, "device"]
    df.loc[unnamed, "device_name"] = device.where(device != "", "unknown device")
    return latest(df).reset_index(drop=True)
