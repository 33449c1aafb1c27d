"""chunked: the Longformer / Hugging Face sliding-chunks algorithm (the paper's
Longformer-chunk), extended to (left, right) and causal windows, dilation and per-head
dilation.

With window offsets c in [lo, hi] (lo = -left, hi = right) and band width
W = left + right + 1, the scores live in a band

    S[b, h, i, c - lo] = scale * q_i . k_{i + d*c}            # (B, H, n, W)

computed chunk by chunk: queries are cut into chunks of C rows; chunk t meets the
C + W - 1 keys [t*C + lo, t*C + C - 1 + hi], which lie in the key blocks (of C rows)
t .. t + J - 1, J = ceil((C + W - 1) / C). One matrix product per chunk against those
J*C keys gives its (C, J*C) scores, and a gather moves the diagonals into the W columns
of the band, band[a, b] = scores[a, a + b]. With the original's C = w the intermediate
is about 2x the band; here C = w/4, about 1.25x to 1.5x. Never n x n.

Why blocks and a gather, not Longformer's overlapping ``unfold`` and ``as_strided``
skew: compiled code (inductor) may lay out a view's base differently, and then a strided
view reads past it; under ``torch.compile`` the unfold version gave wrong key gradients
without any error. Block slices, cat, pad, reshape and gather compile exactly (tested
against eager in tests/test_compile.py). The price is a copy of the keys and values,
J times, for the chunks.

Dilation d: a dilated window over n tokens is the plain window over each of the d
interleaved subsequences {i : i mod d = r}, so tokens are permuted into d residue
classes and the undilated band runs on each. Heads are grouped by dilation.

Global tokens, as Hugging Face does: every non-global row gets the global keys'
scores joined to its band under one softmax (global keys are removed from the band
so nothing is counted twice); global query rows are recomputed as dense attention
over all keys.
"""

from __future__ import annotations

import functools
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
    d = pattern.max_dilation
    m = math.ceil(n / d)
    W = min(pattern.left, m - 1) + min(pattern.right, m - 1) + 1  # the band, clipped to the class
    C = _chunk(W - 1, m)
    L = _cdiv(C + W - 1, C) * C  # keys per chunk
    G = len(pattern.global_tokens)
    rows = B * H * (n + C * d)  # residue classes padded to whole chunks
    chunks = 2 * rows * L // C * D * esize  # the keys and values of every chunk
    # the chunk scores and the band at the gather; later fp32 scores and probabilities
    band = max(rows * (L + W) * esize, rows * (W + G) * 8)
    dense_g = B * H * G * n * (esize + 8)
    io = 4 * B * H * n * D * esize
    return (chunks + band + dense_g + io) * (2.5 if backward else 1.0)


def _key_chunks(x: torch.Tensor, lo: int, hi: int, C: int) -> torch.Tensor:
    """Keys (or values) of one residue class, ``x`` (..., M, D) with M = nc*C, as each
    chunk of queries reads them: padded by -lo rows in front (row t's window then starts
    at row t) and at the end to whole blocks of C, then for chunk t the J blocks
    t .. t + J - 1 side by side, J = ceil((C + W - 1) / C): (..., nc, J*C, D). A copy of
    J times x, made of block slices (Longformer's overlapping ``unfold`` view is not
    safe under compilation)."""
    *lead, M, D = x.shape
    nc, J = M // C, _cdiv(C + hi - lo, C)
    x = F.pad(x, (0, 0, -lo, (nc + J - 1) * C - M + lo))  # (..., (nc + J - 1) * C, D)
    blocks = x.reshape(*lead, nc + J - 1, C, D)
    return torch.cat([blocks[..., j : j + nc, :, :] for j in range(J)], dim=-2)  # (..., nc, J*C, D)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=32)
def _diagonals(C: int, W: int, device: torch.device) -> torch.Tensor:
    """(C, W) int64: column a + b of a chunk's scores is band column b of its row a."""
    return (torch.arange(C, device=device)[:, None] + torch.arange(W, device=device)[None, :]).contiguous()


def _band_scores(q: torch.Tensor, kc: torch.Tensor, W: int, C: int) -> torch.Tensor:
    """q (..., M, D), M = nc*C; kc (..., nc, L, D) from :func:`_key_chunks`, L = J*C.
    Returns S (..., M, W) with S[t, b] = q[t] . (key of offset b of row t)."""
    *lead, M, D = q.shape
    nc = M // C
    s = torch.matmul(q.reshape(*lead, nc, C, D), kc.transpose(-1, -2))  # (..., nc, C, L)
    idx = _diagonals(C, W, q.device).expand(*s.shape[:-1], W)  # (..., nc, C, W)
    return s.gather(-1, idx).reshape(*lead, M, W)  # (..., M, W): band[a, b] = s[a, a + b]


