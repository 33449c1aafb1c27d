"""naive: the paper's full self-attention, dense QK^T masked to the pattern.

S = scale * Q K^T            # (B, H, n, n): quadratic memory
P = softmax(S masked to Pattern.mask, and the key mask if any)
O = P V
"""

from __future__ import annotations

import torch

from attnbench import FEATURES, Pattern, register
from attnbench.reference import with_key_mask


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    # At the peak two score-sized tensors in at least fp32 are alive (the masked scores
    # and the probabilities), plus the scores in a narrower input dtype before their
    # cast, plus the (H, n, n) bool mask and as much again while the pattern builds it.
    # Measured on the CPU, fp32: 10.0 bytes a (head, query, key) at n = 512 ... 8192.
    # Backward keeps them alive and adds the gradient of the scores.
    per = B * H * n * n
    wide = max(esize, 4)
    fwd = per * (2 * wide + (esize if esize < wide else 0)) + 2 * H * n * n
    return fwd * (2.0 if backward else 1.0) + 3 * B * H * n * D * esize


@register("naive", features=FEATURES, memory=_memory, dense=True)
def naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """full n x n attention masked to the pattern (quadratic memory)"""
    B, H, n, D = q.shape
    mask = with_key_mask(pattern.mask(n, heads=H).to(q.device), key_mask)  # (B or 1, H, n, n)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, n, n), input dtype as users write it
    # softmax in at least fp32, as HF and FlashAttention do
    s = s.to(torch.promote_types(s.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if key_mask is not None:  # a row the key mask left without keys is 0, not NaN
        p = p.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return torch.matmul(p.to(v.dtype), v)  # (B, H, n, D)
