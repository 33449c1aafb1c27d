"""Fused Triton kernels for Longformer attention (window, dilation, global tokens, causal).

Helper module of ``impls/triton_fused.py``; the registry does not import it (leading
underscore). It is loaded twice when needed, as two module objects: once with
``TRITON_INTERPRET=1`` set (``@triton.jit`` then builds interpreted functions, used
for CPU tensors) and once without (compiled kernels, used for CUDA tensors).

The algorithm is FlashAttention-2 with the pattern folded into the loops.

Notation. q, k, v, o are ``(B, H, n, D)``, made contiguous by the caller. The scale
is applied in base 2: ``s = q.k * scale * log2(e)``, so ``exp2(s - lse2)`` is the
probability and ``lse2 = log2(sum_j exp2(s_j))`` is what the forward saves.

Dilation without visiting skipped keys. With dilation d, token ``p = r + d*t`` is
row ``t`` of residue class ``r = p mod d``; a dilated window over the tokens is the
plain window over each class (offsets ``c`` in ``[lo, hi]``). The kernels address
class ``r`` with the token stride times d, so nothing is permuted in memory. A
program owns one block of rows of one class; the class holds
``m_r = ceil((n - r) / d)`` tokens. Heads with different dilations are launched
separately (one launch per dilation group, the group's head indices in ``heads``).

Work is O(n * (w + G)): a query block of BLOCK_M rows meets keys
``[t0 + lo, t0 + BLOCK_M - 1 + hi]`` of its class, ``ceil((BLOCK_M + w) / BLOCK_N)``
key blocks. That loop runs in three stages (as the fused-attention tutorial splits
causal blocks into on- and off-band): blocks that straddle the band's edges get the
band mask; the blocks in between lie wholly inside the band and need only the
sequence-end mask.

Global tokens, without making the kernel dense:
* non-global rows: after the window, one more loop over the G global keys (gathered
  by index); a global key that is already in the row's window is masked there, so
  nothing is counted twice; causal masks ``g > p``.
* global rows attend to every key: a separate kernel with one program per block of
  global rows loops over all key blocks (O(G * n)). The window kernel computes and
  stores those rows too (they share blocks with ordinary rows); the global-rows
  kernel, launched after it on the same stream, overwrites them. Same for dQ.
* backward: the dK/dV window kernel also loops over the global rows (every key gets
  their contribution), and a separate kernel adds, to each global key, the
  contribution of the non-global rows that reach it outside their window.

Loop bounds and Triton's interpreter. The interpreter turns every runtime scalar into
a 1-element numpy array, and ``range()`` over one calls ``int()`` on it, which numpy
2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"). So every
loop bound here is ``STATIC if STATIC_LOOPS else runtime``: the interpreted launch
passes the trip counts as constexprs (plain Python ints; a conditional expression
over a constexpr is resolved statically in the compiled kernel too), and the compiled
launch keeps runtime bounds so that one binary serves every window, n and G.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_fused import AUTOTUNE_MIN_SEQ, INTERPRETER_BLOCK, block_d

#: this copy was imported with TRITON_INTERPRET set (its kernels run on the CPU in numpy)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")

LOG2E = 1.4426950408889634

#: scalar kernel arguments that vary per call; not specialised, so one binary serves all.
#: n_tune (the window kernels' last) is n rounded up to a power of two: unused by the
#: code, it is there for the autotuner's key, so that each size bucket is tuned apart
_NO_SPEC = ["n", "H", "HG", "d", "lo", "hi", "G", "causal", "n_tune"]


# ---------------------------------------------------------------------------- helpers
# Reductions and cdiv through builtins only. tl.sum, tl.max and tl.cdiv are themselves
# @triton.jit functions of triton.language, compiled or interpreted depending on how
# *triton* was first imported, which need not match this copy: an interpreted kernel
# cannot call a compiled one ("Cannot call @triton.jit'd outside of the scope of a
# kernel") nor the reverse. tl.reduce is a builtin. The compiled copy gives it combine
# functions of its own; the interpreted copy gives it triton's, which the interpreter
# recognises by identity and replaces with numpy reductions (it never calls them; a
# combine function of ours would be called once per element).
_STD_COMBINES = tuple(getattr(tl.standard, f, None) for f in ("_sum_combine", "_elementwise_max", "_elementwise_min"))
if INTERPRETED and None not in _STD_COMBINES:
    _SUM_COMBINE, _MAX_COMBINE, _MIN_COMBINE = _STD_COMBINES
else:

    @triton.jit
    def _SUM_COMBINE(a, b):
        return a + b

    @triton.jit
    def _MAX_COMBINE(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _MIN_COMBINE(a, b):
        return tl.minimum(a, b)


@triton.jit
def _cdiv_k(a, b):
    return (a + b - 1) // b


@triton.jit
def _softmax_update(acc, l_i, m_i, s, v, DOT_PREC: tl.constexpr):
    # Online softmax (FlashAttention-2), one key block:
    #   m' = max(m, rowmax(s));  alpha = 2^(m - m');  P = 2^(s - m')
    #   l' = alpha * l + rowsum(P);  acc' = alpha * acc + P V
    # s (BLOCK_M, BLOCK_N) log2-scaled scores, -inf where masked; v (BLOCK_N, BLOCK_D).
    # m starts finite (-1e30), so a fully masked block gives alpha = 1, P = 0 (no NaN).
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX_COMBINE))  # (BLOCK_M,)
    alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,)
    p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)  # (BLOCK_M,)
    acc = acc * alpha[:, None]  # (BLOCK_M, BLOCK_D), fp32
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
    return acc, l_i, m_new


@triton.jit
def _fwd_window_blocks(
    acc, l_i, m_i, q, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2, kb_start, kb_end,
    BAND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # Key blocks kb_start..kb_end-1 of the band of query rows t0..t0+BLOCK_M-1 (class r).
    # Key block kb holds class indices u = t0 + lo + kb*BLOCK_N + b; query row a sees key
    # column b iff lo <= u - t <= hi, i.e. 0 <= kb*BLOCK_N + b - a <= w_span (= hi - lo).
    offs_a = tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM  # (BLOCK_D,): zero-pads head_dim up to a power of two
    for kb in range(kb_start, kb_end):
        u = t0 + lo + kb * BLOCK_N + offs_b  # (BLOCK_N,) key index inside class r
        col_ok = (u >= 0) & (u < m_r)  # (BLOCK_N,): windows are truncated at the edges
        kv_off = (r + d * u)[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_N, BLOCK_D)
        kv_ok = col_ok[:, None] & e_ok[None, :]
        k = tl.load(Kb + kv_off, mask=kv_ok, other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        v = tl.load(Vb + kv_off, mask=kv_ok, other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_M, BLOCK_N)
        if BAND:
            rel = kb * BLOCK_N + offs_b[None, :] - offs_a[:, None]  # (BLOCK_M, BLOCK_N) = u - t - lo
            ok = col_ok[None, :] & (rel >= 0) & (rel <= w_span)
        else:  # block wholly inside the band: only the sequence ends matter
            ok = col_ok[None, :]
        s = tl.where(ok, s, float("-inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _window_stages(w_span, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # A block of BLOCK_A rows meets ceil((BLOCK_A + w_span) / BLOCK_B) blocks of BLOCK_B
    # columns of its band (w_span = hi - lo = w). Block j lies wholly inside the band iff
    # j*BLOCK_B >= BLOCK_A - 1 and (j+1)*BLOCK_B <= w_span + 1: blocks [k1, k2).
    n_blocks = _cdiv_k(BLOCK_A + w_span, BLOCK_B)
    k1 = tl.minimum((BLOCK_A - 1 + BLOCK_B - 1) // BLOCK_B, n_blocks)
    k2 = tl.maximum(k1, (w_span + 1) // BLOCK_B)
    return k1, k2, n_blocks


def static_stages(w_span: int, block_a: int, block_b: int) -> tuple[int, int, int]:
    """Host twin of :func:`_window_stages` (the interpreter's constexpr trip counts)."""
    n_blocks = -(-(block_a + w_span) // block_b)
    k1 = min(-(-(block_a - 1) // block_b), n_blocks)
    k2 = max(k1, (w_span + 1) // block_b)
    return k1, k2, n_blocks


# ---------------------------------------------------------------------------- forward
# Non-global rows of one dilation group. For query p = r + d*t:
#   O_p = sum_j softmax_j(s_pj) v_j over j in {r + d*u : lo <= u - t <= hi, 0 <= u < m_r}
#         and over the global keys outside that set (g <= p when causal),
#   LSE2_p = log2 sum_j 2^(s_pj),  s_pj = scale * log2(e) * q_p . k_j.
# grid: (d * ceil(ceil(n/d) / BLOCK_M), B * HG); program (class r, row block, batch, head).
@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_window_kernel(
    Q, K, V, O, LSE, HEADS, GLOB,
    scale_log2, n, H, HG, d, lo, hi, G, causal, n_tune,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC_LOOPS: tl.constexpr,
    S_K1: tl.constexpr, S_K2: tl.constexpr, S_KN: tl.constexpr, S_GN: tl.constexpr,
):  # fmt: skip
    CDT = tl.float32 if UPCAST else Q.dtype.element_ty  # tile dtype of the dot operands
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HG
    h = tl.load(HEADS + pid_bh % HG)  # head index of this group's pid_bh % HG-th head
    nb = _cdiv_k(_cdiv_k(n, d), BLOCK_M)  # row blocks per class (the longest class)
    r = pid // nb  # residue class
    t0 = (pid % nb) * BLOCK_M  # first row (class index) of the block
    m_r = (n - r + d - 1) // d  # tokens in class r
    bh = (b * H + h).to(tl.int64)
    Qb = Q + bh * n * HEAD_DIM
    Kb = K + bh * n * HEAD_DIM
    Vb = V + bh * n * HEAD_DIM

    # Row quantities are recomputed where needed rather than kept live across the loops:
    # held through them they cost registers the tiles need (ptxas spills otherwise).
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    t = t0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) class index of each row
    pos = r + d * t  # (BLOCK_M,) token position
    q_ok = (t < m_r)[:, None] & e_ok[None, :]
    q = tl.load(Qb + pos[:, None] * HEAD_DIM + offs_e[None, :], mask=q_ok, other=0.0).to(CDT)  # (BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max (log2 units)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running sum of 2^(s - m)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)  # running sum of P V

    # window: leading edge blocks (band mask), inner blocks (no band mask), trailing edge
    w_span = hi - lo
    k1, k2, kn = _window_stages(w_span, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_window_blocks(
        acc, l_i, m_i, q, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2,
        0, S_K1 if STATIC_LOOPS else k1, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_window_blocks(
        acc, l_i, m_i, q, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2,
        S_K1 if STATIC_LOOPS else k1, S_K2 if STATIC_LOOPS else k2, False,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_window_blocks(
        acc, l_i, m_i, q, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2,
        S_K2 if STATIC_LOOPS else k2, S_KN if STATIC_LOOPS else kn, True,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip

    # global keys outside the window (G = 0: no iteration)
    offs_g = tl.arange(0, BLOCK_G)
    for gb in range(S_GN if STATIC_LOOPS else _cdiv_k(G, BLOCK_G)):
        gi = gb * BLOCK_G + offs_g  # (BLOCK_G,)
        g_ok = gi < G
        gpos = tl.load(GLOB + gi, mask=g_ok, other=0)  # (BLOCK_G,) key positions
        kv_off = gpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_G, BLOCK_D)
        kv_ok = g_ok[:, None] & e_ok[None, :]
        k = tl.load(Kb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
        v = tl.load(Vb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_M, BLOCK_G)
        pos = r + d * (t0 + tl.arange(0, BLOCK_M))  # (BLOCK_M,)
        diff = gpos[None, :] - pos[:, None]  # (BLOCK_M, BLOCK_G)
        in_win = ((diff % d) == 0) & (diff >= lo * d) & (diff <= hi * d)  # counted in the window loop
        ok = g_ok[None, :] & ~in_win & ((diff <= 0) | (causal == 0))
        s = tl.where(ok, s, float("-inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, DOT_PREC)

    # O = acc / l, LSE2 = m + log2(l); every real row has its own key, so l >= 1 there
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # (BLOCK_M,): padding rows only
    out = acc / l_safe[:, None]  # (BLOCK_M, BLOCK_D)
    t = t0 + tl.arange(0, BLOCK_M)
    row_ok = t < m_r
    pos = r + d * t  # (BLOCK_M,)
    # Global rows are stored too (wrong: window only) and overwritten by
    # _fwd_global_rows_kernel, launched after this one on the same stream. Masking them
    # here would need their flags in the epilogue, which costs the loop registers.
    o_ptrs = O + bh * n * HEAD_DIM + pos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_M, BLOCK_D)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])
    tl.store(LSE + bh * n + pos, m_i + tl.math.log2(l_safe), mask=row_ok)


# Global rows: every key (j <= g when causal), dense over n for these G rows only.
#   O_g = sum_j softmax_j(s_gj) v_j,  LSE2_g = log2 sum_j 2^(s_gj).
# grid: (ceil(G / BLOCK_G), B * H).
@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_global_rows_kernel(
    Q, K, V, O, LSE, GLOB, scale_log2, n, G, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC_LOOPS: tl.constexpr, S_KN: tl.constexpr,
):  # fmt: skip
    CDT = tl.float32 if UPCAST else Q.dtype.element_ty  # tile dtype of the dot operands
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Qb = Q + bh * n * HEAD_DIM
    Kb = K + bh * n * HEAD_DIM
    Vb = V + bh * n * HEAD_DIM
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    offs_b = tl.arange(0, BLOCK_N)
    gi = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gi < G
    gpos = tl.load(GLOB + gi, mask=g_ok, other=0)  # (BLOCK_G,) row positions
    io_off = gpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_G, BLOCK_D)
    io_ok = g_ok[:, None] & e_ok[None, :]
    q = tl.load(Qb + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    # causal: keys past the block's last row are never needed
    key_end = tl.where(causal != 0, tl.reduce(tl.where(g_ok, gpos, 0), 0, _MAX_COMBINE) + 1, n)
    for kb in range(S_KN if STATIC_LOOPS else _cdiv_k(key_end, BLOCK_N)):
        j = kb * BLOCK_N + offs_b  # (BLOCK_N,) key positions
        j_ok = j < n
        kv_off = j[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_N, BLOCK_D)
        kv_ok = j_ok[:, None] & e_ok[None, :]
        k = tl.load(Kb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_N, BLOCK_D)
        v = tl.load(Vb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_G, BLOCK_N)
        ok = j_ok[None, :] & ((j[None, :] <= gpos[:, None]) | (causal == 0))
        s = tl.where(ok, s, float("-inf"))
        acc, l_i, m_i = _softmax_update(acc, l_i, m_i, s, v, DOT_PREC)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]  # (BLOCK_G, BLOCK_D)
    tl.store(O + bh * n * HEAD_DIM + io_off, out.to(O.dtype.element_ty), mask=io_ok)
    tl.store(LSE + bh * n + gpos, m_i + tl.math.log2(l_safe), mask=g_ok)


# ---------------------------------------------------------------------------- backward
# With P = softmax(S), dO given:  dV = P^T dO,  dP = dO V^T,
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i),
#   dQ = scale * dS K,  dK = scale * dS^T Q.
# P is recomputed from the saved LSE: P_ij = 2^(s_ij - LSE2_i).


# delta_i = rowsum(dO_i * O_i), fp32.  grid: (ceil(n / BLOCK_M), B * H).
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_delta_kernel(
    O, DO, DELTA, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_e = tl.arange(0, BLOCK_D)
    off = i[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_M, BLOCK_D)
    ok = (i < n)[:, None] & (offs_e < HEAD_DIM)[None, :]
    o = tl.load(O + bh * n * HEAD_DIM + off, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + bh * n * HEAD_DIM + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * n + i, tl.reduce(o * do, 1, _SUM_COMBINE), mask=i < n)


@triton.jit
def _bwd_kv_blocks(
    dk, dv, k, v, Qb, DOb, LSEb, DELTAb, ROW_GLOBAL, r, d, u0, m_r, hi, w_span, scale_log2,
    qb_start, qb_end, BAND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # Query blocks qb_start..qb_end-1 of the band of key block u0..u0+BLOCK_N-1 (class r).
    # Query block qb holds class indices t = u0 - hi + qb*BLOCK_M + a; key b is in row a's
    # window iff lo <= u - t <= hi, i.e. 0 <= qb*BLOCK_M + a - b <= w_span.
    # Transposed (key-major) tiles as in the fused-attention tutorial: dK, dV rows stay put.
    offs_a = tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    for qb in range(qb_start, qb_end):
        t = u0 - hi + qb * BLOCK_M + offs_a  # (BLOCK_M,) query class index
        in_seq = (t >= 0) & (t < m_r)
        pos = r + d * t  # (BLOCK_M,)
        is_g = tl.load(ROW_GLOBAL + pos, mask=in_seq, other=1)
        row_ok = in_seq & (is_g == 0)  # global rows are added from their own loop
        io_off = pos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_M, BLOCK_D)
        io_ok = in_seq[:, None] & e_ok[None, :]
        q = tl.load(Qb + io_off, mask=io_ok, other=0.0).to(k.dtype)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DOb + io_off, mask=io_ok, other=0.0).to(k.dtype)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSEb + pos, mask=in_seq, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTAb + pos, mask=in_seq, other=0.0)  # (BLOCK_M,)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # (BLOCK_N, BLOCK_M)
        if BAND:
            rel = qb * BLOCK_M + offs_a[None, :] - offs_b[:, None]  # (BLOCK_N, BLOCK_M)
            ok = row_ok[None, :] & (rel >= 0) & (rel <= w_span)
        else:
            ok = row_ok[None, :]
        p_t = tl.where(ok, tl.math.exp2(s_t - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_M) = P^T
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M) = dP^T
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) = dS^T
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_D)
    return dk, dv


# dK, dV of one key block of one class, from (a) the non-global queries whose window
# holds the key and (b) every global query (j <= g when causal):
#   dV_j = sum_i P_ij dO_i,  dK_j = scale * sum_i dS_ij q_i.
# grid: (d * ceil(ceil(n/d) / BLOCK_N), B * HG).
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_kv_window_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, HEADS, ROW_GLOBAL, GLOB,
    scale, scale_log2, n, H, HG, d, lo, hi, G, causal, n_tune,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC_LOOPS: tl.constexpr,
    S_K1: tl.constexpr, S_K2: tl.constexpr, S_KN: tl.constexpr, S_GN: tl.constexpr,
):  # fmt: skip
    CDT = tl.float32 if UPCAST else Q.dtype.element_ty  # tile dtype of the dot operands
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HG
    h = tl.load(HEADS + pid_bh % HG)
    nb = _cdiv_k(_cdiv_k(n, d), BLOCK_N)
    r = pid // nb
    u0 = (pid % nb) * BLOCK_N
    m_r = (n - r + d - 1) // d
    bh = (b * H + h).to(tl.int64)
    Qb = Q + bh * n * HEAD_DIM
    DOb = DO + bh * n * HEAD_DIM
    LSEb = LSE + bh * n
    DELTAb = DELTA + bh * n

    offs_b = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    u = u0 + offs_b  # (BLOCK_N,) key class index
    col_ok = u < m_r
    kpos = r + d * u  # (BLOCK_N,)
    kv_off = kpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_N, BLOCK_D)
    kv_ok = col_ok[:, None] & e_ok[None, :]
    k = tl.load(K + bh * n * HEAD_DIM + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + bh * n * HEAD_DIM + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_N, BLOCK_D)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)

    w_span = hi - lo
    k1, k2, kn = _window_stages(w_span, BLOCK_N, BLOCK_M)
    dk, dv = _bwd_kv_blocks(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, ROW_GLOBAL, r, d, u0, m_r, hi, w_span, scale_log2,
        0, S_K1 if STATIC_LOOPS else k1, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dk, dv = _bwd_kv_blocks(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, ROW_GLOBAL, r, d, u0, m_r, hi, w_span, scale_log2,
        S_K1 if STATIC_LOOPS else k1, S_K2 if STATIC_LOOPS else k2, False,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dk, dv = _bwd_kv_blocks(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, ROW_GLOBAL, r, d, u0, m_r, hi, w_span, scale_log2,
        S_K2 if STATIC_LOOPS else k2, S_KN if STATIC_LOOPS else kn, True,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip

    # every global row reaches every key (j <= g when causal)
    offs_g = tl.arange(0, BLOCK_G)
    for gb in range(S_GN if STATIC_LOOPS else _cdiv_k(G, BLOCK_G)):
        gi = gb * BLOCK_G + offs_g
        g_ok = gi < G
        gpos = tl.load(GLOB + gi, mask=g_ok, other=0)  # (BLOCK_G,) global row positions
        io_off = gpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_G, BLOCK_D)
        io_ok = g_ok[:, None] & e_ok[None, :]
        q = tl.load(Qb + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
        do = tl.load(DOb + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
        lse = tl.load(LSEb + gpos, mask=g_ok, other=0.0)  # (BLOCK_G,)
        delta = tl.load(DELTAb + gpos, mask=g_ok, other=0.0)  # (BLOCK_G,)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # (BLOCK_N, BLOCK_G)
        ok = g_ok[None, :] & ((kpos[:, None] <= gpos[None, :]) | (causal == 0))
        p_t = tl.where(ok, tl.math.exp2(s_t - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_G)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_G)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)

    dk = dk * scale
    tl.store(DK + bh * n * HEAD_DIM + kv_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + bh * n * HEAD_DIM + kv_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


# Global keys, the part the window kernel cannot see: non-global queries i that reach
# global key g outside their window (g <= i when causal). Read-add-write into dK, dV
# (fp32 buffers), one program per block of global keys, so no two programs touch a row.
#   dV_g += sum_i P_ig dO_i,  dK_g += scale * sum_i dS_ig q_i.
# grid: (ceil(G / BLOCK_G), B * H); per-head dilation from DIL.
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_kv_global_keys_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, ROW_GLOBAL, GLOB, DIL,
    scale, scale_log2, n, H, lo, hi, G, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC_LOOPS: tl.constexpr, S_QN: tl.constexpr,
):  # fmt: skip
    CDT = tl.float32 if UPCAST else Q.dtype.element_ty  # tile dtype of the dot operands
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    d = tl.load(DIL + tl.program_id(1) % H)
    # this head's offsets, clipped to its longest class (as the host does per group)
    reach = _cdiv_k(n, d) - 1
    lo = tl.maximum(lo, -reach)
    hi = tl.minimum(hi, reach)
    Qb = Q + bh * n * HEAD_DIM
    DOb = DO + bh * n * HEAD_DIM
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    offs_a = tl.arange(0, BLOCK_M)
    gi = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gi < G
    gpos = tl.load(GLOB + gi, mask=g_ok, other=0)  # (BLOCK_G,) key positions
    kv_off = gpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_G, BLOCK_D)
    kv_ok = g_ok[:, None] & e_ok[None, :]
    k = tl.load(K + bh * n * HEAD_DIM + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
    v = tl.load(V + bh * n * HEAD_DIM + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
    dk = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    # causal: queries before the block's first key never see it
    first = tl.where(causal != 0, tl.reduce(tl.where(g_ok, gpos, n), 0, _MIN_COMBINE) // BLOCK_M, 0)
    for ib in range(0 if STATIC_LOOPS else first, S_QN if STATIC_LOOPS else _cdiv_k(n, BLOCK_M)):
        i = ib * BLOCK_M + offs_a  # (BLOCK_M,) query positions
        i_ok = i < n
        is_g = tl.load(ROW_GLOBAL + i, mask=i_ok, other=1)
        row_ok = i_ok & (is_g == 0)
        io_off = i[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_M, BLOCK_D)
        io_ok = i_ok[:, None] & e_ok[None, :]
        q = tl.load(Qb + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_M, BLOCK_D)
        do = tl.load(DOb + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + bh * n + i, mask=i_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(DELTA + bh * n + i, mask=i_ok, other=0.0)  # (BLOCK_M,)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # (BLOCK_G, BLOCK_M)
        diff = gpos[:, None] - i[None, :]  # (BLOCK_G, BLOCK_M)
        in_win = ((diff % d) == 0) & (diff >= lo * d) & (diff <= hi * d)  # counted by the window kernel
        ok = g_ok[:, None] & row_ok[None, :] & ~in_win & ((diff <= 0) | (causal == 0))
        p_t = tl.where(ok, tl.math.exp2(s_t - lse[None, :]), 0.0)  # (BLOCK_G, BLOCK_M)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (BLOCK_G, BLOCK_D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (BLOCK_G, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)  # (BLOCK_G, BLOCK_D)
    out_off = bh * n * HEAD_DIM + kv_off
    dk = dk * scale + tl.load(DK + out_off, mask=kv_ok, other=0.0)
    dv = dv + tl.load(DV + out_off, mask=kv_ok, other=0.0)
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_q_window_blocks(
    dq, q, do, lse, delta, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2, kb_start, kb_end,
    BAND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # Same key blocks as _fwd_window_blocks; dQ_i += sum_j dS_ij k_j (scale applied later).
    offs_a = tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    for kb in range(kb_start, kb_end):
        u = t0 + lo + kb * BLOCK_N + offs_b  # (BLOCK_N,)
        col_ok = (u >= 0) & (u < m_r)
        kv_off = (r + d * u)[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_N, BLOCK_D)
        kv_ok = col_ok[:, None] & e_ok[None, :]
        k = tl.load(Kb + kv_off, mask=kv_ok, other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        v = tl.load(Vb + kv_off, mask=kv_ok, other=0.0).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_M, BLOCK_N)
        if BAND:
            rel = kb * BLOCK_N + offs_b[None, :] - offs_a[:, None]
            ok = col_ok[None, :] & (rel >= 0) & (rel <= w_span)
        else:
            ok = col_ok[None, :]
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)
    return dq


# dQ of the non-global rows of one dilation group: the window and the global keys outside
# it, exactly the keys of the forward.  dQ_i = scale * sum_j dS_ij k_j.
# grid: as _fwd_window_kernel.
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_q_window_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, HEADS, GLOB,
    scale, scale_log2, n, H, HG, d, lo, hi, G, causal, n_tune,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC_LOOPS: tl.constexpr,
    S_K1: tl.constexpr, S_K2: tl.constexpr, S_KN: tl.constexpr, S_GN: tl.constexpr,
):  # fmt: skip
    CDT = tl.float32 if UPCAST else Q.dtype.element_ty  # tile dtype of the dot operands
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HG
    h = tl.load(HEADS + pid_bh % HG)
    nb = _cdiv_k(_cdiv_k(n, d), BLOCK_M)
    r = pid // nb
    t0 = (pid % nb) * BLOCK_M
    m_r = (n - r + d - 1) // d
    bh = (b * H + h).to(tl.int64)
    Kb = K + bh * n * HEAD_DIM
    Vb = V + bh * n * HEAD_DIM

    offs_a = tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    t = t0 + offs_a
    row_ok = t < m_r
    pos = r + d * t  # (BLOCK_M,)
    io_off = pos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_M, BLOCK_D)
    io_ok = row_ok[:, None] & e_ok[None, :]
    q = tl.load(Q + bh * n * HEAD_DIM + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + bh * n * HEAD_DIM + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh * n + pos, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * n + pos, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    w_span = hi - lo
    k1, k2, kn = _window_stages(w_span, BLOCK_M, BLOCK_N)
    dq = _bwd_q_window_blocks(
        dq, q, do, lse, delta, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2,
        0, S_K1 if STATIC_LOOPS else k1, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dq = _bwd_q_window_blocks(
        dq, q, do, lse, delta, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2,
        S_K1 if STATIC_LOOPS else k1, S_K2 if STATIC_LOOPS else k2, False,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip
    dq = _bwd_q_window_blocks(
        dq, q, do, lse, delta, Kb, Vb, r, d, t0, m_r, lo, w_span, scale_log2,
        S_K2 if STATIC_LOOPS else k2, S_KN if STATIC_LOOPS else kn, True,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC,
    )  # fmt: skip

    offs_g = tl.arange(0, BLOCK_G)
    for gb in range(S_GN if STATIC_LOOPS else _cdiv_k(G, BLOCK_G)):
        gi = gb * BLOCK_G + offs_g
        g_ok = gi < G
        gpos = tl.load(GLOB + gi, mask=g_ok, other=0)  # (BLOCK_G,)
        kv_off = gpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_G, BLOCK_D)
        kv_ok = g_ok[:, None] & e_ok[None, :]
        k = tl.load(Kb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
        v = tl.load(Vb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_M, BLOCK_G)
        diff = gpos[None, :] - pos[:, None]  # (BLOCK_M, BLOCK_G)
        in_win = ((diff % d) == 0) & (diff >= lo * d) & (diff <= hi * d)  # counted in the window loop
        ok = g_ok[None, :] & ~in_win & ((diff <= 0) | (causal == 0))
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_G)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_G)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_D)

    # global rows: overwritten by _bwd_q_global_rows_kernel, launched after this one
    dq = dq * scale
    tl.store(DQ + bh * n * HEAD_DIM + io_off, dq.to(DQ.dtype.element_ty), mask=io_ok)


# dQ of the global rows: every key (j <= g when causal).  grid: (ceil(G / BLOCK_G), B * H).
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_q_global_rows_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, GLOB, scale, scale_log2, n, G, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, STATIC_LOOPS: tl.constexpr, S_KN: tl.constexpr,
):  # fmt: skip
    CDT = tl.float32 if UPCAST else Q.dtype.element_ty  # tile dtype of the dot operands
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Kb = K + bh * n * HEAD_DIM
    Vb = V + bh * n * HEAD_DIM
    offs_e = tl.arange(0, BLOCK_D)
    e_ok = offs_e < HEAD_DIM
    offs_b = tl.arange(0, BLOCK_N)
    gi = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gi < G
    gpos = tl.load(GLOB + gi, mask=g_ok, other=0)  # (BLOCK_G,)
    io_off = gpos[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_G, BLOCK_D)
    io_ok = g_ok[:, None] & e_ok[None, :]
    q = tl.load(Q + bh * n * HEAD_DIM + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
    do = tl.load(DO + bh * n * HEAD_DIM + io_off, mask=io_ok, other=0.0).to(CDT)  # (BLOCK_G, BLOCK_D)
    lse = tl.load(LSE + bh * n + gpos, mask=g_ok, other=0.0)  # (BLOCK_G,)
    delta = tl.load(DELTA + bh * n + gpos, mask=g_ok, other=0.0)  # (BLOCK_G,)
    dq = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    key_end = tl.where(causal != 0, tl.reduce(tl.where(g_ok, gpos, 0), 0, _MAX_COMBINE) + 1, n)
    for kb in range(S_KN if STATIC_LOOPS else _cdiv_k(key_end, BLOCK_N)):
        j = kb * BLOCK_N + offs_b  # (BLOCK_N,)
        j_ok = j < n
        kv_off = j[:, None] * HEAD_DIM + offs_e[None, :]  # (BLOCK_N, BLOCK_D)
        kv_ok = j_ok[:, None] & e_ok[None, :]
        k = tl.load(Kb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_N, BLOCK_D)
        v = tl.load(Vb + kv_off, mask=kv_ok, other=0.0).to(CDT)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (BLOCK_G, BLOCK_N)
        ok = j_ok[None, :] & ((j[None, :] <= gpos[:, None]) | (causal == 0))
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # (BLOCK_G, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (BLOCK_G, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)  # (BLOCK_G, BLOCK_D)
    dq = dq * scale
    tl.store(DQ + bh * n * HEAD_DIM + io_off, dq.to(DQ.dtype.element_ty), mask=io_ok)


# ---------------------------------------------------------------------------- launch
def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) the CUDA autotuner tries. BLOCK_M: query
#: rows per block, BLOCK_N: key rows per block, in every kernel.
FWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3)]
BWD_KV_CONFIGS = [(32, 64, 4, 3), (64, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 2)]
BWD_Q_CONFIGS = [(64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)]
# (for 16-bit inputs every head_dim up to 128 has configs that ptxas compiles for sm90
# without spilling registers, see cuobjdump -res-usage; fp32 inputs, three TF32 products
# per dot, spill at every size)

#: block sizes, warps and stages of the latest forward and backward, for last_config()
LAST_CONFIG: dict = {}


#: shared memory one program may use on sm90 (H100, H200): 227 KiB
SMEM_LIMIT = 227 * 1024

#: per window kernel: which of BLOCK_M / BLOCK_N is the block a program owns (the
#: other is the block its loop streams), and how many tiles of the owned rows stay
#: resident (q in the forward; q and dO in dQ; k and v in dK/dV)
_KINDS = {"fwd": ("BLOCK_M", 1), "q": ("BLOCK_M", 2), "kv": ("BLOCK_N", 2)}


def smem_bytes(kind: str, bm: int, bn: int, stages: int, bd: int, esize: int, bg: int = 16) -> int:
    """Estimated shared memory (bytes) of a window kernel ("fwd", "q" or "kv") with
    blocks (bm, bn), ``stages`` pipeline stages, padded head dim ``bd``, ``esize``-byte
    inputs and global block ``bg``:

        (resident * own + 2 * stages * walk) * bd * esize + 8 * stages * walk + 1 KiB

    own: rows of the block a program owns; walk: rows of the blocks its loops stream,
    the window's (the other of bm, bn) or the global loop's (bg), whichever is larger:
    each streamed block's two tiles (k, v or q, dO) get one buffer per stage, plus its
    fp32 row vectors (lse, delta); fp32 inputs hold the resident tiles twice (tf32x3
    splits them into a high and a low part). Fitted to what Triton's sm90 compiler
    allocates (for each config: scripts/triton_resources.py); tests/test_triton.py
    compiles configs on both sides of the limit, with global blocks of 16 and 64, and
    checks the estimate is not below the compiler's figure. It can be below it for
    small single-stage configs (layout conversions), far from the limit."""
    owner, resident = _KINDS[kind]
    own, walk = (bm, bn) if owner == "BLOCK_M" else (bn, bm)
    walk = max(walk, bg)
    if esize == 4:
        resident *= 2
    return (resident * own + 2 * stages * walk) * bd * esize + 8 * stages * walk + 1024


def _fits(kind: str, bm: int, bn: int, stages: int, bd: int, esize: int, bg: int = 16) -> bool:
    # shared memory, and a register budget: a tile of 32 KiB is already 64 registers
    # per thread at 4 warps, and a program holds several
    return smem_bytes(kind, bm, bn, stages, bd, esize, bg) <= SMEM_LIMIT and max(bm, bn) * bd * esize <= 32 * 1024


def _prune(configs: list, named_args: dict, *, kind: str, **kwargs) -> list:
    """The configs that fit; if none does (large head dims in fp32), the untuned
    config of :func:`_fixed`, which the tests compile for sm90 at every head dim."""
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    bg = kwargs.get("BLOCK_G", named_args.get("BLOCK_G", 16))
    esize = named_args["Q"].element_size()
    keep = [
        c for c in configs if _fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages or 1, bd, esize, bg)
    ]
    if keep:
        return keep
    bm, bn, w, s = _fixed(bd, esize, kind)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)]


