"""Merge a sweep's row files into its study table.

Jobs of a cluster sweep (``row_files=true``, the default under a submitit launcher)
each write their rows to files of their own in ``<results_dir>/<study>.rows/``. This
merges them, and any table already there, into ``<results_dir>/<study>.csv``::

    python -m attnbench.merge scaling-cuda-h100              # a study name (in results/)
    python -m attnbench.merge 'scaling-*'                    # every study that matches
    python -m attnbench.merge results/scaling-cuda-h100.rows # a rows folder (or a table .csv)
    python -m attnbench.merge 'scaling-*' --out results/scaling-all.csv

A sweep submitted to a cluster also leaves a *plan*, ``<results_dir>/plans/*.csv``: the
configurations it asked for, written before its jobs start. The merge lists those with
no row yet (a job cancelled, killed by the scheduler or still running), which
``resume=true`` then measures.

Rows of the same measurement (:func:`attnbench.results.identity`: the configuration,
the kind of device and the library versions) are merged into one, the newest
(``timestamp``); the same configuration measured on two GPU types, or with two torch
versions, stays two rows. The table keeps the columns of
:data:`attnbench.results.SCHEMA`'s columns, rows in time order, so plots and notebooks read it
unchanged. Merging is idempotent: run it again whenever more rows came in.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import os
import re
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import BenchConfig
from .results import SCHEMA, config_cells, normalise, plan_columns
from .tables import ROWS_SUFFIX, merge_into, read_rows, read_table, row_file_paths

__all__ = ["merge", "find_sources", "Source", "write_plan", "missing"]


@dataclass
class Source:
    """One study's results: its table and its folder of row files (either may be missing)."""

    table: Path
    rows: Path
    row_files: list[Path] = field(default_factory=list)


def write_plan(configs: Iterable[BenchConfig]) -> list[Path]:
    """Record the configurations a cluster sweep asks for, before its jobs start: one CSV
    file per results folder, ``<results_dir>/plans/<time>-<host>-<pid>.csv``. The
    configurations are as given (``device=auto``, ``study=x-{device}`` are filled in on
    the job's machine)."""
    import pandas as pd

    by_dir: dict[str, list[dict]] = {}
    keys = plan_columns()  # what a plan entry says (a value of "" or "auto" is left to the job's machine)
    for c in configs:
        cells = config_cells(c)
        entry = {k: cells[k] for k in keys}
        by_dir.setdefault(c.results_dir, []).append(entry)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    written = []
    for results_dir, entries in by_dir.items():
        path = Path(results_dir) / "plans" / f"{stamp}-{socket.gethostname()}-{os.getpid()}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(entries, columns=keys).drop_duplicates().to_csv(path, index=False)
        written.append(path)
    return written


def _planned_for(study: str, results_dir: Path) -> list[dict]:
    """The plan entries of ``study`` (a name with ``{device}`` matches every device's)."""
    out = []
    for path in sorted((results_dir / "plans").glob("*.csv")):
        for e in read_rows(path):
            pattern = re.escape(e["study"]).replace(re.escape("{device}"), ".+")
            if re.fullmatch(pattern, study):
                out.append(e)
    return out


def missing(study: str, results_dir: Path, rows: Iterable[Mapping]) -> list[dict]:
    """Plan entries of ``study`` that no row measures (on the columns the entry fixes)."""
    keys = [k for k in plan_columns() if k != "study"]
    measured = [{k: normalise(k, r.get(k)) for k in keys} for r in rows]  # normalised once
    for m in measured:
        for col in SCHEMA:  # rows of a table that predates the column
            if col.name in m and m[col.name] in (None, "") and callable(col.then):
                m[col.name] = col.then(m)
    out = []
    for e in _planned_for(study, results_dir):
        fixed = {k: normalise(k, e.get(k, "")) for k in keys if str(e.get(k, "")) not in ("", "auto")}
        if not any(all(m[k] == v for k, v in fixed.items()) for m in measured) and e not in out:
            out.append(e)
    return out


def _describe(e: Mapping) -> str:
    keys = ("impl", "seq_len", "window", "dilation", "global_positions", "causal", "dtype", "device", "mode")
    return " ".join(f"{k}={e[k]}" for k in keys if str(e.get(k)) not in ("", "auto", "False", "1", "None"))


