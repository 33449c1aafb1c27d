"""Break attnbench on purpose, one line at a time, and check that the tests notice.

    python scripts/mutation_check.py             # every mutation (a few minutes on 2 cores)
    python scripts/mutation_check.py window-wider gate-x100
    python scripts/mutation_check.py --list

Each mutation edits one line of a scratch copy of the repository (its tracked files)
and runs the tests that should catch it. First the same tests run on the unchanged
copy, which must pass: otherwise every mutation would look caught. Exit status 0 only
when every mutation is caught.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str  # replaced wherever it occurs (at least once)
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "reference-scale",
        "the reference alone uses 1/D for its default scale instead of 1/sqrt(D)",
        "attnbench/reference.py",
        "default_scale(D, scale)",
        "(1.0 / D if scale is None else scale)",
        ("tests/test_oracle.py", "tests/test_correctness.py", "-k", "oracle or reference or (chunked and n97)"),
    ),
    Mutation(
        "window-wider",
        "every window reaches one key further to the right",
        "attnbench/pattern.py",
        "return -self.left, self.right",
        "return -self.left, self.right + 1",
        ("tests/test_pattern.py", "tests/test_pattern_properties.py"),
    ),
    Mutation(
        "gate-x100",
        "the verification policy's tolerances are 100x wider",
        "attnbench/verify.py",
        "return FACTOR * control_max + ATOL[name], MEAN_FACTOR * control_mean + MEAN_ATOL[name]",
        "return 100 * (FACTOR * control_max + ATOL[name]), 100 * (MEAN_FACTOR * control_mean + MEAN_ATOL[name])",
        ("tests/test_verify.py", "tests/test_engine.py", "-k", "boundary or gate or scaling_error or bias"),
    ),
    Mutation(
        "fp32-x1.001",
        "chunked's fp32 output is 0.1% too large",
        "impls/chunked.py",
        "        out = out.index_copy(2, glob, og)\n    return out",
        "        out = out.index_copy(2, glob, og)\n    return out * 1.001 if out.dtype == torch.float32 else out",
        ("tests/test_correctness.py", "-k", "chunked and float32"),
    ),
    Mutation(
        "bf16-x1.01",
        "chunked's bf16 output is 1% too large",
        "impls/chunked.py",
        "        out = out.index_copy(2, glob, og)\n    return out",
        "        out = out.index_copy(2, glob, og)\n"
        "    return (out.float() * 1.01).to(out.dtype) if out.dtype == torch.bfloat16 else out",
        ("tests/test_correctness.py", "-k", "chunked and bfloat16"),
    ),
]


def scratch_copy(dest: Path) -> Path:
    """The repository's files (tracked, or new and not ignored), copied to ``dest``."""
    cmd = ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(cmd, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, float]:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    r = subprocess.run(cmd, cwd=copy, capture_output=True, text=True)
    return r.returncode, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to try (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    a = ap.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if a.list:
        for m in MUTATIONS:
            print(f"{m.name:16s} {m.what}")
        return 0
    unknown = [n for n in a.names if n not in known]
    if unknown:
        print(f"mutation_check: unknown mutation(s) {unknown}; choose from: {', '.join(known)}", file=sys.stderr)
        return 2
    chosen = [known[n] for n in a.names] or MUTATIONS
    missed = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="attnbench-mutant-") as tmp:
            copy = scratch_copy(Path(tmp))
            rc, secs = run_tests(copy, m.tests)
            if rc != 0:
                print(f"{m.name:16s} CANNOT CHECK: its tests fail without the mutation (exit {rc})")
                missed.append(m.name)
                continue
            target = copy / m.path
            text = target.read_text()
            if m.old not in text:
                print(f"{m.name:16s} CANNOT APPLY: {m.path} no longer has the line it changes")
                missed.append(m.name)
                continue
            target.write_text(text.replace(m.old, m.new))
            rc, secs = run_tests(copy, m.tests)
            verdict = "caught" if rc == 1 else "MISSED" if rc == 0 else f"broke the tests (exit {rc})"
            print(f"{m.name:16s} {verdict:8s} in {secs:4.0f} s  ({m.what})", flush=True)
            if rc == 0:
                missed.append(m.name)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught" + (f"; not: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
