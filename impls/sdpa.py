"""sdpa: ``torch.nn.functional.scaled_dot_product_attention`` with the dense boolean
mask of the pattern.

The mask is ``Pattern.mask(n, heads=H)``, shape ``(H, n, n)``, passed as
``attn_mask`` of shape ``(1, H, n, n)`` (broadcast over the batch; ``True`` = attend),
with the softmax ``scale`` passed through. PyTorch picks the kernel (math, or a fused
one that accepts an arbitrary mask); none of them skips the masked-out work, so this is
dense attention in time and the mask alone is quadratic in memory: the baseline that
"just use SDPA with a mask" gives.

Grouped-query k, v are repeated per query head by the registry, not passed with
``enable_gqa``, as Hugging Face's SDPA integration does whenever there is a mask
(``use_gqa_in_sdpa``: with a mask, enable_gqa falls back to the math kernel). Measured
on the CPU (torch 2.13, bf16, 8 query heads on 1 key/value head, n = 97): enable_gqa's
dV was 2.8x the control's error, over the verification policy; repeated k, v, 0.9x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnbench import FEATURES, Pattern, register
from attnbench.reference import with_key_mask


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    # An upper bound: the (H, n, n) boolean mask, its conversion to an additive float
    # mask, and (math path) fp32 scores and probabilities of every head; fused kernels
    # skip the last term. Backward keeps the probabilities and adds their gradient.
    mask = H * n * n * (1 + esize)
    scores = B * H * n * n * (4 + esize)
    io = B * H * n * D * esize
    return float(mask + scores * (2.0 if backward else 1.0) + io * (4 if backward else 1))


@register("sdpa", features=FEATURES, memory=_memory, dense=True)
def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.scaled_dot_product_attention with the dense (H, n, n) boolean mask (quadratic)

    q, k, v ``(B, H, n, D)`` -> ``(B, H, n, D)``; ``key_mask`` ``(B, n)`` makes the mask
    ``(B, H, n, n)``.
    """
    B, H, n, D = q.shape
    mask = with_key_mask(pattern.mask(n, heads=H).to(q.device), key_mask)  # (B or 1, H, n, n)
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # a row the key mask left without keys is 0: give it every key (SDPA's result for a
    # fully masked row is not finite in every backend), then zero it, gradient included
    empty = ~mask.any(-1, keepdim=True)  # (B, H, n, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scale)
    return out.masked_fill(empty, 0.0)
