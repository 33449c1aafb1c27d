"""loop: the paper's non-vectorised Longformer-loop.

For each query i, take exactly the keys K(i) it attends to (a strided slice for the
window, plus the global keys outside it) and compute

    o_i = softmax_j(scale * q_i . k_j, j in K(i)) v_{K(i)}

Linear memory, one Python iteration per query (and per dilation group): slow by design.
"""

from __future__ import annotations

import torch

from attnbench import FEATURES, Pattern, register
from attnbench.ops import gather_heads, head_groups, scatter_heads
from attnbench.pattern import window_rule


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    # per-row gathers are tiny; the outputs of every row are kept for the final stack
    # (and, with autograd, the gathered keys of every row).
    rows = B * H * n * D * esize
    return rows * (2 + (pattern.span + 1 + len(pattern.global_tokens)) * (2 if backward else 0) / max(D, 1))


def _extra_globals(i: int, d: int, lo: int, hi: int, globs: tuple[int, ...], causal: bool) -> list[int]:
    """Global keys query i attends to beyond its window (never counted twice)."""
    return [g for g in globs if not window_rule(i, g, d, lo, hi) and not (causal and g > i)]


@register("loop", features=FEATURES, memory=_memory, slow_on_cpu=True)
def loop(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Python loop over queries gathering each row's keys (linear memory, slow)"""
    B, H, n, D = q.shape
    lo, hi = pattern.offset_range
    gset = set(pattern.global_tokens)
    acc = torch.promote_types(q.dtype, torch.float32)
    parts = []
    for d, heads in head_groups(pattern, H):
        qg, kg, vg = (gather_heads(t, heads) for t in (q, k, v))  # (B, Hg, n, D)
        # Slice from copies in >= fp32: the backward of each row's slice adds that
        # row's gradient into dK/dV, and n such additions in bf16 would lose what a
        # single matrix product (fp32 accumulation) keeps. The arithmetic stays in q's dtype.
        kg, vg = kg.to(acc), vg.to(acc)
        rows = []
        for i in range(n):
            if i in gset:  # a global query: every key (j <= i when causal)
                end = i + 1 if pattern.causal else n
                kk, vv, keys = kg[:, :, :end], vg[:, :, :end], slice(0, end)
            else:
                # window keys i + d*c, truncated at the edges: a strided view, no copy
                j0 = i + d * max(lo, -(i // d))
                j1 = i + d * min(hi, (n - 1 - i) // d)
                kk, vv, keys = kg[:, :, j0 : j1 + 1 : d], vg[:, :, j0 : j1 + 1 : d], slice(j0, j1 + 1, d)  # (B,Hg,K,D)
                extra = _extra_globals(i, d, lo, hi, pattern.global_tokens, pattern.causal)
                if extra:
                    idx = torch.tensor(extra, device=q.device)
                    kk = torch.cat([kk, kg.index_select(2, idx)], dim=2)
                    vv = torch.cat([vv, vg.index_select(2, idx)], dim=2)
            kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            s = torch.matmul(kk, qg[:, :, i, :, None]).squeeze(-1) * scale  # (B, Hg, K)
            if key_mask is None:
                p = torch.softmax(s.to(acc), dim=-1)
            else:  # the row's keys present in each sample; a row left without any is 0
                ok = key_mask[:, keys]  # (B, K)
                if i not in gset and extra:
                    ok = torch.cat([ok, key_mask.index_select(1, idx)], dim=1)
                ok = ok[:, None, :]  # (B, 1, K)
                p = torch.softmax(s.to(acc).masked_fill(~ok, float("-inf")), dim=-1)
                p = p.masked_fill(~ok.any(-1, keepdim=True), 0.0)
            rows.append(torch.matmul(p.to(v.dtype).unsqueeze(-2), vv).squeeze(-2))  # (B, Hg, D)
        parts.append((heads, torch.stack(rows, dim=2)))  # (B, Hg, n, D)
    return scatter_heads(parts, H)
