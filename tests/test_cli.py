"""The command line (Hydra): every job validated before anything runs, one line and exit
status 2 for a bad setting, sweeps, and what a run leaves behind."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnbench
from attnbench.children import sigint_default
from attnbench.tables import read_rows

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("hydra") is None, reason="hydra-core is not installed: the command line needs it"
)
TINY = ["window=8", "heads=2", "head_dim=16", "device=cpu", "time_budget_s=0.05", "min_reps=2", "max_reps=5"]


def _cli(args, cwd, timeout=300, module="attnbench"):
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def _written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------- bad settings, before anything runs
BAD = [
    ("impl=nope", ["impl='nope'", "chunked", "naive"]),
    ("seq_len=0", ["seq_len=0", "from 1 to 2147483647"]),
    ("seq_len=abc", ["seq_len='abc'", "int from 1"]),
    ("seq_len=99999999999999999999", ["seq_len=99999999999999999999", "from 1 to 2147483647"]),
    ("window=3", ["window=3", "even"]),
    ("dtype=fp8", ["dtype='fp8'", "bf16"]),
    ("mode=train", ["mode='train'", "fwd_bwd"]),
    ("pattern=zigzag", ["pattern='zigzag'", "sliding"]),
    ("experiment=nope", ["experiment='nope'", "scaling"]),
    ("global_tokens=5 seq_len=4", ["global_tokens=(5,)", "seq_len=4"]),
    ("threads=0", ["threads=0", "int >= 1"]),
    ("max_reps=0", ["max_reps=0", "int >= 1"]),
    ("seed=abc", ["seed='abc'", "int >= 0"]),
    ("mem_budget_gb=-1", ["mem_budget_gb=-1", "> 0"]),
    ("job_timeout_s=0", ["job_timeout_s=0", "> 0"]),
    ("resume=maybe", ["resume='maybe'", "true or false"]),
    ("isolate=maybe", ["isolate='maybe'", "auto, true, false"]),
    ("verify=maybe", ["verify='maybe'", "true or false"]),
    ("row_files=maybe", ["row_files='maybe'", "auto, true, false"]),
    ("+foo=1", ["foo: unknown setting", "seq_len"]),
    ("foo=1", ["foo: unknown setting", "seq_len"]),
    ("sweep.foo=[1]", ["sweep.foo: unknown setting", "seq_len"]),
    ("study=a/b", ["study='a/b'", "results_dir="]),
    ("figure=bars", ["figure='bars'", "auto, none, scaling, model, breakdown"]),
]


@pytest.mark.parametrize("arg, words", BAD, ids=[a for a, _ in BAD])
def test_bad_setting_is_one_line_before_anything_runs(tmp_path, monkeypatch, arg, words):
    from attnbench.__main__ import _normalise, precheck

    monkeypatch.chdir(tmp_path)
    err = precheck([*(_normalise(a) for a in arg.split()), f"results_dir={tmp_path / 'r'}"])
    assert err is not None and "\n" not in err
    assert all(w in err for w in words), err
    assert _written(tmp_path) == []


def test_cuda_asked_for_where_there_is_none(tmp_path, monkeypatch):
    from attnbench.__main__ import precheck

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.chdir(tmp_path)
    err = precheck(["device=cuda", "experiment=scaling"])
    assert err.startswith("device='cuda': no CUDA device here") and "choose auto or cpu" in err
    assert _written(tmp_path) == []


def test_jobs_bound_for_a_cluster_are_resolved_on_its_nodes(tmp_path, monkeypatch):
    """A CPU login node may submit device=cuda jobs; the plan keeps auto and {device}."""
    from attnbench.__main__ import _normalise, precheck

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    monkeypatch.chdir(tmp_path)
    planned = []
    args = ["-m", "device=cuda", "impl=chunked,naive", "study=x-{device}", "hydra/launcher=attnbench_slurm"]
    assert precheck([_normalise(a) for a in args], planned) is None
    assert [(c.impl, c.device, c.dtype, c.study) for c in planned] == [
        ("chunked", "cuda", "auto", "x-{device}"),
        ("naive", "cuda", "auto", "x-{device}"),
    ]
    assert precheck(["-m", "device=cuda", "impl=nope", "hydra/launcher=attnbench_slurm"]).startswith("impl='nope'")


def test_every_job_of_a_multirun_is_checked_first(tmp_path):
    """The third value is valid, the second is not: nothing runs, nothing is written."""
    r = _cli(["-m", "impl=chunked", "seq_len=256", "dilation=1,0,2", *TINY, f"results_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "attnbench: dilation=0: must be an int >= 1 or a tuple of per-head ints >= 1"
    assert _written(tmp_path) == []


@pytest.mark.parametrize("arg", ["impl=nope", "seq_len=abc", "+foo=1"])
def test_cli_bad_override_exits_2_with_one_line(tmp_path, arg):
    r = _cli([arg, f"results_dir={tmp_path}/r"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnbench: "), r.stderr
    assert _written(tmp_path) == []


# ---------------------------------------------------------------------- runs
def test_a_run_shows_its_steps_and_leaves_only_its_results(tmp_path):
    """global_tokens=0 is one global token at position 0; study=x-{device} as the README
    writes it; the steps show as they happen; no outputs/ folder, no log file."""
    r = _cli(["impl=chunked", "seq_len=64", "global_tokens=0", "study=x-{device}", *TINY], tmp_path)
    assert r.returncode == 0, r.stderr
    (row,) = read_rows(tmp_path / "results" / "x-cpu.csv")
    assert (row["pattern"], row["global_tokens"], row["global_positions"], row["status"]) == ("w8 g1", "1", "0", "ok")
    assert _written(tmp_path) == ["results", "results/x-cpu.csv"]
    for step in ("first call", "verifying", "timing", "peak memory"):
        assert f"chunked n=64 fp32 fwd: {step}" in r.stderr
    header, line = r.stdout.splitlines()[:2]
    assert "verified" in header and " exact " in line


def test_cli_sweep_end_to_end(tmp_path):
    args = ["-m", "impl=naive,chunked", "seq_len=64,96", *TINY, "study=cli", f"results_dir={tmp_path}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "cli.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((x["impl"], x["seq_len"]) for x in rows) == [
        ("chunked", "64"),
        ("chunked", "96"),
        ("naive", "64"),
        ("naive", "96"),
    ]
    assert all(x["status"] == "ok" for x in rows), [x["reason"] for x in rows]


def test_a_multirun_with_repeats_is_one_interleaved_sweep_with_intervals(tmp_path):
    """The jobs of -m are measured together once Hydra has formed them: one table on the
    terminal, with the interval, and rows holding each repeat's median."""
    args = ["-m", "impl=naive,chunked", "seq_len=64", *TINY, "repeats=2", "study=rep", f"results_dir={tmp_path}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("95% CI ms") == 1 and r.stdout.count("results: ") == 1, r.stdout
    rows = read_rows(tmp_path / "rep.csv")
    assert [x["impl"] for x in rows] == ["naive", "chunked"], rows
    for x in rows:
        assert x["status"] == "ok" and x["repeats"] == "2" and len(x["time_ms_repeats"].split()) == 2, x
        assert float(x["time_ms_ci_low"]) <= float(x["time_ms_median"]) <= float(x["time_ms_ci_high"]), x
        assert x["noise"], x


def test_multirun_jobs_get_the_predictive_guard(tmp_path):
    """Jobs of a -m sweep run one after another in one process and share the series'
    history: the last is skipped on the strength of what the first ones measured, not
    started (with isolate=false nothing would stop it before it ended, minutes later)."""
    args = ["-m", "impl=loop", "seq_len=128,256,65536", "heads=12", "head_dim=64", "window=64", "device=cpu"]
    args += ["job_timeout_s=3", "isolate=false", "min_reps=1", "max_reps=2", "warmup=0", "time_budget_s=0.05"]
    r = _cli([*args, "study=g", f"results_dir={tmp_path}"], tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / "g.csv")
    assert rows[0]["status"] == "ok" and len(rows) == 3, [x["reason"] for x in rows]
    # the last is predicted from the rows the earlier jobs measured (time or memory, by the
    # machine's speed); on a loaded machine the second is predicted over already, from n=128,
    # and the last then follows it. Either way the last never starts.
    assert rows[1]["status"] == "ok" or "from n=128" in rows[1]["reason"], rows[1]["reason"]
    after = "from n=" if rows[1]["status"] == "ok" else "already over it at seq_len=256"
    assert rows[2]["status"] == "skipped" and after in rows[2]["reason"], rows[2]["reason"]
    assert not rows[2]["time_ms_median"], rows[2]


def test_cli_internal_sweep_and_pattern_group(tmp_path):
    args = ["pattern=dilated", *TINY, "sweep.seq_len=[40,50]", "study='s_{device}'", f"results_dir={tmp_path}"]
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / "s_cpu.csv")
    assert [x["seq_len"] for x in rows] == ["40", "50"] and all(x["dilation"] == "2" for x in rows)
    assert "chunked" in r.stdout and "results:" in r.stdout


