"""Every command the README shows runs as documented, on a fresh copy of the repository's
committed tables: the study commands at a tiny size (the same settings, shrunk), in the
order each block gives them, so a later line reads what an earlier one wrote."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("hydra") is None, reason="hydra-core is not installed: the command line needs it"
)
#: settings shrunk to a tiny size wherever a command gives them
TINY = {"seq_len": "64", "heads": "2", "kv_heads": "1", "head_dim": "16"}
#: added to every measuring command: a tiny, quick run of one implementation per study
QUICK = ["device=cpu", "min_reps=1", "max_reps=1", "warmup=0", "time_budget_s=0.05"]


def _blocks() -> list[list[str]]:
    """The ``python -m attnbench...`` lines of each README shell block, comments removed."""
    out, block, fence = [], None, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block, fence = [], line[3:].strip()
            else:
                if fence in ("bash", "sh", "") and block:
                    out.append(block)
                block = None
        elif block is not None:
            cmd = line.split("  #")[0].strip()
            if cmd.startswith("python -m attnbench") and "<" not in cmd:
                block.append(cmd)
    return out


def _tiny(line: str) -> list[str]:
    """The command's arguments at a tiny size."""
    args = shlex.split(line)[2:]  # after "python -m"
    module, rest = args[0], args[1:]
    if module != "attnbench" or any(a in ("--help", "-h", "describe") for a in rest):
        return args
    shrunk = []
    for a in rest:
        key, _, value = a.partition("=")
        if key in TINY:
            a = f"{key}={TINY[key]}"
        shrunk.append(a)
    extra = list(QUICK)
    if any(a.startswith("experiment=") for a in rest):  # a study: its grid at one small length, one implementation
        extra += ["sweep.seq_len=[64]", "sweep.impl=[naive,chunked]", "heads=8", "head_dim=16", "window=8"]
    if not any(a.startswith("seq_len=") for a in shrunk):
        extra.append("seq_len=64")
    extra += [f"{k}={v}" for k, v in TINY.items() if k in ("heads", "head_dim") and not any(
        a.startswith(f"{k}=") for a in shrunk + extra)]  # fmt: skip
    return ["attnbench", *dict.fromkeys(shrunk + extra)]


BLOCKS = _blocks()


def _studies() -> list[list[str]]:
    """The study commands (``experiment=``/``study=``) of each block, each with the lines
    after it that read what it wrote (``attnbench.plot``, ``attnbench.profile``)."""
    out = []
    for block in BLOCKS:
        for i, line in enumerate(block):
            if re.search(r"\b(experiment|study)=", line):
                readers = [ln for ln in block[i + 1 :] if not ln.startswith("python -m attnbench ")]
                out.append([line, *readers])
    return [s for s in out if not any(o != s and o[: len(s)] == s for o in out)]  # the longest of each


STUDIES = _studies()


def _run_all(tmp_path: Path, lines: list[str], quick: list[str] = ()) -> None:
    shutil.copytree(ROOT / "results", tmp_path / "results", ignore=shutil.ignore_patterns("profiles"))
    before = {p.name: p.stat().st_size for p in (tmp_path / "results").glob("*.csv")}
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    for line in lines:
        args = _tiny(line)
        if args[0] == "attnbench" and "=" in " ".join(args):
            args += quick
        r = subprocess.run(
            [sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
        )
        assert r.returncode == 0, f"{line}\n  ran as: {' '.join(args)}\n  exit {r.returncode}: {r.stderr[-2000:]}"
    for name, size in before.items():  # a committed table is only ever appended to
        assert (tmp_path / "results" / name).stat().st_size >= size, name


def test_the_readme_shows_its_studies():
    assert sum(map(len, BLOCKS)) >= 10 and len(STUDIES) >= 3, (BLOCKS, STUDIES)


def _study_param(lines: list[str]):
    """A study's lines as a test case; the model studies (Hugging Face models built and
    verified per job, about two minutes each here) are in the full tier."""
    name = lines[0].split("experiment=")[-1].split()[0]
    return pytest.param(lines, id=name, marks=[pytest.mark.full] if name.startswith("model") else [])


@pytest.mark.parametrize("lines", [_study_param(s) for s in STUDIES])
def test_readme_study_commands_run_as_documented(tmp_path, lines):
    """Each study command, tiny, measured in this process (``isolate=false``: the same
    pipeline without a child per job, to keep the quick tier quick)."""
    _run_all(tmp_path, lines, quick=["isolate=false"])


@pytest.mark.full
@pytest.mark.parametrize("block", range(len(BLOCKS)), ids=[b[0][:60] for b in BLOCKS])
def test_every_readme_command_runs_as_documented(tmp_path, block):
    _run_all(tmp_path, BLOCKS[block])
