"""The verification and tolerance policy: one rule, used by the engine's gate and by the
test suite alike.

An output (or a gradient) of an implementation passes iff

* it keeps every non-finite value of the float64 reference (a NaN or inf in the inputs
  never turns into a number; see :mod:`attnbench.reference` for which outputs it
  reaches), and it is finite wherever the reference is, unless the inputs themselves
  hold non-finite values (then spreading them further, as a dense masked product
  does with ``0 * NaN``, is loud, not wrong), and
* over the finite entries, ``max |got - ref| <= FACTOR * control_max + ATOL[dtype]``
  and ``mean |got - ref| <= MEAN_FACTOR * control_mean + MEAN_ATOL[dtype]``,

where ``ref`` is the float64 oracle and ``control_max`` / ``control_mean`` are the
errors, on the same entries, of the *control*: the same formula computed in the working
dtype (``reference(..., upcast=False)``, FlashAttention's ``attention_ref(upcast=False)``),
i.e. PyTorch's own error in that precision on that device. The tolerance follows the
machine: exact fp32 arithmetic on a CPU gets a tight bound, and TF32 slack appears only
where TF32 matrix products are on. The max bounds a wrong entry; the mean bounds a
systematic error, which in bf16 hides below the largest rounding error of a few
thousand entries (a 1% bias in bf16 moves the mean error 2-3x, rounding 1.2x at most).
The floors are for rounding the control happens not to show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .dtypes import dtype_name
from .pattern import Pattern
from .reference import reference, reference_rows

__all__ = [
    "ATOL",
    "FACTOR",
    "MEAN_ATOL",
    "MEAN_FACTOR",
    "Verdict",
    "tolerance",
    "judge",
    "check_output",
    "check_grads",
    "reference_grads",
    "sample_rows",
]

#: an implementation's largest error may be this many times the control's ...
FACTOR = 2.0
#: ... plus this floor (max abs error, unit-variance inputs), by dtype
ATOL = {"fp64": 1e-9, "fp32": 2e-5, "bf16": 1.6e-2, "fp16": 2e-3}
#: its mean error may be this many times the control's ...
MEAN_FACTOR = 1.5
#: ... plus this floor
MEAN_ATOL = {"fp64": 1e-11, "fp32": 2e-7, "bf16": 2e-5, "fp16": 5e-6}


def tolerance(dtype: torch.dtype | str, control_max: float, control_mean: float = 0.0) -> tuple[float, float]:
    """(allowed max abs error, allowed mean abs error) in ``dtype``, given the control's."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return FACTOR * control_max + ATOL[name], MEAN_FACTOR * control_mean + MEAN_ATOL[name]


@dataclass(frozen=True)
class Verdict:
    """One comparison with the reference. ``str(verdict)`` is the failure message."""

    what: str
    max_err: float
    mean_err: float
    control_err: float  # the control's max error
    control_mean: float
    tol: float  # allowed max error
    mean_tol: float  # allowed mean error
    problem: str = ""  # non-finite values where the reference has none, or the reverse

    @property
    def ok(self) -> bool:
        return not self.problem and self.max_err <= self.tol and self.mean_err <= self.mean_tol

    def __str__(self) -> str:
        if self.problem:
            return f"{self.what}: {self.problem}"
        if self.max_err <= self.tol and self.mean_err > self.mean_tol:
            return (
                f"{self.what}: mean abs diff {self.mean_err:.3e} > mean tol {self.mean_tol:.3e} "
                f"(control's mean {self.control_mean:.3e}; max abs diff {self.max_err:.3e} <= tol {self.tol:.3e})"
            )
        rel = ">" if self.max_err > self.tol else "<="
        return (
            f"{self.what}: max abs diff {self.max_err:.3e} {rel} tol {self.tol:.3e} "
            f"(mean abs diff {self.mean_err:.3e}, control's max {self.control_err:.3e})"
        )


