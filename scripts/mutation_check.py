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
        "  # (B, H, G, D)\n    return out",
        "  # (B, H, G, D)\n    return out * 1.001 if out.dtype == torch.float32 else out",
        ("tests/test_correctness.py", "-k", "chunked and float32"),
    ),
    Mutation(
        "bf16-x1.01",
        "chunked's bf16 output is 1% too large",
        "impls/chunked.py",
        "  # (B, H, G, D)\n    return out",
        "  # (B, H, G, D)\n    return (out.float() * 1.01).to(out.dtype) if out.dtype == torch.bfloat16 else out",
        ("tests/test_correctness.py", "-k", "chunked and bfloat16"),
    ),
    Mutation(
        "identity-dtype",
        "the identity of a measurement ignores dtype (resume, merge, latest confuse fp32 and bf16 rows)",
        "attnbench/results.py",
        '_config("dtype", show="dtype")',
        '_config("dtype", show="dtype", identity=False)',
        ("tests/test_blind_spots.py", "-k", "identity_changes_with_every_field"),
    ),
    Mutation(
        "grad-wrong-timed",
        "a row whose gradient failed verification goes on to be timed",
        "attnbench/measure.py",
        'raise Wrong(f"gradient {worst}", fields)',
        'log.warning("gradient %s", worst)',
        ("tests/test_blind_spots.py", "-k", "wrong_gradient_gets_no_time"),
    ),
    Mutation(
        "timer-seconds",
        "the CPU timing loop reports seconds as milliseconds",
        "attnbench/measure.py",
        "times.append((time.perf_counter() - t) * 1e3)",
        "times.append(time.perf_counter() - t)",
        ("tests/test_blind_spots.py", "-k", "reports_milliseconds"),
    ),
    Mutation(
        "fp32-floors-x10",
        "both fp32 tolerance floors (max and mean) 10x wider",
        "attnbench/verify.py",
        'ATOL = {"fp64": 1e-9, "fp32": 2e-5, "bf16": 1.6e-2, "fp16": 2e-3}\n'
        "#: its mean error may be this many times the control's ...\n"
        "MEAN_FACTOR = 1.5\n"
        "#: ... plus this floor\n"
        'MEAN_ATOL = {"fp64": 1e-11, "fp32": 2e-7, "bf16": 2e-5, "fp16": 5e-6}',
        'ATOL = {"fp64": 1e-9, "fp32": 2e-4, "bf16": 1.6e-2, "fp16": 2e-3}\n'
        "#: its mean error may be this many times the control's ...\n"
        "MEAN_FACTOR = 1.5\n"
        "#: ... plus this floor\n"
        'MEAN_ATOL = {"fp64": 1e-11, "fp32": 2e-6, "bf16": 2e-5, "fp16": 5e-6}',
        ("tests/test_blind_spots.py", "-k", "fp32_floors"),
    ),
    Mutation(
        "sampled-dv-rows",
        "the sampled gradient check compares dv on the sampled rows only, not on every key they reach",
        "attnbench/verify.py",
        "where = [torch.as_tensor(rows), reached.nonzero().flatten(), reached.nonzero().flatten()]",
        "where = [torch.as_tensor(rows), reached.nonzero().flatten(), torch.as_tensor(rows)]",
        ("tests/test_blind_spots.py", "-k", "sampled_gradients"),
    ),
    Mutation(
        "ratio-no-dtype",
        "the ratio table joins rows of different dtypes (an fp32 time over a bf16 one)",
        "attnbench/plot.py",
        '"device_name", "dtype", "mode", "pattern"',
        '"device_name", "mode", "pattern"',
        ("tests/test_blind_spots.py", "-k", "ratio_table"),
    ),
    Mutation(
        "bwd-flops-2",
        "the backward counts as 2 forwards (fwd_bwd 3), not 2.5 (3.5)",
        "attnbench/results.py",
        '"bwd": 2.5, "fwd_bwd": 3.5',
        '"bwd": 2.0, "fwd_bwd": 3.0',
        ("tests/test_blind_spots.py", "-k", "two_and_a_half or flops_of_a_tiny_pattern"),
    ),
    Mutation(
        "profile-self-us",
        "the profile's self times are 1000x too small (microseconds divided by 1e6 into 'ms')",
        "attnbench/profile.py",
        "self_us / 1e3",
        "self_us / 1e6",
        ("tests/test_blind_spots.py", "-k", "profile_self_time"),
    ),
    Mutation(
        "verdict-on-the-value",
        "a target passes when the ratio itself meets it, whatever its interval",
        "attnbench/stats.py",
        'return "pass" if low >= required else',
        'return "pass" if (low + high) / 2 >= required else',
        ("tests/test_stats.py", "-k", "decide or verdict"),
    ),
    Mutation(
        "repeats-not-interleaved",
        "each configuration's repeats run back to back (A A A B B B)",
        "attnbench/sweep.py",
        "groups.setdefault(_group_key(c), []).append(c)",
        "groups.setdefault((_group_key(c), c.impl), []).append(c)",
        ("tests/test_stats.py", "-k", "interleaves"),
    ),
    Mutation(
        "first-repeat-only",
        "a row keeps the first repeat's median instead of the median of the repeats",
        "attnbench/sweep.py",
        "time_ms_median=statistics.median(medians),",
        "time_ms_median=medians[0],",
        ("tests/test_stats.py", "-k", "combine"),
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
