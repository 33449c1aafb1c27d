"""pytest-benchmark suite: each available implementation at a few sizes.

Not part of the default test run (it lives outside tests/). Run and compare:

    make benchmark                                   # saves .benchmarks/<machine>/NNNN_*.json
    pytest benchmarks --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

CUDA calls are synchronised inside the timed function: pytest-benchmark reads a
host clock. Every configuration is checked against the reference once, under the
verification policy (:func:`attnbench.verify.check_output`), before it is timed, so a
fast wrong kernel cannot post a time.
"""

from __future__ import annotations

import pytest
import torch

import attnbench
from attnbench import Pattern
from attnbench.verify import check_output

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SIZES = [1024, 4096] if DEVICE == "cpu" else [4096, 16384]
PATTERNS = {"w512": Pattern(512), "w512-g1": Pattern(512, global_tokens=(0,))}


def _impls() -> list[str]:
    """What runs here, less Triton's interpreter on a CPU (it measures Python, not the kernel)."""
    found = attnbench.available_impls(DEVICE, DTYPE)
    return [im.name for im in found if not (im.interpreted_on_cpu and DEVICE == "cpu")]


@pytest.mark.parametrize("pname", list(PATTERNS))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", _impls())
def test_forward(benchmark, impl, n, pname):
    pattern = PATTERNS[pname]
    im = attnbench.get_impl(impl)
    reasons = im.not_supported_reasons(pattern, device=DEVICE, dtype=DTYPE)
    if reasons:
        pytest.skip("; ".join(reasons))
    if im.dense and DEVICE == "cpu" and n > 2048:
        pytest.skip("dense attention at this n takes minutes on a CPU")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, n, 64, generator=g).to(DEVICE, DTYPE) for _ in range(3))
    rows = [0, n // 2, n - 1]
    with torch.no_grad():
        out = attnbench.attention(q, k, v, pattern, impl=impl)
    verdict = check_output(out, q, k, v, pattern, rows=rows)
    assert verdict.ok, f"{impl} is wrong here, not timing it: {verdict}"

    def call():
        with torch.no_grad():
            attnbench.attention(q, k, v, pattern, impl=impl)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), pattern=pname, threads=torch.get_num_threads())
    benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
