"""chunked: the Longformer / Hugging Face sliding-chunks algorithm (the paper's
Longformer-chunk), extended to causal windows, dilation and per-head dilation.

With window offsets c in [lo, hi] (lo = -w/2, hi = w/2; causal lo = -w, hi = 0) and
band width W = w + 1, the scores live in a band

    S[b, h, i, c - lo] = scale * q_i . k_{i + d*c}            # (B, H, n, W)

computed chunk by chunk: queries are cut into chunks of C rows; chunk t meets the
C + W - 1 keys [t*C + lo, t*C + C - 1 + hi] (overlapping key chunks), one matrix
product per chunk gives (C, C + W - 1) scores, and a skew (a strided view) moves
the diagonals into the W columns of the band. With the original's C = w the
intermediate is about 2x the band; here C = w/4, about 1.25x. Never n x n.

Dilation d: a dilated window over n tokens is the plain window over each of the d
interleaved subsequences {i : i mod d = r}, so tokens are permuted into d residue
classes and the undilated band runs on each. Heads are grouped by dilation.

Global tokens, as Hugging Face does: every non-global row gets the global keys'
scores joined to its band under one softmax (global keys are removed from the band
so nothing is counted twice); global query rows are recomputed as dense attention
over all keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnbench import FEATURES, Pattern, register
from attnbench.ops import gather_heads, global_index, head_groups, scatter_heads

MIN_CHUNK = 16


def _chunk(window: int, m: int) -> int:
    # A chunk of C rows meets C + w keys, so the intermediate is (C + w) / (w + 1)
    # times the band: the original's C = w doubles it; C = w/4 keeps it at 1.25x
    # while each matmul still has enough rows. Small windows get MIN_CHUNK rows.
    return max(1, min(max(window // 4, MIN_CHUNK), m))


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    W = pattern.window + 1
    C = max(pattern.window // 4, MIN_CHUNK)
    G = len(pattern.global_tokens)
    rows = B * H * (n + C * pattern.max_dilation)
    band = rows * (C + W - 1) * esize * 2 + rows * (W + G) * (4 + 4 + esize + 1)  # chunk scores, fp32 scores/probs
    dense_g = B * H * G * n * (esize + 8)
    io = 4 * B * H * n * D * esize
    return (band + dense_g + io) * (2.5 if backward else 1.0)


def _band_scores(q: torch.Tensor, kp: torch.Tensor, W: int, C: int) -> torch.Tensor:
    """q (..., M, D) with M = nc*C; kp (..., M + W - 1, D), kp[p] = key of offset p - (row).
    Returns S (..., M, W) with S[t, b] = q[t] . kp[t + b]."""
    *lead, M, D = q.shape
    nc, L = M // C, C + W - 1
    qc = q.reshape(*lead, nc, C, D)  # (..., nc, C, D)
    kc = kp.unfold(-2, L, C)  # (..., nc, D, L): overlapping key chunks, a view
    s = torch.matmul(qc, kc).contiguous()  # (..., nc, C, L)
    # skew without a copy: entry (a, a + b) of a chunk sits at flat a*(L+1) + b, so the
    # band is a strided view with row stride L+1 (a + b <= C-1 + W-1 = L-1: in bounds)
    st = s.stride()
    band = s.as_strided((*s.shape[:-1], W), (*st[:-2], L + 1, 1))  # (..., nc, C, W)
    return band.reshape(*lead, M, W)  # the one copy: the band itself


def _band_av(p: torch.Tensor, vp: torch.Tensor, C: int) -> torch.Tensor:
    """p (..., M, W) band probabilities, vp (..., M + W - 1, D). Returns (..., M, D)
    with out[t] = sum_b p[t, b] vp[t + b]."""
    *lead, M, W = p.shape
    nc, L = M // C, C + W - 1
    p = p.reshape(*lead, nc, C, W)
    # unskew (inverse of the skew above): band column b of row a -> chunk column a + b
    p = F.pad(p, (0, L + 1 - W)).flatten(-2)[..., : C * L]  # (..., nc, C*L)
    p = p.view(*lead, nc, C, L)  # (..., nc, C, L)
    vc = vp.unfold(-2, L, C).transpose(-1, -2)  # (..., nc, L, D)
    return torch.matmul(p, vc).reshape(*lead, M, vp.shape[-1])  # (..., M, D)


def _split(x: torch.Tensor, d: int, M: int) -> torch.Tensor:
    """(B, H, n, X) -> (B, H, d, M, X): residue class r holds tokens r, r+d, ...,
    zero-padded to M rows."""
    B, H, n, X = x.shape
    m = math.ceil(n / d)
    x = F.pad(x, (0, 0, 0, m * d - n)).view(B, H, m, d, X).transpose(2, 3)  # (B, H, d, m, X)
    return F.pad(x, (0, 0, 0, M - m))


def _merge(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_split`: (B, H, d, M, X) -> (B, H, n, X)."""
    B, H, d, M, X = x.shape
    m = math.ceil(n / d)
    return x[:, :, :, :m].transpose(2, 3).reshape(B, H, m * d, X)[:, :, :n]


