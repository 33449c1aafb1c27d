"""The verification policy (attnbench.verify) and the reference's rule for non-finite inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import rand_qkv

import attnbench
from attnbench import Pattern
from attnbench.verify import ATOL, FACTOR, check_output, judge, tolerance


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_tolerance_is_the_control_error_times_the_factor_plus_the_floor(dtype):
    ref = torch.zeros(100, dtype=torch.float64)
    control = torch.full((100,), 1e-4, dtype=torch.float64)
    tol = tolerance(dtype, 1e-4)
    assert tol == FACTOR * 1e-4 + ATOL[attnbench.dtypes.dtype_name(dtype)]
    for scale, ok in ((0.5, True), (1.5, False)):
        got = torch.zeros(100, dtype=dtype)
        got[3] = scale * tol
        verdict = judge(got, ref, control)
        err = got[3].double().item()  # what the dtype could hold of scale * tol
        assert verdict.max_err == pytest.approx(err) and verdict.tol == tol and verdict.ok is ok, str(verdict)
