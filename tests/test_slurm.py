"""Cluster sweeps on a real SLURM cluster: the single-node one of scripts/slurm_local.sh.

Skipped, with the reason, where no such cluster runs; CI starts one (.ci/run) and sets
ATTNBENCH_REQUIRE_SLURM=1, so that there these tests fail instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench.tables import read_row_files, read_rows, row_file_paths

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
TINY = ["window=8", "heads=2", "head_dim=16", "device=cpu", "time_budget_s=0.05", "isolate=false"]
#: the CPU-sized launcher overrides of docs/cluster.md: no GPU, one core and 1 GB a job
CPU_JOBS = ["hydra/launcher=attnbench_slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]  # fmt: skip


def _cluster() -> str | None:
    """Why there is no cluster to test against, or None."""
    try:
        r = subprocess.run([str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"cannot run {SCRIPT.name}: {e}"
    return None if r.returncode == 0 else "no local SLURM cluster up (scripts/slurm_local.sh start, as root)"


_WHY = _cluster()
if _WHY and os.environ.get("ATTNBENCH_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"ATTNBENCH_REQUIRE_SLURM=1 but {_WHY}")
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_WHY is not None, reason=_WHY or ""),
    pytest.mark.skipif(sys.platform != "linux", reason="the local cluster is Linux only"),
]
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")


def _sweep(tmp_path: Path, *args: str, background: bool = False):
    cmd = [sys.executable, "-m", "attnbench", "-m", *args, *TINY, *CPU_JOBS, "study=sl",
           f"results_dir={tmp_path / 'results'}", f"hydra.sweep.dir={tmp_path / 'multirun'}"]  # fmt: skip
    if background:
        return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _merge(tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attnbench.merge", "sl", "--results-dir", str(tmp_path / "results")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_sweep_on_slurm_merges_into_the_study(tmp_path):
    r = _sweep(tmp_path, "impl=naive,chunked", "seq_len=64,96")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Bypassing sacct" not in r.stdout + r.stderr  # job states come from accounting, quietly
    assert len(row_file_paths(tmp_path / "results" / "sl.rows")) == 4
    merged = _merge(tmp_path)
    assert merged.returncode == 0 and "4 rows" in merged.stdout and "no row yet" not in merged.stdout, merged.stdout
    rows = read_rows(tmp_path / "results" / "sl.csv")
    assert sorted((x["impl"], x["seq_len"], x["status"]) for x in rows) == [
        ("chunked", "64", "ok"), ("chunked", "96", "ok"), ("naive", "64", "ok"), ("naive", "96", "ok"),
    ]  # fmt: skip
    # each job's stdout and stderr where docs/cluster.md says: <sweep dir>/.submitit/<job id>/
    logs = sorted((tmp_path / "multirun" / ".submitit").glob("*_*/*_log.err"))
    assert len(logs) == 4 and all((p.with_suffix(".out")).is_file() for p in logs)
    assert any("chunked n=64 fp32 fwd: verifying" in p.read_text() for p in logs)


def test_a_cancelled_job_is_reported_missing_and_resumed(tmp_path):
    """One job cancelled while it runs: the others complete, the merge lists what is
    missing, and resume=true measures that alone."""
    sweep = _sweep(tmp_path, "impl=chunked,loop", "seq_len=64,4096", background=True)
    cancelled = None
    try:
        end = time.time() + 120
        while cancelled is None and time.time() < end and sweep.poll() is None:
            # loop at 4096 is job #3 of this sweep: <sweep dir>/.submitit/<array id>_3 once submitted
            mine = [p.name for p in (tmp_path / "multirun" / ".submitit").glob("*_3")]
            queue = subprocess.run(["squeue", "-h", "-o", "%i %t"], capture_output=True, text=True).stdout.split("\n")
            if mine and f"{mine[0]} R" in queue:
                cancelled = mine[0]
                subprocess.run(["scancel", cancelled], check=True)
            time.sleep(0.5)
        out, err = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert cancelled, "job #3 never ran"
    assert sweep.returncode == 1 and "CANCELLED" in err and "Traceback" not in err, err[-3000:]
    assert "resume=true" in err
    done = {(r["impl"], r["seq_len"]) for r in read_row_files(tmp_path / "results" / "sl.rows")}
    assert done == {("chunked", "64"), ("chunked", "4096"), ("loop", "64")}
    merged = _merge(tmp_path)
    assert "1 planned configuration(s) have no row yet" in merged.stdout, merged.stdout
    assert "impl=loop seq_len=4096" in merged.stdout

    before = set(row_file_paths(tmp_path / "results" / "sl.rows"))
    again = _sweep(tmp_path, "impl=chunked,loop", "seq_len=64,4096", "resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    new = set(row_file_paths(tmp_path / "results" / "sl.rows")) - before
    assert [(r["impl"], r["seq_len"]) for p in new for r in read_rows(p)] == [("loop", "4096")]
    merged = _merge(tmp_path)
    assert "4 rows" in merged.stdout and "no row yet" not in merged.stdout, merged.stdout
