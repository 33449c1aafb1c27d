"""The oracle: dense masked softmax attention, derived from ``Pattern.mask``.

    out[b, h, i] = sum_j softmax_j(scale * q[b,h,i] . k[b,g,j] | mask[h,i,j]) v[b,g,j]

with ``g = h // (H / H_kv)`` the key/value head of query head ``h`` (``g = h`` without
grouped-query attention).

A key mask (``key_mask``, ``(B, n)`` bool, True where the key is present: a per-sample
padding mask, holes anywhere) removes keys from every row of its sample on top of the
pattern. A row left with no key at all (a query whose whole window is padding) is 0,
and so is its gradient.

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

__all__ = ["reference", "reference_rows", "default_scale", "with_key_mask"]


def default_scale(head_dim: int, scale: float | None = None) -> float:
    """Softmax scale: ``1/sqrt(head_dim)`` unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def with_key_mask(mask: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The pattern's mask ``(H, R, n)`` with a key mask ``(B, n)`` (True = present) on top:
    ``(B, H, R, n)``; without one, ``(1, H, R, n)``."""
    if key_mask is None:
        return mask.unsqueeze(0)
    return mask.unsqueeze(0) & key_mask.to(mask.device)[:, None, None, :]


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, upcast: bool
) -> torch.Tensor:
    # q (B, H, R, D), k/v (B, H_kv, n, D), mask (B or 1, H, R, n) -> (B, H, R, D)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # query head h reads kv head h // (H / H_kv)
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, R, n)
    s = s.to(torch.promote_types(s.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    empty = ~mask.any(-1, keepdim=True)  # rows a key mask left without keys: 0, not NaN
    if bool(empty.any()):
        p = p.masked_fill(empty, 0.0)
    p = p.to(v.dtype)
    bad_v = ~torch.isfinite(v)  # (B, H, n, D)
    if not bad_v.any():
        return torch.matmul(p, v)
    out = torch.matmul(p, v.masked_fill(bad_v, 0))
    hit = torch.matmul(mask.to(torch.float32), bad_v.to(torch.float32)) > 0  # (B, H, R, D)
    return out.masked_fill(hit, float("nan"))


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    *,
    upcast: bool = True,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense masked attention, float64 unless ``upcast=False``.

    Args:
        q: ``(batch, heads, seq, head_dim)``; k, v: ``(batch, kv_heads, seq, head_dim)``,
            ``kv_heads`` dividing ``heads`` (grouped-query attention); any float dtype.
        upcast: compute in float64 (the oracle); False: in the inputs' dtype (the control).
        key_mask: ``(batch, seq)`` bool, True where the key is present; None: every key.
    Returns:
        ``(batch, heads, seq, head_dim)``, float64 (or the inputs' dtype). Differentiable,
        so it also gives reference gradients.
    """
    B, H, n, D = q.shape
    mask = with_key_mask(pattern.mask(n, heads=H).to(q.device), key_mask)  # (B or 1, H, n, n)
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
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference for selected query rows only, in O(len(rows) * n) memory.

    Returns ``(batch, heads, len(rows), head_dim)``, row r being
    ``reference(q, k, v, pattern, upcast=upcast)[:, :, rows[r]]``.
    """
    B, H, n, D = q.shape
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=q.device).reshape(-1)
    if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= n):
        raise ValueError(f"rows: every row must lie in [0, {n}); got min {int(rows_t.min())}, max {int(rows_t.max())}")
    mask = with_key_mask(pattern.mask_rows(rows_t, n, heads=H), key_mask)  # (B or 1, H, R, n)
    return _masked_attention(q.index_select(2, rows_t), k, v, mask, default_scale(D, scale), upcast)
