"""The oracle checked against numbers worked out apart from its code: a broken reference
must fail here, since every other test measures against it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rand_qkv
from test_correctness import CASES

import attnbench
from attnbench import Pattern, default_scale


def test_default_scale_is_one_over_sqrt_head_dim():
    assert default_scale(16) == 0.25 and default_scale(64) == 0.125 and default_scale(16, 0.3) == 0.3


@pytest.mark.parametrize("impl", ["reference", "naive", "chunked", "loop", "sdpa"])
def test_no_scale_means_one_over_sqrt_head_dim(impl):
    p = Pattern(6, 2, False, (0,))
    q, k, v = rand_qkv(1, 2, 30, 16, torch.float64)
    call = attnbench.reference if impl == "reference" else (lambda *a, **kw: attnbench.attention(*a, impl=impl, **kw))
    assert torch.equal(call(q, k, v, p), call(q, k, v, p, scale=16**-0.5))
    assert not torch.allclose(call(q, k, v, p), call(q, k, v, p, scale=1 / 16))


def test_reference_at_the_default_scale_by_hand():
    """head_dim 4, so the scale is 1/2. Query 0 meets key 0 (q.k = 2, score 1) and key 1
    (score 0): weights e/(e+1) and 1/(e+1) on values 1 and 0. Query 1 (q = 0) weighs both
    keys equally: 1/2."""
    q = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    k = torch.tensor([[[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    v = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    out = attnbench.reference(q, k, v, Pattern(2))
    e = math.e
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([e / (e + 1), 0.5], dtype=torch.float64))


def test_reference_is_float64_masked_softmax():
    """A 3-token example worked by hand, at an explicit scale."""
    q = torch.tensor([[[[1.0], [0.0], [2.0]]]])
    k = torch.tensor([[[[1.0], [1.0], [1.0]]]])
    v = torch.tensor([[[[1.0], [2.0], [4.0]]]])
    out = attnbench.reference(q, k, v, Pattern(0, global_tokens=(1,)), scale=1.0)
    # row 0 sees keys 0, 1 with equal scores -> 1.5; row 1 (global) sees all -> 7/3; row 2 sees 1, 2 -> 3
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.flatten(), torch.tensor([1.5, 7 / 3, 3.0], dtype=torch.float64))


#: how far naive (its own code) and the control may sit from the reference, whatever
#: the reference says: fixed figures, so a broken oracle cannot widen every tolerance
BOUND = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}


@pytest.mark.parametrize("dtype", list(BOUND), ids=str)
def test_naive_and_the_control_agree_with_the_reference(dtype):
    for case in CASES:
        q, k, v = rand_qkv(case.B, case.H, case.n, case.D, dtype)
        ref = attnbench.reference(q, k, v, case.pattern)
        naive = attnbench.attention(q, k, v, case.pattern, impl="naive")
        control = attnbench.reference(q, k, v, case.pattern, upcast=False)
        for what, t in (("naive", naive), ("control", control)):
            err = (t.double() - ref).abs().max().item()
            assert err <= BOUND[dtype], f"{what} {case}: max abs diff {err:.3e} > {BOUND[dtype]:.1e}"


def test_grouped_query_reference_reads_head_h_over_group():
    """Grouped-query attention: query head h of 8 reads key/value head h // 4 of 2, and
    the reference's gradient of a key/value head sums over its query heads."""
    p = Pattern((3, 1), 2, False, (4,))
    q, k, v = rand_qkv(2, 8, 19, 8, torch.float64, kv_heads=2, requires_grad=True)
    out = attnbench.reference(q, k, v, p)
    for h in range(8):
        one = attnbench.reference(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1], p)
        torch.testing.assert_close(out[:, h : h + 1], one, rtol=0, atol=0)
    dout = torch.randn_like(out)
    dk = torch.autograd.grad(out, k, dout)[0]
    per_head = [  # each query head with its key/value head alone: its part lands on head h // 4 of dk
        torch.autograd.grad(attnbench.reference(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1],
                                                p), k, dout[:, h : h + 1])[0]
        for h in range(8)
    ]  # fmt: skip
    torch.testing.assert_close(dk, sum(per_head), rtol=1e-12, atol=1e-12)
