"""Tests of the results plots: loading and validation, exponent fits, figures, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from attnbench import plot
from attnbench.plot import ResultsError, fit_exponent, load_results, plot_ratios, plot_scaling

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = [512, 1024, 2048, 4096, 8192]


def _synthetic_rows() -> list[dict[str, object]]:
    """Two impls x two patterns: naive runs out of memory, then is skipped by the guard."""
    rows: list[dict[str, object]] = []
    for pattern, g in (("w512", 0), ("w512 g1", 1)):
        for impl, t_exp, m_exp in (("naive", 2.0, 2.0), ("chunked", 1.0, 1.0)):
            for n in LENGTHS:
                status, kind, reason = "ok", "", ""
                if impl == "naive" and n == 4096:
                    status, kind, reason = "oom", "oom", "CUDA out of memory"
                elif impl == "naive" and n > 4096:
                    status, kind, reason = "skipped", "memory", "over the memory budget: needs ~38.2 GiB, budget 14 GiB"
                ok = status == "ok"
                rows.append(
                    {
                        "study": "scaling",
                        "impl": impl,
                        "pattern": pattern,
                        "window": 512,
                        "dilation": "1",
                        "causal": False,
                        "global_tokens": g,
                        "batch": 1,
                        "heads": 12,
                        "seq_len": n,
                        "head_dim": 64,
                        "dtype": "fp32",
                        "device": "cuda",
                        "device_name": "Test GPU",
                        "mode": "fwd",
                        "status": status,
                        "reason_kind": kind,
                        "reason": reason,
                        "time_ms_median": 1e-6 * n**t_exp * (1 + g) if ok else np.nan,
                        "peak_mem_bytes": 64.0 * n**m_exp if ok else np.nan,
                    }
                )
    return rows


@pytest.fixture
def results_csv(tmp_path: Path) -> Path:
    path = tmp_path / "scaling-test.csv"
    pd.DataFrame(_synthetic_rows()).to_csv(path, index=False)
    return path


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 2000, (path, len(data))


# --------------------------------------------------------------------------- figures


def test_plot_scaling_and_ratios_write_pngs(results_csv: Path, tmp_path: Path) -> None:
    df = load_results(results_csv)
    paths = plot_scaling(df, tmp_path / "out" / "scaling.png", dpi=60)
    assert paths == [tmp_path / "out" / "scaling.png"]
    _assert_png(paths[0])
    ratio = plot_ratios(df, "naive", tmp_path / "out" / "ratios.png", dpi=60)
    _assert_png(ratio)


def test_plot_scaling_one_figure_per_pattern(results_csv: Path, tmp_path: Path) -> None:
    paths = plot_scaling(load_results(results_csv), tmp_path / "s.png", per_pattern=True, dpi=60)
    assert sorted(p.name for p in paths) == ["s-w512-g1.png", "s-w512.png"]
    for p in paths:
        _assert_png(p)


def test_plot_two_devices_and_minimal_columns(tmp_path: Path) -> None:
    rows = pd.DataFrame(_synthetic_rows())
    other = rows.assign(device_name="Other GPU", time_ms_median=rows["time_ms_median"] / 2)
    both = tmp_path / "both.csv"
    pd.concat([rows, other]).to_csv(both, index=False)
    _assert_png(plot_scaling(load_results(both), tmp_path / "both.png", dpi=60)[0])
    # only the required columns and a time: still plots (empty memory panel)
    minimal = tmp_path / "minimal.csv"
    rows[rows["pattern"] == "w512"][["impl", "seq_len", "status", "time_ms_median"]].to_csv(minimal, index=False)
    df = load_results(minimal)
    assert set(df["device_name"]) == {"unknown device"}
    _assert_png(plot_scaling(df, tmp_path / "minimal.png", dpi=60)[0])


def test_ratio_table_and_unknown_baseline(results_csv: Path) -> None:
    df = load_results(results_csv)
    table = plot.ratio_table(df, "naive")
    assert set(table["impl"]) == {"chunked"}
    assert sorted(set(table["seq_len"])) == [512, 1024, 2048]  # naive stops at 4096
    row = table[(table["pattern"] == "w512") & (table["seq_len"] == 2048)].iloc[0]
    assert row["speedup"] == pytest.approx(2048.0)
    assert row["mem_ratio"] == pytest.approx(2048.0)
    with pytest.raises(ResultsError, match="baseline 'nope' is not in the table"):
        plot.ratio_table(df, "nope")


def test_stop_point_and_reasons(results_csv: Path) -> None:
    df = load_results(results_csv)
    naive = df[(df["impl"] == "naive") & (df["pattern"] == "w512")]
    line = plot._analyse(naive)
    assert line.stop == (4096, "OOM")
    assert list(line.n) == [512, 1024, 2048]
    assert plot.short_reason("skipped", "memory") == "skipped: memory budget"
    assert plot.short_reason("skipped", "time") == "skipped: time budget"
    assert plot.short_reason("skipped", "unsupported") == "unsupported"
    assert plot.short_reason("wrong", "") == "wrong result"
    pivot = plot.pivot_results(plot.filter_results(df, patterns=["w512"]))
    assert list(pivot.index) == ["chunked", "naive"]  # the registry's order
    assert pivot.loc["naive", 4096] == "OOM"
    assert pivot.loc["naive", 8192] == "skipped: memory budget"
    assert pivot.loc["chunked", 8192] == pytest.approx(1e-6 * 8192, rel=1e-3)


def test_reasons_come_from_status_and_reason_kind_only(tmp_path: Path) -> None:
    """The reason's words are never read: a row's kind names it, and a row of an older
    table, without a kind, shows its status."""
    from attnbench.results import REASON_KINDS

    assert plot.short_reason("skipped", "memory") == "skipped: memory budget"
    assert plot.short_reason("skipped", "") == "skipped"  # not guessed from any text
    assert plot.short_reason("oom", "") == "OOM"
    for kind in REASON_KINDS:  # every kind has its words
        assert plot.short_reason("skipped", kind) == plot.REASON_WORDS[kind]
    rows = pd.DataFrame(_synthetic_rows())
    naive = (rows["impl"] == "naive") & (rows["pattern"] == "w512")
    rows.loc[naive & (rows["seq_len"] == 8192), "reason"] = "unsupported: and unavailable, in words only"
    rows.loc[naive & (rows["seq_len"] == 8192), "reason_kind"] = "time"
    rows.loc[naive & (rows["seq_len"] == 4096), "reason_kind"] = ""  # an older table's oom row
    rows.loc[naive & (rows["seq_len"] == 4096), "status"] = "skipped"
    path = tmp_path / "r.csv"
    rows.to_csv(path, index=False)
    pivot = plot.pivot_results(plot.filter_results(load_results(path), patterns=["w512"]))
    assert pivot.loc["naive", 8192] == "skipped: time budget"
    assert pivot.loc["naive", 4096] == "skipped"
    assert plot._analyse(load_results(path).query("impl == 'naive' and pattern == 'w512'")).stop == (4096, "skipped")


def _texts(fig) -> list[str]:
    """Every text a figure shows: titles, labels, legend entries, notes."""
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_one_length_shows_no_exponent(tmp_path: Path) -> None:
    rows = pd.DataFrame(_synthetic_rows())
    path = tmp_path / "one.csv"
    rows[rows["seq_len"] == 1024].to_csv(path, index=False)
    ((_, fig),) = plot.scaling_figures(load_results(path))
    texts = _texts(fig)
    assert not any("nan" in t for t in texts), texts
    assert "chunked w512" in texts and not any("n^" in t for t in texts), texts
    many = tmp_path / "many.csv"
    rows.to_csv(many, index=False)
    ((_, fig),) = plot.scaling_figures(load_results(many))
    assert "chunked w512: time n^1.0, memory n^1.0" in _texts(fig)


def test_the_footnote_describes_only_what_is_drawn(tmp_path: Path) -> None:
    """w512's rows have no ok point: its line is not drawn, and the footnote explains w16 alone."""
    rows = pd.DataFrame(_synthetic_rows())
    rows = rows[rows["pattern"] == "w512"]
    small = rows.assign(pattern="w16", window=16)
    rows = rows.assign(status="skipped", reason_kind="memory", time_ms_median=np.nan, peak_mem_bytes=np.nan)
    path = tmp_path / "w.csv"
    pd.concat([small, rows]).to_csv(path, index=False)
    ((_, fig),) = plot.scaling_figures(load_results(path))
    (footnote,) = [t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle()]
    explained, missing = footnote.splitlines()
    assert explained == "w16 = window 16 (8 keys each side)", footnote
    assert missing == "no ok point: chunked w512: skipped: memory budget; naive w512: skipped: memory budget"