def _has_glob(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def find_sources(targets: Sequence[str], results_dir: str | Path = "results") -> list[Source]:
    """Resolve each target (a study name or pattern in ``results_dir``, a ``<study>.rows``
    folder, or a ``<study>.csv`` table) to its table and rows folder."""
    results_dir = Path(results_dir)
    out: list[Source] = []
    for t in targets:
        p = Path(t)
        if p.is_dir():
            stem = p.name[: -len(ROWS_SUFFIX)] if p.name.endswith(ROWS_SUFFIX) else p.name
            found = [Source(p.parent / f"{stem}.csv", p)]
        elif p.suffix == ".csv":
            found = [Source(p, p.with_suffix(ROWS_SUFFIX))]
        else:
            studies = set()
            if results_dir.is_dir():
                for q in results_dir.iterdir():
                    if q.suffix == ".csv" and q.is_file():
                        studies.add(q.stem)
                    elif q.name.endswith(ROWS_SUFFIX) and q.is_dir():
                        studies.add(q.name[: -len(ROWS_SUFFIX)])
            names = sorted(fnmatch.filter(studies, t)) if _has_glob(t) else [t] if t in studies else []
            found = [Source(results_dir / f"{s}.csv", results_dir / f"{s}{ROWS_SUFFIX}") for s in names]
        found = [s for s in found if s.table.is_file() or s.rows.is_dir()]
        if not found:
            raise FileNotFoundError(
                f"{t}: no results found (looked for a study in {results_dir}/, a <study>{ROWS_SUFFIX} "
                f"folder or a <study>.csv table)"
            )
        for s in found:
            s.row_files = sorted(row_file_paths(s.rows), key=lambda f: (f.stat().st_mtime, f.name))
            if all(s.table.resolve() != o.table.resolve() for o in out):
                out.append(s)
    return out


def merge(
    targets: Sequence[str],
    out: str | Path | None = None,
    results_dir: str | Path = "results",
    clean: bool = False,
    log=print,
) -> dict[Path, int]:
    """Merge the row files (and tables) of ``targets`` into each study's table, or all of
    them into ``out``. With ``clean``, the row files merged are removed afterwards (those
    that arrive meanwhile stay). Returns the number of rows of each table written."""
    sources = find_sources(targets, results_dir)
    if out is not None:
        out = Path(out)
        extra = []
        for s in sources:
            if s.table.is_file() and s.table.resolve() != out.resolve():
                extra += read_rows(s.table)
        groups = [(out, sources, extra)]
    else:
        groups = [(s.table, [s], []) for s in sources]
    written = {}
    for table, srcs, extra in groups:
        files = [p for s in srcs for p in s.row_files]
        from_files = [r for p in files for r in read_rows(p)]
        incoming = extra + from_files
        before, after = merge_into(table, incoming)
        dropped = before + len(incoming) - after
        log(
            f"{table}: {after} rows ({before} already in the table, {len(files)} row files"
            + (f", {len(extra)} rows from other tables" if extra else "")
            + f"; {dropped} duplicates dropped)"
        )
        written[table] = after
        absent = missing(table.stem, table.parent, read_table(table).to_dict("records"))
        if absent:
            log(f"{table}: {len(absent)} planned configuration(s) have no row yet (resume=true measures them):")
            for e in absent[:20]:
                log(f"  {_describe(e)}")
        if clean:
            for p in files:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            for s in srcs:
                with contextlib.suppress(OSError):
                    s.rows.rmdir()  # only when empty
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m attnbench.merge",
        description="Merge a sweep's row files (<results_dir>/<study>.rows/) into its study table "
        "(<results_dir>/<study>.csv): one row per measurement (configuration, device, library versions), the newest.",
    )
    ap.add_argument(
        "targets", nargs="+", metavar="STUDY|ROWS_DIR|TABLE", help="a study name or glob, a .rows folder, a .csv table"
    )
    ap.add_argument("--out", help="write everything into this one table instead of each study's own")
    ap.add_argument("--results-dir", default="results", help="where study names are looked up (default: results)")
    ap.add_argument("--clean", action="store_true", help="remove the row files once merged")
    args = ap.parse_args(argv)
    try:
        merge(args.targets, out=args.out, results_dir=args.results_dir, clean=args.clean)
    except (FileNotFoundError, ValueError) as e:
        print(f"attnbench.merge: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