def _tuner(kernel, rows: list[tuple[int, int, int, int]], kind: str):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": b}, num_warps=w, num_stages=s) for m, b, w, s in rows]
    # keyed on head_dim (BLOCK_D), window (lo, hi), dilation (d) and the size bucket
    # (n_tune): the best blocks at n = 4096 are not those at 32768; the autotuner adds
    # the dtypes. None of these is specialised, so a new key retunes without recompiling.
    prune = functools.partial(_prune, kind=kind)
    key = ["BLOCK_D", "lo", "hi", "d", "n_tune"]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


if INTERPRETED:
    _fwd_window_tuned = _bwd_kv_window_tuned = _bwd_q_window_tuned = None
else:
    _fwd_window_tuned = _tuner(_fwd_window_kernel, FWD_CONFIGS, "fwd")
    _bwd_kv_window_tuned = _tuner(_bwd_kv_window_kernel, BWD_KV_CONFIGS, "kv")
    _bwd_q_window_tuned = _tuner(_bwd_q_window_kernel, BWD_Q_CONFIGS, "q")


def _fixed(bd: int, esize: int, kind: str) -> tuple[int, int, int, int]:
    """The untuned config (BLOCK_M, BLOCK_N, num_warps, num_stages) on CUDA, by the bytes
    of one head_dim row: smaller tiles as rows grow, so that the resident tiles (q and
    the accumulator; k, v, dK, dV in the dK/dV kernel) fit in registers."""
    row = bd * esize  # bf16: 128 bytes at head_dim 64, 256 at 128
    if kind == "kv":
        return (32, 64, 4, 2) if row <= 128 else (32, 32, 4, 2) if row <= 256 else (16, 32, 4, 1)
    if kind == "q":
        return (64, 64, 4, 2) if row <= 128 else (32, 32, 4, 2) if row <= 256 else (32, 32, 4, 1)
    return (64, 64, 4, 2) if row <= 128 else (32, 64, 4, 2) if row <= 256 else (32, 32, 4, 1)