def _band_av(p: torch.Tensor, vc: torch.Tensor, C: int) -> torch.Tensor:
    """p (..., M, W) band probabilities, vc (..., nc, L, D) from :func:`_key_chunks`.
    Returns (..., M, D) with out[t] = sum_b p[t, b] (value of offset b of row t)."""
    *lead, M, W = p.shape
    nc, L = M // C, vc.shape[-2]
    p = p.reshape(*lead, nc, C, W)
    # unskew (the gather's inverse): band column b of row a -> chunk column a + b. Padded
    # to rows of L + 1, row a's entries shift by a once the rows are read L wide.
    p = F.pad(p, (0, L + 1 - W)).flatten(-2)[..., : C * L]  # (..., nc, C*L)
    p = p.view(*lead, nc, C, L)  # (..., nc, C, L)
    return torch.matmul(p, vc).reshape(*lead, M, vc.shape[-1])  # (..., M, D)


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
def chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """chunks of queries against blocks of keys into an (n, w+1) band, as Longformer / HF (linear memory)"""
    B, H, n, D = q.shape
    dev = q.device
    lo0, hi0 = pattern.offset_range
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax dtype
    glob = global_index(pattern, dev)  # (G,)
    G = glob.numel()
    is_g = torch.zeros(n, dtype=torch.bool, device=dev)
    is_g[glob] = True
    present = torch.ones(1, n, dtype=torch.bool, device=dev) if key_mask is None else key_mask  # (B or 1, n)
    if G:
        kg, vg = k.index_select(2, glob), v.index_select(2, glob)  # (B, H, G, D)
        sg_all = (torch.matmul(q, kg.transpose(-1, -2)) * scale).to(acc)  # (B, H, n, G)
        g_ok = present[:, None, :].index_select(2, glob)  # (B or 1, 1, G): global keys present
        if pattern.causal:
            g_ok = g_ok & (glob.view(1, -1) <= torch.arange(n, device=dev).view(-1, 1))  # (B or 1, n, G)
        sg_all = sg_all.masked_fill(~g_ok.unsqueeze(1), float("-inf"))
        g_any = g_ok.any(-1).expand(-1, n)  # (B or 1, n): rows that have a global key

    parts = []
    for d, heads in head_groups(pattern, H):
        m = math.ceil(n / d)  # longest residue class
        # offsets past the class never meet a key: a window wider than the sequence
        # (Mistral's 4,096 keys at n = 2048) gets a band as wide as the sequence
        lo, hi = max(lo0, 1 - m), min(hi0, m - 1)
        W = hi - lo + 1
        C = _chunk(W - 1, m)
        M = math.ceil(m / C) * C
        qs = _split(gather_heads(q, heads), d, M)  # (B, Hg, d, M, D)
        kc = _key_chunks(_split(gather_heads(k, heads), d, M), lo, hi, C)  # (B, Hg, d, nc, J*C, D)
        vc = _key_chunks(_split(gather_heads(v, heads), d, M), lo, hi, C)
        s = _band_scores(qs * scale, kc, W, C)  # (B, Hg, d, M, W)

        # which band entries are real keys of real rows: r = class, t = row, b = column
        r = torch.arange(d, device=dev).view(d, 1, 1)
        t = torch.arange(M, device=dev).view(1, M, 1)
        b = torch.arange(W, device=dev).view(1, 1, W)
        u = t + lo + b  # key index inside the class
        j = r + d * u  # original key position   # (d, M, W)
        valid = (u >= 0) & (j < n)
        if G:
            valid &= ~is_g[j.clamp(0, n - 1)]  # global keys live in their own columns
        empty = None
        if key_mask is not None:
            valid = valid & present[:, j.clamp(0, n - 1)]  # (B, d, M, W): keys present in each sample
            # rows a key mask left without keys: one finite score, and 0 out (as the reference)
            has = valid.any(-1)  # (B, d, M)
            if G:
                has = has | _split(g_any[:, None, :, None].to(torch.uint8), d, M)[:, 0, ..., 0].bool()
            empty = ~has & (r[..., 0] + d * t[..., 0] < n)  # (B, d, M)
            valid = valid | ((b == -lo) & empty[..., None])
            valid = valid.unsqueeze(1)  # (B, 1, d, M, W)
        valid |= (b == -lo) & (r + d * t >= n)  # padding rows keep one finite score: no NaN
        s = s.to(acc).masked_fill_(~valid, float("-inf"))  # s is a fresh tensor: in place
        if G:
            s = torch.cat([s, _split(gather_heads(sg_all, heads), d, M)], dim=-1)  # (B, Hg, d, M, W+G)
        p = torch.softmax(s, dim=-1).to(v.dtype)
        del s  # peak memory: the scores can go before the probabilities are unskewed
        o = _band_av(p[..., :W], vc, C)  # (B, Hg, d, M, D)
        if G:
            o = o + torch.matmul(p[..., W:], gather_heads(vg, heads).unsqueeze(2))  # (B,Hg,d,M,G)@(B,Hg,1,G,D)
        if empty is not None:
            o = o.masked_fill(empty[:, None, :, :, None], 0.0)
        parts.append((heads, _merge(o, n)))  # (B, Hg, n, D)
    out = scatter_heads(parts, H)

    if G:
        # global rows attend to every key present (j <= g when causal): dense (B, H, G, n)
        sr = (torch.matmul(q.index_select(2, glob), k.transpose(-1, -2)) * scale).to(acc)
        ok = present[:, None, None, :]  # (B or 1, 1, 1, n)
        if pattern.causal:
            ok = ok & (torch.arange(n, device=dev).view(1, -1) <= glob.view(-1, 1))  # (B or 1, 1, G, n)
        none = ~ok.any(-1, keepdim=True)  # global rows without a key: 0
        og = torch.matmul(torch.softmax(sr.masked_fill(~(ok | none), float("-inf")), dim=-1).to(v.dtype), v)
        out = out.index_copy(2, glob, og.masked_fill(none, 0.0) if key_mask is not None else og)  # (B, H, G, D)
    return out
