"""naive: the paper's full self-attention, dense QK^T masked to the pattern.

S = scale * Q K^T            # (B, H, n, n): quadratic memory
P = softmax(S masked to Pattern.mask)
O = P V
"""

from __future__ import annotations

import torch

from attnbench import FEATURES, Pattern, register


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    # scores (input dtype) + fp32 softmax + probabilities + bool mask; backward keeps
    # them alive and adds the gradient of the scores.
    per = B * H * n * n
    fwd = per * (esize + 4 + 4 + esize) + H * n * n
    return fwd * (2.0 if backward else 1.0) + 3 * B * H * n * D * esize


@register("naive", features=FEATURES, memory=_memory)
def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """full n x n attention masked to the pattern (quadratic memory)"""
    B, H, n, D = q.shape
    mask = pattern.mask(n, heads=H).to(q.device)  # (H, n, n)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, n, n), input dtype as users write it
    # softmax in at least fp32, as HF and FlashAttention do
    s = s.to(torch.promote_types(s.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v)  # (B, H, n, D)