def _offsets(window: int, causal: bool, n: int) -> tuple[int, int]:
    """Window offsets (lo, hi), clipped to [-n, n] (farther never meets a key; keeps
    them, and lo * d in the kernels, inside int32)."""
    lo, hi = (-window, 0) if causal else (-(window // 2), window // 2)
    return max(lo, -n), min(hi, n)


def _groups(dilations: tuple[int, ...], n: int, lo: int, hi: int) -> list[tuple[int, int, int, list[int]]]:
    """Heads grouped by (dilation, lo, hi) after normalisation: offsets beyond the
    longest class (ceil(n/d) - 1) never meet a key, so they are clipped, and d >= n
    is the window {self} (d = 1, lo = hi = 0); same result, fewer empty blocks."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for h, d in enumerate(dilations):
        if d >= n:
            key = (1, 0, 0)
        else:
            reach = _cdiv(n, d) - 1
            key = (d, max(lo, -reach), min(hi, reach))
        groups.setdefault(key, []).append(h)
    return [(d, lo_, hi_, heads) for (d, lo_, hi_), heads in groups.items()]


@functools.lru_cache(maxsize=64)
def _meta(device: torch.device, n: int, dilations: tuple[int, ...], glob: tuple[int, ...]):
    """Index tensors of a pattern on the device, cached: a host-to-device copy per call
    would stall the stream between launches. Returns (row_global (n,) int8 flags,
    glob (max(G, 1),) int32 positions, dilations (H,) int32)."""
    row_global = torch.zeros(n, dtype=torch.int8, device=device)
    if glob:
        row_global[list(glob)] = 1
    g = torch.tensor(glob or (0,), dtype=torch.int32, device=device)
    dil = torch.tensor(dilations, dtype=torch.int32, device=device)
    return row_global, g, dil


@functools.lru_cache(maxsize=64)
def _heads(device: torch.device, heads: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(heads, dtype=torch.int32, device=device)


def _window_launch(kernel, tuner, args: tuple, *, programs_over: str, n: int, d: int, B: int, HG: int,
                   w_span: int, G: int, bg: int, fixed: tuple, tune: bool, **const) -> dict:  # fmt: skip
    """Launch a window kernel (forward, dK/dV or dQ) over one dilation group.

    ``programs_over`` is "BLOCK_M" when a program owns a block of query rows (its
    loop walks key blocks) and "BLOCK_N" when it owns a block of keys."""
    n_cls = _cdiv(n, d)
    if INTERPRETED:
        bm = bn = INTERPRETER_BLOCK
        own, walk = (bm, bn) if programs_over == "BLOCK_M" else (bn, bm)
        k1, k2, kn = static_stages(w_span, own, walk)
        grid = (d * _cdiv(n_cls, own), B * HG)
        kernel[grid](
            *args, **const, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg,
            STATIC_LOOPS=True, S_K1=k1, S_K2=k2, S_KN=kn, S_GN=_cdiv(G, bg),
        )  # fmt: skip
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": None, "num_stages": None, "autotuned": False}

    def grid(meta):
        return (d * _cdiv(n_cls, meta[programs_over]), B * HG)

    statics = {"STATIC_LOOPS": False, "S_K1": 0, "S_K2": 0, "S_KN": 0, "S_GN": 0}
    if tune:
        tuner[grid](*args, **const, BLOCK_G=bg, **statics)
        c = tuner.best_config
        return {
            "BLOCK_M": c.kwargs["BLOCK_M"],
            "BLOCK_N": c.kwargs["BLOCK_N"],
            "num_warps": c.num_warps,
            "num_stages": c.num_stages,
            "autotuned": True,
        }
    bm, bn, w, s = fixed
    kernel[grid](*args, **const, BLOCK_M=bm, BLOCK_N=bn, BLOCK_G=bg, num_warps=w, num_stages=s, **statics)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "autotuned": False}


def _rows_launch(kernel, args: tuple, *, n: int, G: int, BH: int, bg: int, bd: int, esize: int, **const) -> None:
    """Launch a global-rows kernel: one program per block of global rows, all keys."""
    grid = (_cdiv(G, bg), BH)
    if INTERPRETED:
        kernel[grid](
            *args, **const, BLOCK_G=bg, BLOCK_N=INTERPRETER_BLOCK, STATIC_LOOPS=True, S_KN=_cdiv(n, INTERPRETER_BLOCK)
        )
    else:
        bn = 32 if bd * esize > 256 else 64
        kernel[grid](*args, **const, BLOCK_G=bg, BLOCK_N=bn, STATIC_LOOPS=False, S_KN=0, num_warps=4, num_stages=2)


def _dot_args(dtype: torch.dtype) -> dict:
    """DOT_PREC for fp32 inputs: plain TF32 would miss the fp32 tolerance, so the
    compiled kernels use "tf32x3" (three TF32 products: about fp32 accuracy on tensor
    cores, and it compiles several times faster than "ieee"); the interpreter computes
    in numpy ("ieee"). For 16-bit inputs it is ignored. UPCAST: the interpreter cannot
    multiply bf16 (numpy holds it as uint16), so there bf16 tiles go to fp32 before
    each dot; a bf16 x bf16 product is exact in fp32, so this matches the compiled
    kernel up to the rounding of P and dS to bf16 and the summation order."""
    if dtype == torch.float32:
        prec = "ieee" if INTERPRETED else "tf32x3"
    else:
        prec = "tf32"
    return {"DOT_PREC": prec, "UPCAST": INTERPRETED and dtype == torch.bfloat16}


def _block_g(G: int) -> int:
    return INTERPRETER_BLOCK if INTERPRETED else min(64, max(16, _next_pow2(G)))


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilations: tuple[int, ...],
    window: int,
    causal: bool,
    glob: tuple[int, ...],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward. q, k, v contiguous ``(B, H, n, D)``; ``dilations`` one per
    head; ``glob`` sorted unique positions. Returns ``out`` (input dtype) and the
    base-2 log-sum-exp ``(B, H, n)`` fp32 that :func:`backward` needs."""
    B, H, n, D = q.shape
    bd, esize, G = block_d(D), q.element_size(), len(glob)
    lo, hi = _offsets(window, causal, n)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, n), dtype=torch.float32, device=q.device)
    _, g_t, _ = _meta(q.device, n, tuple(dilations), tuple(glob))
    dot = _dot_args(q.dtype)
    scale_log2 = float(scale) * LOG2E
    bg = _block_g(G)
    tune = not INTERPRETED and n >= AUTOTUNE_MIN_SEQ
    cfg: dict = {}
    for d, lo_g, hi_g, heads in _groups(tuple(dilations), n, lo, hi):
        heads_t = _heads(q.device, tuple(heads))
        args = (
            q,
            k,
            v,
            out,
            lse,
            heads_t,
            g_t,
            scale_log2,
            n,
            H,
            len(heads),
            d,
            lo_g,
            hi_g,
            G,
            int(causal),
            _next_pow2(n),
        )
        cfg = _window_launch(
            _fwd_window_kernel, _fwd_window_tuned, args, programs_over="BLOCK_M", n=n, d=d, B=B, HG=len(heads),
            w_span=hi_g - lo_g, G=G, bg=bg, fixed=_fixed(bd, esize, "fwd"), tune=tune,
            HEAD_DIM=D, BLOCK_D=bd, **dot,
        )  # fmt: skip
    if G:
        _rows_launch(
            _fwd_global_rows_kernel, (q, k, v, out, lse, g_t, scale_log2, n, G, int(causal)),
            n=n, G=G, BH=B * H, bg=bg, bd=bd, esize=esize, HEAD_DIM=D, BLOCK_D=bd, **dot,
        )  # fmt: skip
    LAST_CONFIG.clear()
    LAST_CONFIG.update(cfg, BLOCK_D=bd, BLOCK_G=bg, interpreted=INTERPRETED)
    return out, lse


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dilations: tuple[int, ...],
    window: int,
    causal: bool,
    glob: tuple[int, ...],
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v from dO, recomputing P from the saved LSE. Every tensor
    contiguous, as :func:`forward` got and returned them."""
    B, H, n, D = q.shape
    bd, esize, G = block_d(D), q.element_size(), len(glob)
    lo, hi = _offsets(window, causal, n)
    row_global, g_t, dil_t = _meta(q.device, n, tuple(dilations), tuple(glob))
    dot = _dot_args(q.dtype)
    scale_log2 = float(scale) * LOG2E
    bg = _block_g(G)
    tune = not INTERPRETED and n >= AUTOTUNE_MIN_SEQ

    delta = torch.empty_like(lse)  # (B, H, n) fp32
    bmd = INTERPRETER_BLOCK if INTERPRETED else 64
    _bwd_delta_kernel[(_cdiv(n, bmd), B * H)](out, do, delta, n, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bmd)

    dq = torch.empty_like(q)
    # with global keys dK, dV get a second, read-add-write pass: keep them fp32 until then
    acc_dtype = torch.float32 if G else q.dtype
    dk = torch.empty(q.shape, dtype=acc_dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=acc_dtype, device=q.device)
    cfg_kv: dict = {}
    cfg_q: dict = {}
    for d, lo_g, hi_g, heads in _groups(tuple(dilations), n, lo, hi):
        HG = len(heads)
        heads_t = _heads(q.device, tuple(heads))
        common = dict(n=n, d=d, B=B, HG=HG, w_span=hi_g - lo_g, G=G, bg=bg, tune=tune, HEAD_DIM=D, BLOCK_D=bd)
        tail = (scale, scale_log2, n, H, HG, d, lo_g, hi_g, G, int(causal), _next_pow2(n))
        cfg_kv = _window_launch(
            _bwd_kv_window_kernel, _bwd_kv_window_tuned,
            (q, k, v, do, lse, delta, dk, dv, heads_t, row_global, g_t) + tail,
            programs_over="BLOCK_N", fixed=_fixed(bd, esize, "kv"), **dot, **common,
        )  # fmt: skip
        cfg_q = _window_launch(
            _bwd_q_window_kernel, _bwd_q_window_tuned,
            (q, k, v, do, lse, delta, dq, heads_t, g_t) + tail,
            programs_over="BLOCK_M", fixed=_fixed(bd, esize, "q"), **dot, **common,
        )  # fmt: skip
    if G:
        # after every group's dK/dV window kernel: it adds to what they stored
        grid = (_cdiv(G, bg), B * H)
        args = (
            q,
            k,
            v,
            do,
            lse,
            delta,
            dk,
            dv,
            row_global,
            g_t,
            dil_t,
            scale,
            scale_log2,
            n,
            H,
            lo,
            hi,
            G,
            int(causal),
        )
        if INTERPRETED:
            _bwd_kv_global_keys_kernel[grid](
                *args, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=INTERPRETER_BLOCK, BLOCK_G=bg, **dot,
                STATIC_LOOPS=True, S_QN=_cdiv(n, INTERPRETER_BLOCK),
            )  # fmt: skip
        else:
            _bwd_kv_global_keys_kernel[grid](
                *args, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=32 if bd * esize > 256 else 64, BLOCK_G=bg, **dot,
                STATIC_LOOPS=False, S_QN=0, num_warps=4, num_stages=2,
            )  # fmt: skip
        _rows_launch(
            _bwd_q_global_rows_kernel, (q, k, v, do, lse, delta, dq, g_t, scale, scale_log2, n, G, int(causal)),
            n=n, G=G, BH=B * H, bg=bg, bd=bd, esize=esize, HEAD_DIM=D, BLOCK_D=bd, **dot,
        )  # fmt: skip
        dk, dv = dk.to(q.dtype), dv.to(q.dtype)
    LAST_CONFIG["backward"] = {"kv": cfg_kv, "q": cfg_q, "BLOCK_G": bg, "interpreted": INTERPRETED}
    return dq, dk, dv
