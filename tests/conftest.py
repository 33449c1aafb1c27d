"""Shared test helpers: inputs, the verification policy's assertions, a throwaway
registry entry, and the worker groups of Triton's tests."""

from __future__ import annotations

import os

import pytest
import torch

import attnbench
from attnbench import registry
from attnbench.verify import check_grads, check_output

DEVICE = "cuda" if os.environ.get("ATTNBENCH_TEST_DEVICE") == "cuda" else "cpu"


def rand_qkv(B: int, H: int, n: int, D: int, dtype: torch.dtype, seed: int = 0, requires_grad: bool = False,
             kv_heads: int | None = None):  # fmt: skip
    """q ``(B, H, n, D)`` and k, v ``(B, kv_heads, n, D)`` (default ``H``), drawn in float64
    and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for heads in (H, kv_heads or H, kv_heads or H):
        t = torch.randn(B, heads, n, D, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
        out.append(t.requires_grad_(requires_grad))
    return out


def rand_dout(q: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """An output cotangent like ``q``, float64 (check_grads casts it)."""
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(q.device)


def assert_output_ok(out, q, k, v, pattern, what: str, scale: float | None = None, key_mask=None) -> None:
    """``out`` passes the verification policy (attnbench.verify) against the reference;
    the failure message states the max and mean difference and the tolerance."""
    verdict = check_output(out, q, k, v, pattern, scale, what=what, key_mask=key_mask)
    assert verdict.ok, str(verdict)


def assert_grads_ok(fn, q, k, v, pattern, what: str, scale: float | None = None, dout=None, key_mask=None) -> None:
    """The gradients of ``fn(q, k, v)`` pass the verification policy, each of dq, dk, dv."""
    dout = rand_dout(q) if dout is None else dout
    for verdict in check_grads(fn, q, k, v, pattern, dout, scale, what, key_mask=key_mask):
        assert verdict.ok, str(verdict)


def rand_key_mask(B: int, n: int, seed: int = 2) -> torch.Tensor:
    """A key mask ``(B, n)`` (True = present) with every kind of gap, sample by sample:
    none; right padding (a fifth of the keys); left padding (a tenth) and holes anywhere
    (about a third of the rest); then the same again. Left padding leaves the first rows
    of a causal window without any key."""
    g = torch.Generator().manual_seed(seed)
    out = torch.ones(B, n, dtype=torch.bool)
    for b in range(B):
        kind = b % 3
        if kind == 1:
            out[b, n - max(1, n // 5) :] = False
        elif kind == 2:
            out[b, : max(1, n // 10)] = False
            out[b] &= torch.rand(n, generator=g) > 0.35
    return out.to(DEVICE)


class Nudge(torch.autograd.Function):
    """``Nudge.apply(x, delta)``: the identity, whose gradient is off by ``delta`` (a
    tensor like ``x``), for testing the gradient checks at their boundary."""

    @staticmethod
    def forward(ctx, x, delta):
        ctx.delta = delta
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g + ctx.delta.to(g.device, g.dtype), None


def impl_or_skip(name: str) -> attnbench.Impl:
    """The implementation if it runs on the test device here; else a skip with the reason."""
    im = attnbench.get_impl(name)
    if name not in {i.name for i in attnbench.available_impls(DEVICE)}:
        why = im.unavailable_reason() or f"it does not run on {DEVICE} (declares {', '.join(im.devices)})"
        pytest.skip(f"{name} unavailable here: {why}")
    return im


@pytest.fixture
def throwaway():
    """Register implementations for one test only: ``add(name, fn=clone of q, **register kwargs)``;
    every feature is declared unless ``features=`` says otherwise."""
    names = []

    def add(name, fn=None, **kw):
        kw.setdefault("features", attnbench.FEATURES)
        names.append(name)
        return attnbench.register(name, **kw)(fn or (lambda q, k, v, pattern, scale: q.clone()))

    yield add
    for n in names:
        registry.unregister(n)


# ---------------------------------------------------------------- worker groups
# Under pytest-xdist with --dist loadgroup (gpu_check runs the CUDA suite that way), the
# tests of one xdist_group run on one worker. Triton's compiled kernels serve every
# shape of one head_dim and dtype, so its tests are grouped by those: each kernel set is
# compiled once, by one worker. (FlexAttention compiles per shape anyway.)
_SHARED_KERNELS = {"triton"}


def kernel_group(item: pytest.Item) -> str | None:
    """The xdist group of a test whose kernels another test compiles too, else None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    impl, case, dtype = params.get("impl"), params.get("case"), params.get("dtype")
    if impl in _SHARED_KERNELS and case is not None:
        return f"{impl}-D{case.D}-{dtype}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    for item in items:
        group = kernel_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
