"""Sweeps across processes and machines: row files, merge, resume, submitit launchers."""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnbench.config import BenchConfig
from attnbench.merge import find_sources, merge
from attnbench.merge import main as merge_main
from attnbench.results import columns, identity
from attnbench.sweep import sweep
from attnbench.tables import append_row, read_row_files, read_rows, row_file_paths, rows_dir, write_row_file

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
TINY = ["window=8", "heads=2", "head_dim=16", "device=cpu", "time_budget_s=0.05", "min_reps=2", "max_reps=5"]
NO_SUBMITIT = "hydra-submitit-launcher is not installed (pip install -e '.[cluster]')"


def need_submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=NO_SUBMITIT)
    pytest.importorskip("submitit", reason=NO_SUBMITIT)


def cfg(tmp_path, **kw) -> BenchConfig:
    base = dict(seq_len=64, window=8, heads=2, head_dim=16, device="cpu", time_budget_s=0.05, min_reps=2, max_reps=5)
    base.update(results_dir=str(tmp_path), study="t", isolate=False, impl="chunked")
    base.update(kw)
    return BenchConfig(**base)


def fake_row(seq_len: int, host: str = "h0", device_name: str = "GPU A", when: str = "2030-01-01T00:00:00+00:00", **kw):
    """A complete result row without measuring anything."""
    row = dict.fromkeys(columns(), "")
    row.update(
        study="c",
        impl="chunked",
        pattern="w8",
        window=8,
        dilation="1",
        causal=False,
        global_tokens=0,
        batch=1,
        heads=2,
        seq_len=seq_len,
        head_dim=16,
        dtype="fp32",
        device="cuda",
        device_name=device_name,
        mode="fwd",
        status="ok",
        time_ms_median=1.5,
        torch_version="2.6.0",
        host=host,
        timestamp=when,
    )
    row.update(kw)
    return row


def _cli(args, cwd, module="attnbench"):
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def schema():
    """Hydra knows attnbench's schema (the configs' defaults list names it), whatever ran before."""
    from hydra.core.global_hydra import GlobalHydra

    from attnbench.__main__ import register_schema

    register_schema()
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def _outcomes(rows):
    return sorted((identity(r)[1:], r["status"]) for r in rows)  # [1:]: any study


# ---------------------------------------------------------------------- submitit, end to end
def test_submitit_local_sweep_matches_basic_launcher(tmp_path):
    """The same multirun through the basic launcher (in-process, appending to the table)
    and through submitit_local (a process per job, row files, then merge): same rows."""
    need_submitit()
    # isolate=false: the jobs are processes of their own already; a child per measurement adds little here
    sweep_args = [
        "-m",
        "impl=naive,chunked",
        "seq_len=64,96",
        *TINY,
        "isolate=false",
        f"results_dir={tmp_path / 'res'}",
    ]
    basic = _cli([*sweep_args, "study=basic"], tmp_path)
    assert basic.returncode == 0, basic.stderr
    local = _cli([*sweep_args, "study=cluster", "hydra/launcher=submitit_local"], tmp_path)
    assert local.returncode == 0, local.stderr + local.stdout
    res = tmp_path / "res"
    assert not (res / "cluster.csv").exists(), "under submitit, row_files=auto writes row files, not the table"
    files = row_file_paths(res / "cluster.rows")
    assert len(files) == 4, files
    pids = {f.name.rsplit("-", 2)[1] for f in files}
    assert len(pids) == 4, "each job ran in its own process"
    merged = _cli(["cluster", "--results-dir", str(res)], tmp_path, module="attnbench.merge")
    assert merged.returncode == 0, merged.stderr
    assert "4 rows" in merged.stdout
    want, got = read_rows(res / "basic.csv"), read_rows(res / "cluster.csv")
    assert _outcomes(got) == _outcomes(want) and all(r["status"] == "ok" for r in got), [r["reason"] for r in got]
    with open(res / "cluster.csv") as f:
        assert f.readline().strip().split(",") == columns()  # the table plots and notebooks read
    assert all(r["host"] and r["device_name"] for r in got)
    # merging again changes nothing
    merge(["cluster"], results_dir=res, log=lambda *_: None)
    assert _outcomes(read_rows(res / "cluster.csv")) == _outcomes(want)