def _model_rows() -> list[dict[str, object]]:
    """hf_longformer (the baseline) and chunked alone and inside a 2-layer model; flex
    unsupported inside it; triton not measured inside it, skipped alone."""
    rows = []
    label = "longformer-base-shaped, 2 layers"
    for impl, attention_ms, model_ms in (("hf_longformer", 10.0, 40.0), ("chunked", 5.0, 35.0), ("flex", 2.0, None),
                                         ("triton", None, "absent")):  # fmt: skip
        for model, ms in (("", attention_ms), (label, model_ms)):
            if ms == "absent":
                continue
            row = dict(impl=impl, model=model, mode="fwd", seq_len=1024, status="ok", reason_kind="",
                       time_ms_median=ms, device_name="a CPU", dtype="fp32", pattern="w512 g1")  # fmt: skip
            if ms is None:
                kind = "unsupported" if impl == "flex" else "memory"
                row.update(status="skipped", reason_kind=kind, reason=f"{kind}: in words", time_ms_median=None)
            rows.append(row)
    return rows


def test_model_figure_sets_model_beside_attention_speed_ups(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    pd.DataFrame(_model_rows()).to_csv(path, index=False)
    assert plot.write_figure("model", path) == [tmp_path / "m.png"]
    _assert_png(tmp_path / "m.png")
    fig = plot.model_figure(load_results(path))
    texts = _texts(fig)
    assert {"2", "1.1", "5"} <= set(texts), texts  # chunked alone 10/5 and inside 40/35; flex alone 10/2
    inside_only = tmp_path / "inside.csv"
    pd.DataFrame([r for r in _model_rows() if r["model"]]).to_csv(inside_only, index=False)
    with pytest.raises(ResultsError, match="no ok rows both inside a model and alone"):
        plot.write_figure("model", inside_only)  # nothing to set beside


def test_model_figure_says_which_implementations_have_no_bar(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    pd.DataFrame(_model_rows()).to_csv(path, index=False)
    (ax,) = plot.model_figure(load_results(path)).axes
    notes = " ".join(t.get_text() for t in ax.texts if t.get_text().startswith("no bar")).replace("\n", " ")
    assert notes == "no bar: flex (model: unsupported); triton (attention: skipped: memory budget, model: not measured)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["chunked", "flex", "triton"]


def test_a_run_asks_for_its_figure_by_name(results_csv: Path) -> None:
    assert plot.write_figure("none", results_csv) == []
    assert plot.write_figure("auto", results_csv) == []  # no model rows, nothing profiled
    (png,) = plot.write_figure("scaling", results_csv, dpi=60)
    assert png == results_csv.with_suffix(".png")
    _assert_png(png)
    with pytest.raises(ResultsError, match="no profiled rows"):
        plot.write_figure("breakdown", results_csv)
    with pytest.raises(ValueError, match=r"figure='bars': unknown; choose one of: auto, none, scaling, model"):
        plot.write_figure("bars", results_csv)


def test_impl_colors_follow_the_registry() -> None:
    import attnbench

    for i, name in enumerate(attnbench.list_impls()):
        assert plot.impl_color(name) == plot.PALETTE[i]
    assert plot.impl_color("my-new-kernel") == plot.impl_color("my-new-kernel")
    assert plot.impl_color("chunked") != plot.impl_color("naive")
    names = [f"kernel_v{i}" for i in range(len(plot.PALETTE) - len(attnbench.list_impls()))]
    colors = {plot.impl_color(name, names) for name in [*names, *attnbench.list_impls()]}
    assert len(colors) == len(names) + len(attnbench.list_impls())  # distinct while the palette lasts


# --------------------------------------------------------------------------- fits


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fit_exponent_exact(power: float) -> None:
    n = np.array([2.0**k for k in range(8, 17)])
    assert fit_exponent(n, 3.7 * n**power) == pytest.approx(power, abs=1e-6)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fit_exponent_noisy(power: float) -> None:
    rng = np.random.default_rng(1234)
    n = np.array([2.0**k for k in range(8, 17)])
    y = 0.01 * n**power * np.exp(rng.normal(0.0, 0.1, n.size))
    assert abs(fit_exponent(n, y) - power) < 0.05


def test_fit_exponent_degenerate() -> None:
    assert math.isnan(fit_exponent([1024], [3.0]))
    assert math.isnan(fit_exponent([1024, 1024], [3.0, 4.0]))
    assert math.isnan(fit_exponent([512, 1024], [np.nan, 4.0]))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not a CSV text file"),
        (b"impl,seq_len,status\nnaive,512,ok\nnaive,1024,ok,extra,fields\n", "not a readable CSV file"),
        (b"impl,seq_len,status\nnaive,512,ok\nnaive,lots,ok\n", "seq_len is not a positive integer on line(s) 3"),
        (b"impl,seq_len,status\nnaive,512,ok\nnaive,1024\n", "empty 'status' on line(s) 3"),
        (b"name,value\na,1\n", "missing required column(s) impl, seq_len, status"),
        (b"impl,seq_len,status\n", "has a header but no data rows"),
    ],
)
def test_corrupted_csv_raises(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(ResultsError) as info:
        load_results(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(content)
    with pytest.raises(ResultsError, match="file is empty") as info:
        load_results([path])
    assert str(path) in str(info.value)


def test_missing_file_raises(tmp_path: Path, results_csv: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(ResultsError, match="no such file") as info:
        load_results([results_csv, missing])
    assert str(missing) in str(info.value)
    with pytest.raises(ResultsError, match="no results files"):
        load_results([])


def test_filter_without_match_names_what_exists(results_csv: Path) -> None:
    with pytest.raises(ResultsError, match=r"no rows match pattern in \['w9'\].*patterns \[w512, w512 g1\]"):
        plot.filter_results(load_results(results_csv), patterns=["w9"])


# --------------------------------------------------------------------------- command line


def test_cli_writes_figures(results_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fig.png"
    assert (
        plot.main([str(results_csv), "--baseline", "naive", "--out", str(out), "--pattern", "w512", "--dpi", "60"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "speed-up over naive [95% interval]" in lines[0], lines  # the ratio table first, then the files
    printed = lines[-2:]
    assert printed == [str(out), str(tmp_path / "fig-vs-naive.png")]
    for p in printed:
        _assert_png(Path(p))


def test_cli_bad_baseline_exits_2(results_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(results_csv), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "baseline 'nope'" in err


def test_cli_corrupted_file_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"impl,seq_len,status\nnaive,512,ok\nnaive,1024,ok,1,2,3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "attnbench.plot", str(bad)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and "not a readable CSV file" in lines[0]
    assert proc.stdout == ""
