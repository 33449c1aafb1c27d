"""Shared test helpers: case lists, tolerances, comparison with the reference."""

from __future__ import annotations

import os

import pytest
import torch

import attnbench

DEVICE = "cuda" if os.environ.get("ATTNBENCH_TEST_DEVICE") == "cuda" else "cpu"

#: absolute slack added to 2x naive's error, per dtype
ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rand_qkv(B: int, H: int, n: int, D: int, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(B, H, n, D, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        out.append(t.requires_grad_(requires_grad))
    return out


def compare(out: torch.Tensor, ref: torch.Tensor, base_err: float, dtype: torch.dtype, what: str) -> None:
    """Assert max|out - ref| <= 2 * base_err + atol; the message has max and mean."""
    diff = (out.double() - ref.double()).abs()
    mx, mean = diff.max().item(), diff.mean().item()
    tol = 2 * base_err + ATOL[dtype]
    assert torch.isfinite(out).all(), f"{what}: non-finite values in the output"
    assert mx <= tol, (
        f"{what}: max abs diff {mx:.3e} > tol {tol:.3e} (mean abs diff {mean:.3e}, naive's max {base_err:.3e})"
    )


def impl_or_skip(name: str) -> attnbench.Impl:
    im = attnbench.get_impl(name)
    why = im.unavailable_reason()
    if why:
        pytest.skip(f"{name} unavailable here: {why}")
    if torch.device(DEVICE).type not in im.devices:
        pytest.skip(f"{name} does not run on {DEVICE} (declares {', '.join(im.devices)})")
    return im