def test_launcher_configs_compose(schema):
    need_submitit()
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        local = compose("config", overrides=["hydra/launcher=attnbench_local"], return_hydra_config=True)
        assert local.hydra.launcher._target_.endswith("LocalLauncher")
        assert local.hydra.launcher.gpus_per_node == 1  # submitit_local alone hides the GPUs
        slurm = compose("config", overrides=["hydra/launcher=attnbench_slurm"], return_hydra_config=True)
        ln = slurm.hydra.launcher
        assert ln._target_.endswith("SlurmLauncher")
        assert (ln.gpus_per_node, ln.tasks_per_node, ln.nodes, ln.partition) == (1, 1, 1, None)
        assert ln.cpus_per_task and ln.timeout_min and ln.mem_gb


def test_slurm_launcher_renders_sbatch(tmp_path, monkeypatch, schema):
    """Through the launcher plugin's own code up to submission: the sbatch script it
    would submit has the GPU, partition and time settings given on the command line."""
    need_submitit()
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    # submitit looks for srun to believe it is on a SLURM cluster
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bindir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    scripts = []

    def capture(self, fn, *iterables):
        ex = self._executor
        ex.parameters["map_count"] = len(iterables[0])
        scripts.append(ex._make_submission_file_text(ex._submitit_command_str, "uid"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    overrides = [
        "hydra/launcher=attnbench_slurm",
        "hydra.launcher.partition=gpu-a100",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.account=proj42",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        c = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = instantiate(c.hydra.launcher)
    launcher.config, launcher.hydra_context, launcher.task_function = c, object(), print
    assert launcher.launch([["impl=naive"], ["impl=chunked"]], initial_job_idx=0) == []
    (text,) = scripts
    for line in [
        "#SBATCH --job-name=attnbench",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --nodes=1",
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --time=90",
        "#SBATCH --account=proj42",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --array=0-1%2",  # two jobs, at most array_parallelism at once
    ]:
        assert line in text.splitlines(), (line, text)


# ---------------------------------------------------------------------- row files, merge, resume
def test_row_files_then_resume_across_table_and_row_files(tmp_path):
    a, b, c, d = (cfg(tmp_path, seq_len=n) for n in (32, 48, 64, 80))
    assert len(sweep([a, b], row_files=True, progress=False)) == 2
    assert not (tmp_path / "t.csv").exists() and len(row_file_paths(rows_dir(a))) == 2
    # a resubmitted cluster sweep skips what its jobs finished ...
    assert [r["seq_len"] for r in sweep([a, b, c], resume=True, row_files=True, progress=False)] == [64]
    merge([str(rows_dir(a))], log=lambda *_: None)
    assert len(read_rows(tmp_path / "t.csv")) == 3
    # ... and so does a sweep appending to the merged table
    assert [r["seq_len"] for r in sweep([a, b, c, d], resume=True, progress=False)] == [80]
    assert len(read_rows(tmp_path / "t.csv")) == 4 and len(read_row_files(rows_dir(a))) == 3


def test_row_files_auto_means_inside_submitit(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    sweep([cfg(tmp_path, seq_len=32)], row_files="auto", progress=False)
    assert len(read_rows(tmp_path / "t.csv")) == 1 and not rows_dir(cfg(tmp_path)).exists()
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    sweep([cfg(tmp_path, seq_len=48)], row_files="auto", progress=False)
    assert len(read_rows(tmp_path / "t.csv")) == 1 and len(read_row_files(rows_dir(cfg(tmp_path)))) == 1
    with pytest.raises(ValueError, match="row_files='maybe'"):
        sweep([cfg(tmp_path)], row_files="maybe", progress=False)


def test_merge_cli_targets_and_out(tmp_path, capsys):
    res = tmp_path / "results"
    for study, dev in (("scaling-cuda-a100", "A100"), ("scaling-cuda-h100", "H100")):
        for n in (64, 128):
            write_row_file(res / f"{study}.rows", fake_row(n, study=study, device_name=dev))
    append_row(res / "scaling-cuda-a100.csv", fake_row(64, study="scaling-cuda-a100", device_name="A100"))
    assert {s.table.name for s in find_sources(["scaling-*"], res)} == {
        "scaling-cuda-a100.csv",
        "scaling-cuda-h100.csv",
    }
    r = _cli(["scaling-*", "--results-dir", str(res)], tmp_path, module="attnbench.merge")
    assert r.returncode == 0, r.stderr
    assert len(read_rows(res / "scaling-cuda-a100.csv")) == 2 and len(read_rows(res / "scaling-cuda-h100.csv")) == 2
    # the rest in this process: a rows folder and a table, into one table
    assert (
        merge_main(
            [str(res / "scaling-cuda-a100.rows"), str(res / "scaling-cuda-h100.csv"), "--out", str(res / "all.csv")]
        )
        == 0
    )
    assert sorted((x["device_name"], x["seq_len"]) for x in read_rows(res / "all.csv")) == [
        ("A100", "128"),
        ("A100", "64"),
        ("H100", "128"),
        ("H100", "64"),
    ]
    assert merge_main(["scaling-cuda-h100", "--results-dir", str(res), "--clean"]) == 0
    assert not (res / "scaling-cuda-h100.rows").exists() and len(read_rows(res / "scaling-cuda-h100.csv")) == 2
    assert (
        "scaling-cuda-h100.csv: 2 rows (2 already in the table, 2 row files; 2 duplicates dropped)"
        in capsys.readouterr().out
    )
    assert merge_main(["nothing-here", "--results-dir", str(res)]) == 2
    assert "nothing-here: no results found" in capsys.readouterr().err


# ---------------------------------------------------------------------- concurrent writers
N_PROCS, N_ROWS = 4, 25


def _writer(mode: str, table: str, rows: str, proc: int, barrier) -> None:
    barrier.wait()
    for i in range(N_ROWS):
        # a long reason makes each row larger than one write() of a pipe or page
        row = fake_row(
            1000 * proc + i, host=f"h{proc}", reason="x" * 6000, timestamp=dt.datetime.now(dt.timezone.utc).isoformat()
        )
        if mode == "append_row" or (mode == "mixed" and proc % 2):
            append_row(table, row)
        else:
            write_row_file(rows, row)


@pytest.mark.parametrize("mode", ["append_row", "row_files", "mixed"])
def test_concurrent_writers_lose_and_duplicate_nothing(tmp_path, mode):
    """4 processes x 25 rows at once, into the table (locked appends), into row files, or
    both, with merges running meanwhile in mixed mode: every row once, none torn."""
    table, rows = tmp_path / "c.csv", tmp_path / "c.rows"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(N_PROCS)
    procs = [ctx.Process(target=_writer, args=(mode, str(table), str(rows), p, barrier)) for p in range(N_PROCS)]
    for p in procs:
        p.start()
    if mode == "mixed":
        while any(p.is_alive() for p in procs):
            with contextlib.suppress(FileNotFoundError):  # nothing written yet
                merge([str(table)], log=lambda *_: None)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    if mode != "append_row":
        merge([str(table)], log=lambda *_: None)
    got = read_rows(table)
    ids = [(r["host"], int(r["seq_len"])) for r in got]
    assert len(ids) == len(set(ids)) == N_PROCS * N_ROWS
    assert set(ids) == {(f"h{p}", 1000 * p + i) for p in range(N_PROCS) for i in range(N_ROWS)}
    assert all(r["status"] == "ok" and r["reason"] == "x" * 6000 and r["timestamp"] for r in got)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]  # no leftovers


def test_merge_lists_planned_configurations_without_a_row(tmp_path, capsys):
    """The plan a cluster sweep writes, against the rows that came back; auto and
    {device} in the plan are left to the row."""
    from attnbench.merge import missing, write_plan

    planned = [BenchConfig(impl="chunked", seq_len=n, window=8, heads=2, head_dim=16, study="s-{device}",
                           results_dir=str(tmp_path))
               for n in (64, 96)]  # fmt: skip
    (plan,) = write_plan(planned)
    assert plan.parent == tmp_path / "plans"
    write_row_file(tmp_path / "s-cpu.rows", fake_row(64, study="s-cpu", window=8, device="cpu"))
    absent = missing("s-cpu", tmp_path, read_row_files(tmp_path / "s-cpu.rows"))
    assert [(e["impl"], e["seq_len"]) for e in absent] == [("chunked", "96")]
    assert merge_main(["s-cpu", "--results-dir", str(tmp_path)]) == 0
    assert "1 planned configuration(s) have no row yet" in capsys.readouterr().out