def _max_mean(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> tuple[float, float]:
    if not bool(where.any()):
        return 0.0, 0.0
    d = (a - b).abs()[where]
    return d.max().item(), d.mean().item()


def judge(got: torch.Tensor, ref: torch.Tensor, control: torch.Tensor, what: str = "output") -> Verdict:
    """Compare ``got`` (in its working dtype) with ``ref`` (float64) under the policy;
    the tolerance comes from ``control``, the reference computed in that dtype."""
    tol_dtype = got.dtype
    ref = ref.detach().double()
    got, control = (t.detach().to(ref.device, torch.float64) for t in (got, control))
    fin_ref, fin_got = torch.isfinite(ref), torch.isfinite(got)
    lost, hidden = int((fin_ref & ~fin_got).sum()), int((~fin_ref & fin_got).sum())
    problem = ""
    if hidden:
        problem = f"{hidden} finite value(s) where the reference is not (a NaN or inf turned into a number)"
    elif lost and bool(fin_ref.all()):  # finite inputs: nothing may be non-finite
        problem = f"{lost} non-finite value(s) where the reference is finite"
    max_err, mean_err = _max_mean(got, ref, fin_ref & fin_got)
    control_max, control_mean = _max_mean(control, ref, fin_ref & torch.isfinite(control))
    tol, mean_tol = tolerance(tol_dtype, control_max, control_mean)
    return Verdict(what, max_err, mean_err, control_max, control_mean, tol, mean_tol, problem)


def sample_rows(n: int, pattern: Pattern, count: int, seed: int) -> list[int]:
    """Rows the gate checks when the dense reference would not fit: both edges (4 rows
    each), up to 8 global rows, and ``count`` random rows (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    picks = set(range(min(4, n))) | set(range(max(0, n - 4), n)) | set(pattern.global_tokens[:8])
    picks |= set(torch.randint(0, n, (count,), generator=gen).tolist())
    return sorted(picks)


def check_output(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    rows: list[int] | None = None,
    what: str = "output",
    key_mask: torch.Tensor | None = None,
) -> Verdict:
    """``out`` (``(B, H, n, D)``) against the reference: every row, or only ``rows``."""
    q, k, v = q.detach(), k.detach(), v.detach()
    if rows is None:
        ref = reference(q, k, v, pattern, scale, key_mask=key_mask)
        control = reference(q, k, v, pattern, scale, upcast=False, key_mask=key_mask)
        got = out
    else:
        ref = reference_rows(q, k, v, pattern, rows, scale, key_mask=key_mask)
        control = reference_rows(q, k, v, pattern, rows, scale, upcast=False, key_mask=key_mask)
        got = out[:, :, rows]
    return judge(got, ref, control, what)


def reference_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    dout: torch.Tensor,
    scale: float | None = None,
    *,
    rows: list[int] | None = None,
    upcast: bool = True,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv), each ``(B, H, n, D)``, of the reference (float64, or the control with
    ``upcast=False``) for the output cotangent ``dout``; with ``rows``, of those query
    rows' outputs only (``dout``'s other rows taken as zero), in O(len(rows) * n) memory."""
    leaves = [(t.detach().double() if upcast else t.detach().clone()).requires_grad_() for t in (q, k, v)]
    if rows is None:
        out = reference(*leaves, pattern, scale, upcast=upcast, key_mask=key_mask)
    else:
        out = reference_rows(*leaves, pattern, rows, scale, upcast=upcast, key_mask=key_mask)
        dout = dout[:, :, rows]
    return torch.autograd.grad(out, leaves, dout.to(out.dtype))


def check_grads(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    dout: torch.Tensor,
    scale: float | None = None,
    what: str = "",
    rows: list[int] | None = None,
    key_mask: torch.Tensor | None = None,
) -> list[Verdict]:
    """The gradients of ``fn(q, k, v) -> out`` for the cotangent ``dout`` against the
    reference's, one verdict each for dq, dk and dv.

    With ``rows`` (a long sequence), the cotangent is ``dout`` on those rows and zero
    elsewhere, so ``fn``'s kernels run at full size while the reference needs only those
    rows; dq is compared on the rows, dk and dv on the keys they reach."""
    n = q.shape[2]
    if rows is not None:
        on = torch.zeros(n, dtype=torch.bool, device=dout.device)
        on[rows] = True
        dout = dout * on[:, None]  # (B, H, n, D): the sampled rows' cotangent only
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(fn(*leaves), leaves, dout.to(q.dtype))
    want = reference_grads(q, k, v, pattern, dout, scale, rows=rows, key_mask=key_mask)
    control = reference_grads(q, k, v, pattern, dout, scale, rows=rows, upcast=False, key_mask=key_mask)
    where = [slice(None)] * 3
    if rows is not None:
        reached = pattern.mask_rows(torch.as_tensor(rows), n, heads=q.shape[1]).any(0).any(0)  # (n,) keys
        where = [torch.as_tensor(rows), reached.nonzero().flatten(), reached.nonzero().flatten()]
    return [
        judge(g[:, :, w], r[:, :, w], c[:, :, w], f"{what} d{name}".strip())
        for name, g, r, c, w in zip("qkv", got, want, control, where)
    ]
