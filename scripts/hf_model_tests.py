"""Hugging Face's own Longformer and LED model tests, unpatched and with every model patched.

    python scripts/hf_model_tests.py --transformers-tests PATH --impl chunked --impl naive -- -n 8

PATH is a transformers source checkout matching the installed transformers (its ``tests/``
and top-level ``conftest.py``). Its Longformer and LED test modules run once unpatched and
once per ``--impl`` with every model they build patched by :func:`attnbench.hf.patch`
right after construction (``PreTrainedModel.post_init``: ``__init__``, ``from_pretrained``,
``from_config``; copies and pickles keep the patch). Printed: the outcome counts of each
run, every test that passes unpatched but fails patched (the first line of its error,
and whether it is one of the patch's documented refusals), and the self-attention layer
calls: through attnbench, and through Hugging Face's own forward (none in a patched run),
and how long each run took.
``--no-attention-dropout`` sets every Longformer / LED self-attention's dropout to 0 in
both runs, so that the training tests reach attnbench instead of its refusal.

The same file is the pytest plugin the runs load (``-p hf_model_tests``), configured by
the environment: ATTNBENCH_HF_IMPL (empty: unpatched), ATTNBENCH_HF_OUT (a folder for the
results), ATTNBENCH_HF_NO_DROPOUT.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

MODULES = ("tests/models/longformer/test_modeling_longformer.py", "tests/models/led/test_modeling_led.py")
REFUSALS = {  # a fragment of attnbench's error -> the documented refusal it is
    "output_attentions=True": "refusal: output_attentions",
    "attention dropout in training mode": "refusal: attention dropout in training",
    "need an implementation with key masks": "refusal: implementation without key masks",
    # the implementation's own, for this call on this machine (e.g. flex's backward on CPU)
    "cannot run this call": "refusal: unsupported by the implementation here (UnsupportedError)",
}

# ---------------------------------------------------------------------- the pytest plugin
_CALLS: collections.Counter = collections.Counter()  # (test, "attnbench" | "hf") -> layer calls
_TEST = ["(outside tests)"]
_OUTCOMES: dict[str, dict] = {}


def _counting(forward, kind: str):
    @functools.wraps(forward)
    def counted(self, *args, **kwargs):
        _CALLS[(_TEST[0], kind)] += 1
        return forward(self, *args, **kwargs)

    return counted


def pytest_configure(config):
    import transformers

    import attnbench.hf as hf

    impl, no_dropout = os.environ.get("ATTNBENCH_HF_IMPL", ""), bool(os.environ.get("ATTNBENCH_HF_NO_DROPOUT"))
    for base, sub in hf._PATCHED.items():  # a patched layer runs sub.forward, never base.forward
        base.forward = _counting(base.forward, "hf")
        sub.forward = _counting(sub.forward, "attnbench")
    post_init = transformers.PreTrainedModel.post_init

    @functools.wraps(post_init)
    def patched_post_init(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        for layer in hf.patched_layers(self) if no_dropout else ():
            layer.dropout = 0.0
        if impl and hf.patched_layers(self):
            hf.patch(self, impl=impl)

    transformers.PreTrainedModel.post_init = patched_post_init


def pytest_runtest_logstart(nodeid, location):
    _TEST[0] = nodeid


def pytest_runtest_setup(item):
    """The same random inputs for a test in every run (Hugging Face's are unseeded): only the patch differs."""
    import numpy
    import torch

    seed = zlib.crc32(item.nodeid.encode())
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    for name, module in list(sys.modules.items()):
        if name.endswith("test_modeling_common") and isinstance(getattr(module, "global_rng", None), random.Random):
            module.global_rng.seed(seed)


def pytest_runtest_logreport(report):
    """A test's outcome over its phases and subtests: failed if any failed (the first
    error kept); skipped if the test itself was (a skipped subtest does not skip it)."""
    seen = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "error": ""})
    subtest = getattr(report, "context", None) is not None  # pytest's SubtestReport
    if report.failed and seen["outcome"] != "failed":
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
        seen.update(outcome="failed", error=(text.strip().splitlines() or [""])[0][:300])
    elif report.skipped and not subtest and seen["outcome"] == "passed":
        seen["outcome"] = "skipped"


def pytest_unconfigure(config):
    out = os.environ.get("ATTNBENCH_HF_OUT")
    if not out:
        return
    import attnbench.hf as hf

    calls = {"layers": [[t, k, n] for (t, k), n in _CALLS.items()], "attention": sum(hf.CALLS.values())}
    (Path(out) / f"calls-{os.getpid()}.json").write_text(json.dumps(calls))
    if not hasattr(config, "workerinput"):  # the controller (or the only process) saw every report
        (Path(out) / "outcomes.json").write_text(json.dumps(_OUTCOMES))


