"""Result rows and their tables: the identity of a measurement, appending, reading back, merging."""

from __future__ import annotations

import pandas as pd
import pytest

from attnbench.config import BenchConfig
from attnbench.results import COLUMNS, base_row, identity
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
    assert list(table["seq_len"]) == [32, 64] and list(table.columns) == COLUMNS


def test_a_table_from_before_a_column_existed_gains_it(tmp_path):
    path = tmp_path / "t.csv"
    older = [c for c in COLUMNS if c != "profile"]
    append_row(path, _row(seq_len=32))
    table = pd.read_csv(path)[older]
    table.to_csv(path, index=False)  # as an earlier version wrote it
    check_writable(path)
    append_row(path, _row(seq_len=64, profile="results/profiles/t/x"))
    back = read_table(path)
    assert list(back.columns) == COLUMNS and list(back["profile"]) == ["", "results/profiles/t/x"]


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
    assert list(read_table(path).columns) == COLUMNS