def test_ctrl_c_stops_cleanly(tmp_path):
    """An interrupt ends the run with a line, not a traceback, and takes the measuring child with it."""
    args = ["impl=loop", "seq_len=16384", "device=cpu", f"results_dir={tmp_path}"]
    # a terminal's Ctrl-C: SIGINT handled, even where this test's process ignores it
    # (started in the background by a non-interactive shell)
    p = subprocess.Popen([sys.executable, "-m", "attnbench", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)  # fmt: skip
    try:
        for line in p.stderr:  # wait until the child measures
            if "loop n=16384 fp32 fwd: first call" in line:
                break
        children = [c for c in _children(p.pid)]
        assert children, "no measuring child"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert all(not Path(f"/proc/{c}").exists() for c in children)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def test_every_config_group_composes():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from attnbench.__main__ import CONFIG_MODULE, GROUPS, _group_options, build_configs, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for group in GROUPS:
            for option in _group_options(group):
                c = compose("config", overrides=[f"{group}={option}", "device=cpu"])
                configs, _, _ = build_configs(OmegaConf.to_container(c, resolve=True))
                assert configs, (group, option)
    GlobalHydra.instance().clear()


def test_every_experiment_names_its_figure():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from attnbench.__main__ import CONFIG_MODULE, _group_options, build_configs, register_schema

    register_schema()
    GlobalHydra.instance().clear()
    figures = {}
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for option in _group_options("experiment"):
            c = compose("config", overrides=[f"experiment={option}", "device=cpu"])
            figures[option] = {x.figure for x in build_configs(OmegaConf.to_container(c, resolve=True))[0]}
    GlobalHydra.instance().clear()
    assert all(len(f) == 1 and f != {"auto"} for f in figures.values()), figures
    assert figures["scaling"] == figures["scaling_gqa"] == {"scaling"}
    assert figures["model"] == {"model"} and figures["breakdown"] == {"breakdown"}


def _run_task(tmp_path, **settings) -> None:
    """A run as the command line makes it, in this process (isolate=false: the
    implementations registered here measure)."""
    from omegaconf import OmegaConf

    from attnbench.__main__ import _task

    cfg = dict(window=8, heads=2, head_dim=16, device="cpu", time_budget_s=0.05, min_reps=2, max_reps=5,
               isolate=False, study="t", results_dir=str(tmp_path), row_files="false", resume=False)  # fmt: skip
    _task(OmegaConf.create({**cfg, "sweep": {}, **settings}))


def test_a_run_with_a_wrong_or_error_row_exits_1(tmp_path, throwaway, capsys):
    """After the table and the figure, one line names the wrong and error rows; status 1."""

    def boom(q, k, v, pattern, scale):
        raise RuntimeError("boom")

    import attnbench.__main__ as cli

    throwaway("off")  # returns q: wrong
    throwaway("boom", boom)
    cli._FAILED.clear()
    _run_task(tmp_path, seq_len=64, figure="scaling", sweep={"impl": ["chunked", "off", "boom"]})
    assert [r["impl"] for r in cli._FAILED] == ["off", "boom"]  # main() exits 1 for them
    cli._FAILED.clear()
    out, err = capsys.readouterr()
    assert [x["status"] for x in read_rows(tmp_path / "t.csv")] == ["ok", "wrong", "error"]
    assert "verified" in out.splitlines()[0] and f"figure: {tmp_path / 't.png'}" in out.splitlines()
    assert (tmp_path / "t.png").is_file()
    (line,) = [x for x in err.splitlines() if "rows failed" in x]  # (the progress bar's lines say attnbench: too)
    assert line == "attnbench: 2 of 3 rows failed: off n=64 fp32 fwd: wrong; boom n=64 fp32 fwd: error"


def test_a_sweep_with_a_failed_job_runs_every_job_then_exits_1(tmp_path, monkeypatch):
    """``-m``: a job with a wrong or error row does not stop the others; the command
    exits 1 once all have run."""
    import attnbench.__main__ as cli

    ran = []

    def task(cfg) -> None:
        ran.append(cfg.impl)
        if cfg.impl == "naive":
            cli._FAILED.append({"impl": cfg.impl, "status": "error"})

    monkeypatch.setattr(cli, "_task", task)
    monkeypatch.setattr(cli, "_FAILED", [])
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main()'s SIGTERM handler is not for pytest's process
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["attnbench", "-m", "impl=naive,chunked", "seq_len=64", f"results_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1 and ran == ["naive", "chunked"]


def test_a_run_with_skipped_rows_exits_0(tmp_path, throwaway, capsys):
    throwaway("plain", features=())  # no global tokens: skipped (unsupported)
    _run_task(tmp_path, impl="plain", seq_len=64, global_tokens=[0], figure="none")
    (row,) = read_rows(tmp_path / "t.csv")
    assert row["status"] == "skipped" and "unsupported" in row["reason"]
    assert "failed" not in capsys.readouterr().err


def test_cli_help_explains():
    r = subprocess.run([sys.executable, "-m", "attnbench", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "python -m attnbench experiment=scaling" in r.stdout and "seq_len" in r.stdout


# ---------------------------------------------------------------------- packaging
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _build_wheel(tmp_path: Path) -> tuple[Path, str]:
    """(the wheel built from a copy of the checkout, the build's verbose log)."""
    src = tmp_path / "src"  # what the package is built from, without an earlier build's leftovers
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("attnbench", "impls", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its notice is not ours
    built = subprocess.run([*PIP, "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
                            str(src)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "w").glob("attnbench-*.whl")
    return wheel, built.stdout + built.stderr


def test_installed_wheel_runs_from_any_folder(tmp_path):
    """The wheel holds the implementations and the configs inside the package (nothing
    top-level besides attnbench), and its command line runs outside the checkout."""
    wheel, _ = _build_wheel(tmp_path)
    pip = [*PIP, "-q"]
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["attnbench"]
    assert (site / "attnbench" / "impls" / "_banded.cu").is_file()
    assert (site / "attnbench" / "conf" / "pattern" / "sliding.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-m", "attnbench", "impl=chunked", "seq_len=512", "pattern=global", *TINY],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = read_rows(elsewhere / "results" / "default.csv")
    assert row["status"] == "ok" and row["pattern"] == "w8 g1"
    probe = "import attnbench, attnbench.impls; print(attnbench.__file__); print(attnbench.impls.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    assert attnbench.__file__  # the checkout's own stays importable here


def test_packaging_builds_without_warnings_and_ships_every_data_file(tmp_path):
    """No setuptools warning (a config group left out of the packages, the license's
    form), and every yaml, csv and cu file of conf/ and impls/ inside the wheel."""
    import zipfile

    wheel, log = _build_wheel(tmp_path)
    warnings = [line.strip() for line in log.splitlines() if "warn" in line.lower()]
    assert warnings == [], "\n".join(warnings)
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "conf").glob("*.csv"), *(ROOT / "impls").glob("*.cu")]
    want = {"attnbench/" + p.relative_to(ROOT).as_posix() for p in data}
    assert len(want) >= 20 and want <= names, sorted(want - names)


# ---------------------------------------------------------------------- the repository's tooling
def _make_pytest_lines(*args: str) -> list[str]:
    """The pytest commands ``make -n`` would run in the checkout."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if " -m pytest " in line]


def test_make_test_runs_what_pytest_args_names():
    """Without PYTEST_ARGS: the quick tier and the notebook, as CI runs them; with paths
    in it: those alone."""
    quick = '.venv/bin/python -m pytest -q -n 3 -m "not full"'
    assert _make_pytest_lines("test") == [f"{quick} tests", ".venv/bin/python -m pytest -q --nbmake notebooks"]
    assert _make_pytest_lines("test", "PYTEST_ARGS=tests/test_pattern.py -k x") == [
        f"{quick} tests/test_pattern.py -k x"
    ]
    full = _make_pytest_lines("test-full", "PYTEST_ARGS=tests/test_cli.py")
    assert full == [".venv/bin/python -m pytest -q -n auto --maxprocesses 4 tests/test_cli.py"]


def _tracked() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())


def test_scratch_results_are_ignored_by_git():
    _tracked()
    scratch = ["results/default.csv", "results/profiles/default/x/ops.csv", "runs/scaling-cpu.csv"]
    for path in scratch:
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    assert subprocess.run(["git", "check-ignore", "-q", "results/scaling-cpu.csv"], cwd=ROOT).returncode == 1


def test_readme_examples_leave_the_committed_results_alone():
    """Every ``python -m attnbench ...`` of the README writes a table git does not track
    (figures and profiles go beside it), and every plot or profile command redraws one.
    Figure captions (lines in italics) name the command that made a committed run."""
    import re

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from attnbench.__main__ import CONFIG_MODULE, _normalise, build_configs, register_schema
    from attnbench.tables import table_path

    tracked = _tracked()
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if not line.startswith("*")]
    commands = re.findall(r"python -m (attnbench(?:\.\w+)?)((?: +[^\s`#]+)*)", "\n".join(lines))
    written = []
    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        for module, rest in commands:
            args = rest.split()
            if module == "attnbench.plot":  # its figures go beside the table
                written.append((f"{module} {rest}", args[0]))
            elif module == "attnbench" and args[:1] != ["describe"] and "--help" not in args:
                keep = [_normalise(a) for a in args if a.split("=")[0] in ("study", "results_dir", "experiment")]
                d = OmegaConf.to_container(compose("config", overrides=[*keep, "device=cpu"]), resolve=True)
                written += [(f"{module} {rest}", str(table_path(c))) for c in build_configs(d)[0]]
    GlobalHydra.instance().clear()
    assert len({cmd for cmd, _ in written}) >= 10, written
    assert [(cmd, path) for cmd, path in written if path in tracked] == []


BAD_NAMES = [
    ("study=..", ["study='..'", "not starting with '.'", "results_dir="]),
    ("study=.", ["study='.'", "not starting with '.'", "results_dir="]),
    ("study=.hidden", ["study='.hidden'", "not starting with '.'", "results_dir="]),
    ("study=", ["study=''", "not empty"]),
    ("dtype=fp8", ["dtype='fp8'", "bf16"]),
]


@pytest.mark.parametrize("arg, words", BAD_NAMES, ids=[a for a, _ in BAD_NAMES])
def test_hidden_or_empty_study_names_are_refused(tmp_path, monkeypatch, arg, words):
    test_bad_setting_is_one_line_before_anything_runs(tmp_path, monkeypatch, arg, words)


def test_dtype_names_are_case_insensitive(tmp_path, monkeypatch):
    from attnbench.__main__ import precheck
    from attnbench.config import BenchConfig

    monkeypatch.chdir(tmp_path)
    for name in ("FP32", "Float32", "BF16", "AUTO"):
        assert precheck([f"dtype={name}", "device=cpu", f"results_dir={tmp_path / 'r'}"]) is None, name
    assert BenchConfig(dtype="FP32", device="cpu", seq_len=64).resolved().dtype == "fp32"
    assert BenchConfig(dtype="BFloat16").torch_dtype() == torch.bfloat16
    assert _written(tmp_path) == []


def test_sigterm_stops_with_a_line(tmp_path):
    """kill (SIGTERM) ends the run as Ctrl-C does: one line saying where the rows are,
    exit status 143, the measuring child gone."""
    args = ["impl=loop", "seq_len=16384", "device=cpu", f"results_dir={tmp_path}"]
    p = subprocess.Popen([sys.executable, "-m", "attnbench", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in p.stderr:  # wait until the child measures
            if "loop n=16384 fp32 fwd: first call" in line:
                break
        children = _children(p.pid)
        assert children, "no measuring child"
        p.terminate()
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 143 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last == "attnbench: stopped (SIGTERM); the rows measured so far are in the results table", err
    assert all(not Path(f"/proc/{c}").exists() for c in children)


def test_help_lists_every_setting_with_its_schema_default():
    """The defaults have one home, the dataclass: conf/config.yaml holds only Hydra's
    part, and --help lists each setting of RunConfig with the dataclass's default."""
    import yaml
    from omegaconf import OmegaConf

    from attnbench.config import RunConfig

    assert set(yaml.safe_load((ROOT / "conf" / "config.yaml").read_text())) == {"defaults", "hydra"}
    r = subprocess.run([sys.executable, "-m", "attnbench", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = set(r.stdout.splitlines())
    want = OmegaConf.to_yaml(OmegaConf.structured(RunConfig)).splitlines()
    assert len(want) == len(attnbench.config.SETTINGS)
    assert [line for line in want if line not in shown] == []


def test_describe_is_a_subcommand(tmp_path):
    r = _cli(["describe"], tmp_path)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["name", "available"] and "chunked" in r.stdout, r.stderr
    bad = _cli(["describe", "impl=naive"], tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip() == "attnbench: describe: unexpected argument 'impl=naive'; it takes none"
    assert _written(tmp_path) == []