# ---------------------------------------------------------------------- the runs and the table
def run(root: Path, impl: str, pytest_args: list[str], no_dropout: bool, save: Path | None) -> dict:
    """One pytest run of MODULES in ``root``: outcomes by test, layer calls by test and kind."""
    with tempfile.TemporaryDirectory() as out:
        path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "ATTNBENCH_HF_IMPL": impl, "ATTNBENCH_HF_OUT": out, "PYTHONPATH": path}
        env.setdefault("HF_HUB_OFFLINE", "1")  # no downloads: tests needing the Hub fail or skip alike
        env.update({"ATTNBENCH_HF_NO_DROPOUT": "1"} if no_dropout else {})
        cmd = [sys.executable, "-m", "pytest", "-p", "hf_model_tests", "-p", "no:cacheprovider", "-q", *MODULES]
        name = impl or "unpatched"
        print(f"== {name}: {' '.join(cmd[1:] + pytest_args)}", flush=True)
        if save:
            save.mkdir(parents=True, exist_ok=True)
        log = save / f"{name}.log" if save else Path(os.devnull)  # pytest's own output
        start = time.monotonic()
        with open(log, "w") as stdout:
            subprocess.run(cmd + pytest_args, cwd=root, env=env, stdout=stdout, stderr=subprocess.STDOUT, check=False)
        print(f"   {time.monotonic() - start:.0f} s", flush=True)
        if not (Path(out) / "outcomes.json").is_file():
            raise SystemExit(f"{name}: pytest stopped before any outcome; its output: {log}")
        outcomes = json.loads((Path(out) / "outcomes.json").read_text())
        calls: collections.Counter = collections.Counter()
        attention = 0
        for f in Path(out).glob("calls-*.json"):
            data = json.loads(f.read_text())
            attention += data["attention"]
            calls.update({(t, k): n for t, k, n in data["layers"]})
    if save:
        for (t, k), n in calls.items():
            outcomes.setdefault(t, {}).setdefault("calls", {})[k] = n
        (save / f"{name}.json").write_text(json.dumps(outcomes, indent=1, sort_keys=True))
    return {"outcomes": outcomes, "calls": calls, "attention": attention}


def category(error: str) -> str:
    return next((what for key, what in REFUSALS.items() if key in error), "NOT a documented refusal")


def report(base: dict, impl: str, patched: dict) -> int:
    """Print the comparison; return the number of regressions that are not documented refusals."""
    for name, r in (("unpatched", base), (impl, patched)):
        counts = collections.Counter(o["outcome"] for o in r["outcomes"].values())
        hf_calls = sum(n for (_, k), n in r["calls"].items() if k == "hf")
        ab_calls = sum(n for (_, k), n in r["calls"].items() if k == "attnbench")
        print(f"{name:>10}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
              f"self-attention layer calls: {ab_calls} attnbench ({r['attention']} attention calls), "
              f"{hf_calls} Hugging Face's")  # fmt: skip
    regressions = sorted(
        t for t, o in patched["outcomes"].items()
        if o["outcome"] == "failed" and base["outcomes"].get(t, {}).get("outcome") == "passed"
    )  # fmt: skip
    bugs = 0
    kinds = collections.Counter(category(patched["outcomes"][t]["error"]) for t in regressions)
    print(f"passed unpatched, failed with {impl}: {len(regressions)}"
          + "".join(f"; {n} {what}" for what, n in sorted(kinds.items())))  # fmt: skip
    for t in regressions:
        error = patched["outcomes"][t]["error"]
        bugs += category(error).startswith("NOT")
        print(f"  {t.split('::', 1)[1]}\n      [{category(error)}] {error}")
    fixed = [t for t, o in patched["outcomes"].items() if o["outcome"] == "passed"
             and base["outcomes"].get(t, {}).get("outcome") == "failed"]  # fmt: skip
    print(f"failed unpatched, passed with {impl}: {len(fixed)}" + "".join(f"\n  {t}" for t in sorted(fixed)))
    escaped = sorted({t for (t, k), n in patched["calls"].items() if k == "hf" and n})
    print(f"tests where a self-attention layer ran Hugging Face's forward with {impl}: {len(escaped)}")
    for t in escaped:
        print(f"  {t}")
    return bugs + len(escaped)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transformers-tests", type=Path, required=True, help="a transformers source checkout")
    ap.add_argument("--impl", action="append", help="attnbench implementation(s) to patch with (default: chunked)")
    ap.add_argument("--no-attention-dropout", action="store_true", help="attention dropout 0 in every run")
    ap.add_argument("--save", type=Path, help="a folder for each run's outcomes and pytest output (<impl>.json, .log)")
    ap.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --), e.g. -n 8 or -k expr")
    args = ap.parse_args()
    root = args.transformers_tests.resolve()
    if not all((root / m).is_file() for m in MODULES):
        ap.error(f"{root} lacks {' or '.join(MODULES)}")
    base = run(root, "", args.pytest_args, args.no_attention_dropout, args.save)
    bad = 0
    for impl in args.impl or ["chunked"]:
        bad += report(base, impl, run(root, impl, args.pytest_args, args.no_attention_dropout, args.save))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
