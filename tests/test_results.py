"""Result rows and their tables: the identity of a measurement, appending, reading back, merging."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from attnbench.config import BenchConfig
from attnbench.results import base_row, columns, identity
from attnbench.tables import append_row, check_writable, latest, merge_into, read_rows, read_table


def _row(**kw) -> dict:
    c = BenchConfig(impl="chunked", seq_len=64, window=8, heads=2, head_dim=16, device="cpu", study="t")
    row = base_row(c.resolved())
    row.update(status="ok", time_ms_median=1.0)
    row.update(kw)
    return row


def test_identity_is_the_configuration_the_device_and_the_libraries():
    row = _row()
    assert identity(row) == identity(_row(host="another-host", timestamp="2031-01-01T00:00:00+00:00", status="oom"))
    for change in (
        dict(device_name="Another CPU (64 cores)"),
        dict(torch_version="2.6.0"),
        dict(triton_version="3.1.0"),
        dict(threads=1),
        dict(seq_len=128),
        dict(global_positions="0-63"),
        dict(study="other"),
    ):
        assert identity(_row(**change)) != identity(row), change


def test_identity_survives_the_csv(tmp_path):
    row = _row(global_positions="0-63 100", causal=True, dilation="1/2")
    append_row(tmp_path / "t.csv", row)
    (back,) = read_rows(tmp_path / "t.csv")
    assert identity(back) == identity(row)


def test_global_positions_are_exact():
    c = BenchConfig(
        impl="chunked", seq_len=200, window=8, global_tokens=list(range(64)) + [100, 102, 103], device="cpu"
    )
    row = base_row(c.resolved())
    assert row["global_positions"] == "0-63 100 102-103" and row["global_tokens"] == 67


def test_a_cut_off_last_line_is_dropped_not_glued(tmp_path, caplog):
    path = tmp_path / "t.csv"
    append_row(path, _row(seq_len=32))
    with open(path, "a") as f:
        f.write("t,chunked,w8,8,1,False,0,,1,2,48,16,fp32,cpu,Some CPU,fwd,o")  # a writer stopped mid-row
    assert [r["seq_len"] for r in read_rows(path)] == ["32"]  # reading leaves it out
    append_row(path, _row(seq_len=64))
    assert "its last line was cut off" in caplog.text
    table = pd.read_csv(path)  # still a table pandas reads
    assert list(table["seq_len"]) == [32, 64] and list(table.columns) == columns()


def test_a_table_from_before_a_column_existed_gains_it(tmp_path):
    path = tmp_path / "t.csv"
    older = [c for c in columns() if c != "profile"]
    append_row(path, _row(seq_len=32))
    table = pd.read_csv(path)[older]
    table.to_csv(path, index=False)  # as an earlier version wrote it
    check_writable(path)
    append_row(path, _row(seq_len=64, profile="results/profiles/t/x"))
    back = read_table(path)
    assert list(back.columns) == columns() and list(back["profile"]) == ["", "results/profiles/t/x"]


def test_rows_are_one_line_each(tmp_path):
    append_row(tmp_path / "t.csv", _row(status="error", reason="RuntimeError: line one\nline two"))
    text = (tmp_path / "t.csv").read_text()
    assert len(text.splitlines()) == 2 and "line one line two" in text


def test_check_writable_refuses_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        check_writable(tmp_path / "file" / "sub" / "t.csv")
    other = tmp_path / "other.csv"
    other.write_text("name,value\nx,1\n")
    with pytest.raises(ValueError, match="not a results table of this attnbench"):
        check_writable(other)
    check_writable(tmp_path / "new" / "deeper" / "t.csv")
    assert not (tmp_path / "new").exists()  # the check wrote nothing


def test_latest_keeps_the_newest_of_each_measurement():
    old, new = "2030-01-01T00:00:00+00:00", "2030-01-02T00:00:00+00:00"
    rows = [
        _row(timestamp=new, time_ms_median=1.0),
        _row(timestamp=old, time_ms_median=9.0),  # the same measurement, older: dropped
        _row(timestamp=old, host="h1"),  # another host, same device and libraries: the same measurement
        _row(timestamp=old, device_name="GPU B"),  # another device: kept
        _row(timestamp=old, torch_version="2.7.0"),  # another torch: kept
        _row(timestamp=old, seq_len=128),  # another configuration: kept
    ]
    out = latest(rows)
    assert len(out) == 4
    mine = out[out["device_name"] == rows[0]["device_name"]]
    mine = mine[(mine["torch_version"] == rows[0]["torch_version"]) & (mine["seq_len"] == 64)]
    assert list(mine["time_ms_median"]) == [1.0]
    assert list(out["timestamp"])[-1] == new  # time order


def test_merge_into_is_idempotent(tmp_path):
    path = tmp_path / "t.csv"
    rows = [_row(seq_len=n) for n in (32, 64)]
    assert merge_into(path, rows) == (0, 2)
    assert merge_into(path, rows) == (2, 2)
    assert list(read_table(path).columns) == columns()


# ---------------------------------------------------------------------- the schema is the one home of a column
def test_a_new_column_is_one_entry_in_the_schema(tmp_path, monkeypatch):
    """A throwaway configuration axis added to the schema alone reaches the CSV, the
    identity, resume, merge and the terminal table."""
    import attnbench.results as results
    from attnbench.merge import merge
    from attnbench.sweep import sweep
    from attnbench.tables import done, write_row_file

    axis = results.Column("throwaway", "int", "config", lambda c, p: c.seed * 10, identity=True, show="thr")
    monkeypatch.setattr(results, "SCHEMA", [*results.SCHEMA, axis])

    def config(seed: int) -> BenchConfig:
        return BenchConfig(impl="chunked", seq_len=32, window=4, heads=1, head_dim=8, device="cpu", seed=seed,
                           study="t", results_dir=str(tmp_path), isolate="false", memory=False, min_reps=1,
                           max_reps=1, warmup=0)  # fmt: skip

    (row,) = sweep([config(1)], progress=False)
    assert row["throwaway"] == 10
    assert read_rows(tmp_path / "t.csv")[0]["throwaway"] == "10"  # the CSV
    assert identity(row) != identity({**row, "throwaway": 20})  # the identity
    assert identity(base_row(config(1).resolved())) in done(config(1))  # resume: done ...
    assert identity(base_row(config(2).resolved())) not in done(config(2))  # ... for its value only
    assert sweep([config(1), config(2)], resume=True, progress=False)[0]["throwaway"] == 20
    assert "thr" in results.format_rows([row]).splitlines()[0]  # the terminal table
    write_row_file(tmp_path / "t.rows", {**row, "throwaway": 30, "timestamp": "2031-01-01T00:00:00+00:00"})
    merge(["t"], results_dir=tmp_path, log=lambda *_: None)  # merge keeps the three apart
    assert sorted(read_table(tmp_path / "t.csv")["throwaway"]) == ["10", "20", "30"]


def test_every_column_has_a_kind_and_a_source_and_the_identity_is_described():
    import attnbench.results as results

    assert len(set(results.columns())) == len(results.SCHEMA)
    for col in results.SCHEMA:
        assert col.kind in ("text", "int", "float", "bool", "window"), col
        assert col.source in ("config", "env", "measured"), col
        assert (col.of is None) == (col.source == "measured"), col
    for lib in ("transformers_version", "flash_attn_version", "natten_version", "torch_version", "dtype", "mode"):
        assert lib in results.identity_columns(), lib
    for where in ("host", "timestamp", "git_commit", "status", "time_ms_median"):
        assert where not in results.identity_columns(), where


def test_the_readme_lists_every_column_once_in_schema_order():
    """The README's column table is checked against the schema, not kept by hand."""
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("| column", 1)[1].split("\n\n", 1)[0]
    named = [name for line in section.splitlines()[2:] for name in re.findall(r"`(\w+)`", line.split("|")[1])]
    assert named == columns(), f"README lacks {set(columns()) - set(named)}, has extra {set(named) - set(columns())}"


