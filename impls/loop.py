"""loop: the paper's non-vectorised Longformer-loop.

For each query i, gather exactly the keys K(i) it attends to and compute

    o_i = softmax_j(scale * q_i . k_j, j in K(i)) v_{K(i)}

Linear memory, one Python iteration per query (and per dilation group): slow by design.
"""

from __future__ import annotations

import torch

from attnbench import Pattern, register
from attnbench.ops import gather_heads, global_index, head_groups, scatter_heads


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    # per-row gathers are tiny; the outputs of every row are kept for the final stack
    # (and, with autograd, the gathered keys of every row).
    rows = B * H * n * D * esize
    return rows * (2 + (pattern.window + 1 + len(pattern.global_tokens)) * (2 if backward else 0) / max(D, 1))


def _keys(i: int, n: int, d: int, pattern: Pattern, glob: torch.Tensor, is_global: bool) -> torch.Tensor:
    """Sorted key positions that query i attends to (dilation d)."""
    dev = glob.device
    if is_global:
        return torch.arange(0, i + 1 if pattern.causal else n, device=dev)
    lo, hi = pattern.offset_range
    c_min = max(lo, -(i // d))  # smallest c with i + d*c >= 0
    c_max = min(hi, (n - 1 - i) // d)  # largest c with i + d*c < n
    win = torch.arange(i + d * c_min, i + d * c_max + 1, d, device=dev)  # (<= w+1,)
    if glob.numel() == 0:
        return win
    diff = glob - i
    extra = ~((diff % d == 0) & (diff >= lo * d) & (diff <= hi * d))  # globals outside the window
    if pattern.causal:
        extra &= diff <= 0
    return torch.cat([win, glob[extra]])


@register(
    "loop",
    features=("dilation", "per_head_dilation", "global_tokens", "causal", "backward"),
    memory=_memory,
    description="Python loop over queries gathering each row's keys (linear memory, slow)",
)
def loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    B, H, n, D = q.shape
    glob = global_index(pattern, q.device)
    gset = set(pattern.global_tokens)
    acc = torch.promote_types(q.dtype, torch.float32)
    parts = []
    for d, heads in head_groups(pattern, H):
        qg, kg, vg = (gather_heads(t, heads) for t in (q, k, v))  # (B, Hg, n, D)
        # Gather from copies in >= fp32: the backward of each gather adds one row's
        # gradient into dK/dV, and n such additions in bf16 would lose what a single
        # matrix product (fp32 accumulation) keeps. The arithmetic stays in q's dtype.
        kg, vg = kg.to(acc), vg.to(acc)
        rows = []
        for i in range(n):
            idx = _keys(i, n, d, pattern, glob, i in gset)  # (K,)
            kk = kg.index_select(2, idx).to(q.dtype)  # (B, Hg, K, D)
            vv = vg.index_select(2, idx).to(q.dtype)  # (B, Hg, K, D)
            s = torch.matmul(kk, qg[:, :, i, :, None]).squeeze(-1) * scale  # (B, Hg, K)
            p = torch.softmax(s.to(acc), dim=-1).to(v.dtype)
            rows.append(torch.matmul(p.unsqueeze(-2), vv).squeeze(-2))  # (B, Hg, D)
        parts.append((heads, torch.stack(rows, dim=2)))  # (B, Hg, n, D)
    return scatter_heads(parts, H)
