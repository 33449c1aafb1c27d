"""The oracle: dense masked softmax attention in float64, derived from ``Pattern.mask``.

out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,h,j] | mask[h,i,j]) v[b,h,j]
"""

from __future__ import annotations

import math

import torch

from .pattern import Pattern

__all__ = ["reference", "reference_rows", "default_scale"]


def default_scale(head_dim: int, scale: float | None = None) -> float:
    """Softmax scale: ``1/sqrt(head_dim)`` unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _masked_softmax_av(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    # q (B, H, R, D), k/v (B, H, n, D), mask (H, R, n) -> (B, H, R, D), all float64
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, R, n)
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    p = torch.softmax(s, dim=-1)  # every row has at least its own key: no NaN
    return torch.matmul(p, v)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float | None = None
) -> torch.Tensor:
    """Dense masked attention in float64.

    Args:
        q, k, v: ``(batch, heads, seq, head_dim)``, any float dtype.
    Returns:
        ``(batch, heads, seq, head_dim)`` float64. Differentiable (in float64), so it
        also gives reference gradients.
    """
    B, H, n, D = q.shape
    mask = pattern.mask(n, heads=H).to(q.device)  # (H, n, n)
    return _masked_softmax_av(q.double(), k.double(), v.double(), mask, default_scale(D, scale))


def reference_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    rows: torch.Tensor | list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """The reference for selected query rows only, in O(len(rows) * n) memory.

    Returns ``(batch, heads, len(rows), head_dim)`` float64, row r being
    ``reference(q, k, v, pattern)[:, :, rows[r]]``.
    """
    B, H, n, D = q.shape
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=q.device).reshape(-1)
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= n):
        raise ValueError(f"rows: every row must lie in [0, {n}); got min {int(rows_t.min())}, max {int(rows_t.max())}")
    mask = pattern.mask_rows(rows_t, n, heads=H)  # (H, R, n)
    qr = q.index_select(2, rows_t).double()
    return _masked_softmax_av(qr, k.double(), v.double(), mask, default_scale(D, scale))
