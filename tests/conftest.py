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


# ---------------------------------------------------------------- sharding
# ATTNBENCH_SHARD="i/N" keeps the i-th of N disjoint parts of the collected tests, so
# that N pytest processes can share a machine (gpu_check runs the CUDA suite that way:
# the time goes into compiling kernels, one CPU core per process).

#: implementations whose compiled kernels serve every shape of one head_dim and dtype:
#: their tests are kept together by (implementation, head_dim, dtype), so that two
#: shards do not compile the same kernels (FlexAttention compiles per shape anyway)
_SHARED_KERNELS = {"triton"}


def _shard_key(item: pytest.Item) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {})
    impl, case, dtype = params.get("impl"), params.get("case"), params.get("dtype")
    if impl in _SHARED_KERNELS and case is not None:
        return f"{impl}|{case.D}|{dtype}"
    return item.nodeid


def shard_items(items: list, index: int, count: int) -> list:
    """The ``index``-th of ``count`` parts of ``items``: groups of equal key, largest
    first, each to the part with the fewest tests so far. Deterministic, so every
    process computes the same split from the same collection."""
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(_shard_key(it), []).append(it)
    load = [0] * count
    owner: dict[str, int] = {}
    for key in sorted(groups, key=lambda k: (-len(groups[k]), k)):
        part = min(range(count), key=lambda j: (load[j], j))
        owner[key] = part
        load[part] += len(groups[key])
    return [it for it in items if owner[_shard_key(it)] == index]


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    spec = os.environ.get("ATTNBENCH_SHARD")
    if not spec:
        return
    try:
        index, count = (int(x) for x in spec.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"ATTNBENCH_SHARD={spec!r}: expected 'i/N' with 0 <= i < N") from None
    keep = shard_items(items, index, count)
    kept = {id(it) for it in keep}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
    items[:] = keep