def test_a_row_without_a_measurement_says_why_as_data():
    from attnbench.results import REASON_KINDS, unmeasured

    c = BenchConfig(impl="chunked", seq_len=64, window=8, heads=2, head_dim=16, device="cpu").resolved()
    row = unmeasured(c, "skipped", "memory", "over the memory budget: needs ~9 GiB")
    assert (row["status"], row["reason_kind"]) == ("skipped", "memory") and row["time_ms_median"] is None
    assert "memory" in REASON_KINDS
    with pytest.raises(ValueError, match="kind one of"):
        unmeasured(c, "skipped", "because", "no")
    with pytest.raises(ValueError, match="status one of"):
        unmeasured(c, "ok", "time", "no")


COMMITTED = Path(__file__).resolve().parent.parent / "results"


@pytest.mark.parametrize("table", sorted(p.name for p in COMMITTED.glob("*.csv")))
def test_every_committed_table_stays_readable_and_appendable(tmp_path, table):
    """A table written by an earlier version gains the columns added since, keeps its
    rows and their identities, and takes a new row."""
    import shutil

    from attnbench.tables import load

    src = COMMITTED / table
    if "category" in src.read_text().split("\n", 1)[0]:
        pytest.skip(f"{table} is a profile breakdown (per-operator times), not a results table")
    path = tmp_path / table
    shutil.copy(src, path)
    before = read_rows(path)
    check_writable(path)  # what `python -m attnbench study=...` asks before it runs
    append_row(path, _row(study=path.stem))
    after = read_rows(path)
    assert len(after) == len(before) + 1 and list(read_table(path).columns)[: len(columns())] == columns()
    assert [identity(r) for r in after[:-1]] == [identity(r) for r in before]  # the old rows' identities kept
    assert len(load(path)) >= 1
