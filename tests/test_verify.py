"""The verification policy (attnbench.verify) and the reference's rule for non-finite inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import Nudge, rand_qkv

import attnbench
from attnbench import Pattern
from attnbench.verify import ATOL, FACTOR, MEAN_ATOL, MEAN_FACTOR, check_grads, check_output, judge, tolerance


def _nan_rows(t: torch.Tensor) -> list[int]:
    return sorted(set(torch.nonzero(~torch.isfinite(t[0, 0]))[:, 0].tolist()))


def test_reference_spreads_a_nan_exactly_to_the_rows_that_attend_to_it():
    p = Pattern(4, global_tokens=(20,))  # rows j-2..j+2 attend to key j, and the global row 20
    for which, idx, want in (
        ("q", (0, 0, 10, 3), [10]),
        ("k", (0, 0, 10, 3), [8, 9, 10, 11, 12, 20]),
        ("v", (0, 0, 10, 3), [8, 9, 10, 11, 12, 20]),
        ("v", (0, 0, 20, 0), list(range(40))),  # a global key: every row
    ):
        q, k, v = rand_qkv(1, 1, 40, 8, torch.float64)
        {"q": q, "k": k, "v": v}[which][idx] = float("nan")
        for upcast in (True, False):
            ref = attnbench.reference(q, k, v, p, upcast=upcast)
            assert _nan_rows(ref) == want, (which, idx, upcast)
        if which == "v":  # only the column of the NaN
            assert torch.isfinite(attnbench.reference(q, k, v, p)[..., 1 - idx[3]]).all()


def test_a_nan_may_spread_but_never_turn_into_a_number():
    p = Pattern(4)
    q, k, v = rand_qkv(1, 2, 30, 8, torch.float32)
    v[0, 0, 10, 0] = float("nan")
    naive = attnbench.attention(q, k, v, p, impl="naive")
    assert len(_nan_rows(naive)) > 5  # a dense masked product spreads it: 0 * NaN
    assert check_output(naive, q, k, v, p).ok
    hidden = torch.nan_to_num(naive, nan=0.0)
    verdict = check_output(hidden, q, k, v, p, what="hidden")
    assert not verdict.ok and "finite value(s) where the reference is not" in str(verdict)


def test_with_finite_inputs_every_output_is_finite():
    p = Pattern(4)
    q, k, v = rand_qkv(1, 2, 30, 8, torch.float32)
    out = attnbench.attention(q, k, v, p, impl="chunked")
    out[0, 1, 7, 2] = float("inf")
    verdict = check_output(out, q, k, v, p)
    assert not verdict.ok and str(verdict).endswith("1 non-finite value(s) where the reference is finite")


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_largest_error_is_bounded_at_its_boundary(dtype):
    """One entry off by 0.5x the tolerance passes, by 1.5x fails."""
    ref = torch.zeros(1000, dtype=torch.float64)
    control = torch.full((1000,), 1e-4, dtype=torch.float64)
    tol, mean_tol = tolerance(dtype, 1e-4, 1e-4)
    name = attnbench.dtypes.dtype_name(dtype)
    assert (tol, mean_tol) == (FACTOR * 1e-4 + ATOL[name], MEAN_FACTOR * 1e-4 + MEAN_ATOL[name])
    for scale, ok in ((0.5, True), (1.5, False)):
        got = torch.zeros(1000, dtype=dtype)
        got[3] = scale * tol
        verdict = judge(got, ref, control)
        assert verdict.max_err == pytest.approx(got[3].double().item()) and verdict.ok is ok, str(verdict)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_mean_error_is_bounded_at_its_boundary(dtype):
    """Every entry off by 0.5x the mean tolerance passes, by 1.5x fails: a bias too small
    for the largest error to show."""
    ref = torch.full((1000,), 0.25, dtype=torch.float64)
    control = ref + torch.linspace(-1e-3, 1e-3, 1000, dtype=torch.float64)  # mean 5e-4, max 1e-3
    tol, mean_tol = tolerance(dtype, 1e-3, judge(ref, ref, control).control_mean)
    for scale, ok in ((0.5, True), (1.5, False)):
        got = (ref + scale * mean_tol).to(dtype)
        verdict = judge(got, ref, control)
        assert verdict.max_err < tol
        err = (got.double() - ref).abs().mean().item()  # what the dtype could hold of it
        assert verdict.mean_err == pytest.approx(err) and verdict.ok is (err <= mean_tol), str(verdict)
        if dtype in (torch.float64, torch.float32):  # bf16 and fp16 round 0.25 + a tiny bias
            assert verdict.ok is ok


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_bounded_at_their_boundary(dtype):
    p = Pattern(4, global_tokens=(3,))
    q, k, v = rand_qkv(1, 2, 20, 8, dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def naive(delta):
        return lambda a, b, c: attnbench.attention(Nudge.apply(a, delta), b, c, p, impl="naive")

    no_nudge = torch.zeros(q.shape, dtype=torch.float64)
    tol = check_grads(naive(no_nudge), q, k, v, p, dout)[0].tol  # dq's
    for scale, ok in ((0.5, True), (1.5, False)):
        delta = no_nudge.clone()
        delta[0, 1, 7, 2] = scale * tol
        dq, dk, dv = check_grads(naive(delta), q, k, v, p, dout)
        assert dq.ok is ok and dk.ok and dv.ok, (str(dq), scale)


def test_a_one_percent_bias_in_bf16_fails():
    """Below bf16's largest rounding error, but not below its mean."""
    for p in (Pattern(8), Pattern(6, 2, True, (0, 50)), Pattern(256)):
        q, k, v = rand_qkv(1, 2, 97, 32, torch.bfloat16)
        out = attnbench.attention(q, k, v, p, impl="chunked")
        assert check_output(out, q, k, v, p).ok
        verdict = check_output((out.double() * 1.01).to(torch.bfloat16), q, k, v, p)
        assert not verdict.ok and "mean abs diff" in str(verdict), str(verdict)
