"""The oracle: dense masked softmax attention, derived from ``Pattern.mask``.

    out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,g,j] | mask[h,i,j]) v[b,g,j]

with ``g = h // (H / H_kv)`` the key/value head of query head ``h`` (``g = h`` without
grouped-query attention).

In float64 by default (``upcast=True``). With ``upcast=False`` the same formula runs
in the inputs' dtype, softmax in at least float32: the *control*, PyTorch's own
error in that precision, which the verification policy (:mod:`attnbench.verify`)
measures every implementation against.

Non-finite inputs: a NaN or inf in ``q[i]`` makes row ``i`` non-finite; in ``k[j]``,
every row that attends to ``j``; in ``v[j, c]``, column ``c`` of every row that attends
to ``j``. Rows that do not attend to a non-finite key stay finite, so the reference
says exactly which outputs a non-finite input reaches. (A plain masked product would
spread a NaN of ``v`` to every row, since ``0 * NaN`` is NaN.)
"""

from __future__ import annotations

import math

import torch

from .ops import repeat_kv
from .pattern import Pattern

__all__ = ["reference", "reference_rows", "default_scale"]


def default_scale(head_dim: int, scale: float | None = None) -> float:
    """Softmax scale: ``1/sqrt(head_dim)`` unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, upcast: bool
) -> torch.Tensor:
    # q (B, H, R, D), k/v (B, H_kv, n, D), mask (H, R, n) -> (B, H, R, D)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # query head h reads kv head h // (H / H_kv)
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, R, n)
    s = s.to(torch.promote_types(s.dtype, torch.float32)).masked_fill(~mask.unsqueeze(0), float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)  # every row has at least its own key: no NaN
    bad_v = ~torch.isfinite(v)  # (B, H, n, D)
    if not bad_v.any():
        return torch.matmul(p, v)
    out = torch.matmul(p, v.masked_fill(bad_v, 0))
    hit = torch.matmul(mask.unsqueeze(0).to(torch.float32), bad_v.to(torch.float32)) > 0  # (B, H, R, D)
    return out.masked_fill(hit, float("nan"))


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Dense masked attention, float64 unless ``upcast=False``.

    Args:
        q: ``(batch, heads, seq, head_dim)``; k, v: ``(batch, kv_heads, seq, head_dim)``,
            ``kv_heads`` dividing ``heads`` (grouped-query attention); any float dtype.
        upcast: compute in float64 (the oracle); False: in the inputs' dtype (the control).
    Returns:
        ``(batch, heads, seq, head_dim)``, float64 (or the inputs' dtype). Differentiable,
        so it also gives reference gradients.
    """
    B, H, n, D = q.shape
    mask = pattern.mask(n, heads=H).to(q.device)  # (H, n, n)
    return _masked_attention(q, k, v, mask, default_scale(D, scale), upcast)


def reference_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    rows: torch.Tensor | list[int],
    scale: float | None = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """The reference for selected query rows only, in O(len(rows) * n) memory.

    Returns ``(batch, heads, len(rows), head_dim)``, row r being
    ``reference(q, k, v, pattern, upcast=upcast)[:, :, rows[r]]``.
    """
    B, H, n, D = q.shape
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=q.device).reshape(-1)
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= n):
        raise ValueError(f"rows: every row must lie in [0, {n}); got min {int(rows_t.min())}, max {int(rows_t.max())}")
    mask = pattern.mask_rows(rows_t, n, heads=H)  # (H, R, n)
    return _masked_attention(q.index_select(2, rows_t), k, v, mask, default_scale(D, scale), upcast)