@register("chunked", features=FEATURES, memory=_memory)
def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """overlapping chunks into an (n, w+1) band, as Longformer / Hugging Face (linear memory)"""
    B, H, n, D = q.shape
    lo, hi = pattern.offset_range
    W = hi - lo + 1
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax dtype
    glob = global_index(pattern, q.device)  # (G,)
    G = glob.numel()
    is_g = torch.zeros(n, dtype=torch.bool, device=q.device)
    is_g[glob] = True
    if G:
        kg, vg = k.index_select(2, glob), v.index_select(2, glob)  # (B, H, G, D)
        sg_all = (torch.matmul(q, kg.transpose(-1, -2)) * scale).to(acc)  # (B, H, n, G)
        if pattern.causal:
            later = glob.view(1, -1) > torch.arange(n, device=q.device).view(-1, 1)  # (n, G)
            sg_all = sg_all.masked_fill(later, float("-inf"))

    parts = []
    for d, heads in head_groups(pattern, H):
        m = math.ceil(n / d)  # longest residue class
        C = _chunk(pattern.window, m)
        M = math.ceil(m / C) * C
        qs = _split(gather_heads(q, heads), d, M)  # (B, Hg, d, M, D)
        # keys padded by -lo in front so row t's band starts at kp[t]: (B, Hg, d, M+W-1, D)
        kp = F.pad(_split(gather_heads(k, heads), d, M), (0, 0, -lo, hi))
        vp = F.pad(_split(gather_heads(v, heads), d, M), (0, 0, -lo, hi))
        s = _band_scores(qs, kp, W, C) * scale  # (B, Hg, d, M, W)

        # which band entries are real keys of real rows: r = class, t = row, b = column
        r = torch.arange(d, device=q.device).view(d, 1, 1)
        t = torch.arange(M, device=q.device).view(1, M, 1)
        b = torch.arange(W, device=q.device).view(1, 1, W)
        u = t + lo + b  # key index inside the class
        j = r + d * u  # original key position   # (d, M, W)
        valid = (u >= 0) & (j < n)
        if G:
            valid &= ~is_g[j.clamp(0, n - 1)]  # global keys live in their own columns
        valid |= (b == -lo) & (r + d * t >= n)  # padding rows keep one finite score: no NaN
        s = s.to(acc).masked_fill_(~valid, float("-inf"))  # s is a fresh tensor: in place
        if G:
            s = torch.cat([s, _split(gather_heads(sg_all, heads), d, M)], dim=-1)  # (B, Hg, d, M, W+G)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        del s  # peak memory: the scores can go before the probabilities are unskewed
        o = _band_av(p[..., :W], vp, C)  # (B, Hg, d, M, D)
        if G:
            o = o + torch.matmul(p[..., W:], gather_heads(vg, heads).unsqueeze(2))  # (B,Hg,d,M,G)@(B,Hg,1,G,D)
        parts.append((heads, _merge(o, n)))  # (B, Hg, n, D)
    out = scatter_heads(parts, H)

    if G:
        # global rows attend to every key (j <= g when causal): dense (B, H, G, n)
        sr = (torch.matmul(q.index_select(2, glob), k.transpose(-1, -2)) * scale).to(acc)
        if pattern.causal:
            sr = sr.masked_fill(torch.arange(n, device=q.device).view(1, -1) > glob.view(-1, 1), float("-inf"))
        og = torch.matmul(torch.softmax(sr, dim=-1).to(v.dtype), v)  # (B, H, G, D)
        out = out.index_copy(2, glob, og)
    return out
