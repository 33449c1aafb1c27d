"""Fused Triton kernels for Longformer attention (window, dilation, global tokens, causal).

Helper module of ``impls/triton_fused.py``; the registry does not import it (leading
underscore). It is loaded twice when needed, as two module objects: once with
``TRITON_INTERPRET=1`` set (``@triton.jit`` then builds interpreted functions, used
for CPU tensors) and once without (compiled kernels, used for CUDA tensors).

The algorithm is FlashAttention-2 with the pattern folded into the loops, laid out as
Triton's fused-attention tutorial: kernels (prologue, inner loops, epilogue), the
inner loops' block bodies (``_fwd_body``, ``_dq_body``, ``_dkdv_body``), and the
walks that feed them (``_walk_band``, ``_walk_list``, strung together by
``_walk_pattern``), each written once.

Notation. q, k, v, o are ``(B, H, n, D)``, made contiguous by the caller. The scale
is applied in base 2: ``s = q.k * scale * log2(e)``. What the forward saves of each
row is its statistics ``(m, 1/l)``: the row's largest score and the inverse of
``l = sum_j exp2(s_j - m)``, so that the backward's probability is
``P_j = exp2(s_j - m) * (1/l)``. Not ``exp2(s_j - lse2)`` with ``lse2 = m + log2(l)``:
rounded to fp32, lse2 carries an absolute error of half an ulp of its magnitude, which
becomes the same relative error in every P of the row; summed over a row's keys (dK,
dV) it gave gradients 1.3x the dense computation's error in fp32, against 1.0x with m
and 1/l kept apart (each P then has the rounding of 1/l, 6e-8).

Dilation without visiting skipped keys. With dilation d, token ``p = r + d*t`` is
row ``t`` of residue class ``r = p mod d``; a dilated window over the tokens is the
plain window over each class (offsets ``c`` in ``[lo, hi]``). The kernels address
class ``r`` with the token stride times d, so nothing is permuted in memory. A
program owns one block of rows of one class; the class holds
``m_r = ceil((n - r) / d)`` tokens. Heads with different dilations are launched
separately (one launch per dilation group, the group's head indices in ``heads``).

Work is O(n * (w + G)): a query block of BLOCK_M rows meets keys
``[t0 + lo, t0 + BLOCK_M - 1 + hi]`` of its class, ``ceil((BLOCK_M + w) / BLOCK_N)``
key blocks (a key block of dK/dV meets as many query blocks). That walk runs in three
stages (as the fused-attention tutorial splits causal blocks into on- and off-band):
blocks that straddle the band's edges get the band mask; the blocks in between lie
wholly inside the band and need only the sequence-end mask.

Global tokens, without making the kernel dense:
* non-global rows: after the window, one more walk over the G global keys (gathered
  by index); a global key that is already in the row's window is masked there, so
  nothing is counted twice; causal masks ``g > p``.
* global rows attend to every key: a separate kernel with one program per block of
  global rows walks all key blocks (O(G * n)). The window kernel computes and
  stores those rows too (they share blocks with ordinary rows); the global-rows
  kernel, launched after it on the same stream, overwrites them. Same for dQ.
* backward: the dK/dV window kernel counts the non-global queries in a key's window,
  then walks the global rows (every key gets their contribution); a separate kernel
  adds, to each global key, the contribution of the non-global rows that reach it
  outside their window.

Key masks (per sample, holes anywhere): KEY_OK, ``(B, n)`` int8 flags, 1 where key j
of batch b is present, or None without a mask (a None argument is a constexpr: the
code without a mask is what it was). Kernels that own queries (forward, dQ) read the
flags of each partner key block and count only present keys, in the window and among
the global keys alike; a row left without any key stores O = 0 and statistics
(+inf, 0), so that the backward's P = 2^(s - m) / l is 0 for it whatever the mask. Kernels that own
keys (dK/dV) walk as without a mask and store 0 for their masked keys: P is 0 for
them in every row (a block of masked keys only walks nothing).

What the interpreter needs differently (loop bounds, reductions) is confined to the
"interpreter shim" section below.
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
_NO_SPEC = ["n", "H", "KVH", "HG", "d", "lo", "hi", "G", "causal", "GQ", "accumulate", "n_tune"]


# ---------------------------------------------------------------------------- interpreter shim
# The compiled and the interpreted copy of this module differ here and nowhere else;
# the kernels below are written once for both.
#
# Loop bounds: every loop runs over range(_trip(start), _trip(end)). The interpreter
# holds each runtime scalar as a 1-element numpy array, and range() over one calls
# int() on it, which numpy 2.4 refuses unless Triton squeezes it first (older releases
# do not: "only 0-dimensional arrays can be converted to Python scalars"). The
# interpreted _trip is plain Python (interpreted kernels call it like any function)
# and returns a Python int; the compiled one returns the runtime value, so that one
# binary serves every window, n and G.
if INTERPRETED:

    def _trip(x):
        return int(x.handle.data.reshape(-1)[0]) if isinstance(x, tl.tensor) else x

else:

    @triton.jit
    def _trip(x):
        return x


# Builtins only: tl.sum, tl.max, tl.cdiv, tl.zeros (tl.full serves) are themselves
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
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MAX_COMBINE)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _MIN_COMBINE)


@triton.jit
def _cdiv_k(a, b):
    return (a + b - 1) // b


def _kernel_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as the kernels read them (host side). The interpreter cannot
    multiply bf16 (numpy holds it as uint16), so there bf16 inputs are read as fp32:
    a bf16 x bf16 product is exact in fp32, so this matches the compiled kernel up to
    the rounding of P and dS to bf16 and the summation order. Outputs keep the
    caller's dtype."""
    if INTERPRETED and tensors[0].dtype == torch.bfloat16:
        return tuple(t.float() for t in tensors)
    return tensors


# ---------------------------------------------------------------------------- tiles
@triton.jit
def _load_rows(base, pos, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # rows pos (R,) of a (n, HEAD_DIM) matrix as an (R, BLOCK_D) tile; zeros where not
    # ok and in the columns that pad head_dim up to a power of two
    offs_e = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_e < HEAD_DIM)[None, :]  # (R, BLOCK_D)
    return tl.load(base + pos[:, None] * HEAD_DIM + offs_e[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, pos, ok, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # x (R, BLOCK_D) into rows pos (R,) of a (n, HEAD_DIM) matrix, in the matrix's dtype
    offs_e = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_e < HEAD_DIM)[None, :]  # (R, BLOCK_D)
    tl.store(base + pos[:, None] * HEAD_DIM + offs_e[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_ptrs(Q, DO, STATS, DELTA, row0, HEAD_DIM: tl.constexpr):
    # (Q, DO, STATS, DELTA) of the (batch, head) whose rows start at row0; STATS holds
    # two fp32 per row, (m, 1/l)
    return Q + row0 * HEAD_DIM, DO + row0 * HEAD_DIM, STATS + 2 * row0, DELTA + row0


@triton.jit
def _query_rows(ptrs, pos, ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # what the backward reads of query rows pos (R,): q, dO (R, BLOCK_D) and the row
    # statistics m, 1/l and delta (R,) fp32, from ptrs = (Q, DO, STATS, DELTA) of one
    # (batch, head)
    Q, DO, STATS, DELTA = ptrs
    q = _load_rows(Q, pos, ok, HEAD_DIM, BLOCK_D)  # (R, BLOCK_D)
    do = _load_rows(DO, pos, ok, HEAD_DIM, BLOCK_D)  # (R, BLOCK_D)
    m = tl.load(STATS + 2 * pos, mask=ok, other=0.0)  # (R,)
    inv_l = tl.load(STATS + 2 * pos + 1, mask=ok, other=0.0)  # (R,)
    return q, do, m, inv_l, tl.load(DELTA + pos, mask=ok, other=0.0)


@triton.jit
def _class_block(HEADS, n, HG, d, BLOCK: tl.constexpr):
    # Window kernels, grid (d * ceil(ceil(n/d) / BLOCK), B * HG). Program (pid, pid_bh)
    # owns class indices o0 .. o0 + BLOCK - 1 of residue class r (m_r tokens) of head
    # HEADS[pid_bh % HG] (a query head; a key/value head in dK/dV) of batch pid_bh // HG.
    # Returns (r, o0, m_r, batch, head).
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    nb = _cdiv_k(_cdiv_k(n, d), BLOCK)  # blocks per class (the longest class)
    r = pid // nb
    return r, (pid % nb) * BLOCK, (n - r + d - 1) // d, pid_bh // HG, tl.load(HEADS + pid_bh % HG)


@triton.jit
def _row0(b, h, heads, n):
    # first row (int64) of head h of batch b in a (B * heads * n)-row tensor
    return (b * heads + h).to(tl.int64) * n


@triton.jit
def _kv_row0(b, h, H, KVH, n):
    # first row (int64) of the key/value head that query head h reads (grouped-query
    # attention: query head h reads key/value head h // (H / KVH))
    return _row0(b, h // (H // KVH), KVH, n)


@triton.jit
def _class_rows(r, d, o0, m_r, BLOCK: tl.constexpr):
    # positions (BLOCK,) of class indices o0 .. o0 + BLOCK - 1 of class r, and which exist.
    # Called again after each walk rather than held through it: live across the loops,
    # row quantities cost registers the tiles need (ptxas spills otherwise).
    t = o0 + tl.arange(0, BLOCK)
    return r + d * t, t < m_r


@triton.jit
def _global_block(GLOB, G, heads, BLOCK_G: tl.constexpr):
    # Global-token kernels, grid (ceil(G / BLOCK_G), B * heads): the positions (BLOCK_G,)
    # of the program's block of global tokens, which exist, and its batch and head
    gi = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = gi < G
    pid_bh = tl.program_id(1)
    return tl.load(GLOB + gi, mask=g_ok, other=0), g_ok, pid_bh // heads, pid_bh % heads


@triton.jit
def _key_flags(KEY_OK, pos, ok):
    # (R,) which keys pos (R,) are present (KEY_OK: the flags of one batch; None: all);
    # False where not ok
    if KEY_OK is not None:
        ok = ok & (tl.load(KEY_OK + pos, mask=ok, other=0) != 0)
    return ok


# ---------------------------------------------------------------------------- block bodies
# One step of an inner loop: the program's resident tiles `res` (of the rows it owns)
# meet one block of partners (keys for the forward and dQ, queries for dK/dV) read
# through `ptrs`, and update the accumulators `accs`. All three share one signature,
# so that a walk takes any of them:
#   spos (S,) the partners' positions, s_ok (S,) which exist (the loads' mask),
#   ok (OWN, S) or (1, S) which (owned, partner) pairs count.
# Tiles are (owned, partner): key-major in dK/dV, as in the tutorial, so that the
# dK, dV rows stay put.
@triton.jit
def _fwd_body(accs, res, ptrs, spos, s_ok, ok, scale_log2,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # Online softmax (FlashAttention-2), one key block:
    #   s = q k^T * scale * log2(e);  m' = max(m, rowmax(s));  alpha = 2^(m - m')
    #   P = 2^(s - m');  l' = alpha * l + rowsum(P);  acc' = alpha * acc + P v
    # m starts finite (-1e30), so a fully masked block gives alpha = 1, P = 0 (no NaN).
    acc, l_i, m_i = accs  # (M, BLOCK_D) fp32, (M,), (M,)
    (q,) = res  # (M, BLOCK_D)
    K, V = ptrs
    k = _load_rows(K, spos, s_ok, HEAD_DIM, BLOCK_D)  # (S, BLOCK_D)
    v = _load_rows(V, spos, s_ok, HEAD_DIM, BLOCK_D)  # (S, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (M, S)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, _max(s, 1))  # (M,)
    alpha = tl.math.exp2(m_i - m_new)  # (M,)
    p = tl.math.exp2(s - m_new[:, None])  # (M, S)
    l_i = l_i * alpha + _sum(p, 1)  # (M,)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)  # (M, BLOCK_D)
    return acc, l_i, m_new


@triton.jit
def _dq_body(accs, res, ptrs, spos, s_ok, ok, scale_log2,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # One key block of dQ (scale applied at the store), P recomputed from the saved row
    # statistics:  P = 2^(s - m) / l;  dP = dO v^T;  dS = P * (dP - delta);  dQ += dS k
    (dq,) = accs  # (M, BLOCK_D) fp32
    q, do, m, inv_l, delta = res  # (M, BLOCK_D), (M, BLOCK_D), (M,), (M,), (M,)
    K, V = ptrs
    k = _load_rows(K, spos, s_ok, HEAD_DIM, BLOCK_D)  # (S, BLOCK_D)
    v = _load_rows(V, spos, s_ok, HEAD_DIM, BLOCK_D)  # (S, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # (M, S)
    p = tl.where(ok, tl.math.exp2(s - m[:, None]) * inv_l[:, None], 0.0)  # (M, S)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # (M, S)
    ds = p * (dp - delta[:, None])  # (M, S)
    return (tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC),)  # (M, BLOCK_D)


@triton.jit
def _dkdv_body(accs, res, ptrs, spos, s_ok, ok, scale_log2,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # One query block of dK, dV (scale applied at the store), transposed:
    #   P^T = 2^(k q^T - m) / l;  dV += P^T dO;  dP^T = v dO^T;  dS^T = P^T * (dP^T - delta)
    #   dK += dS^T q
    dk, dv = accs  # (N, BLOCK_D) fp32 each
    k, v = res  # (N, BLOCK_D)
    q, do, m, inv_l, delta = _query_rows(ptrs, spos, s_ok, HEAD_DIM, BLOCK_D)  # (S, BLOCK_D) x2, (S,) x3
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # (N, S)
    p_t = tl.where(ok, tl.math.exp2(s_t - m[None, :]) * inv_l[None, :], 0.0)  # (N, S)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)  # (N, BLOCK_D)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (N, S)
    ds_t = p_t * (dp_t - delta[None, :])  # (N, S)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)  # (N, BLOCK_D)
    return dk, dv


# ---------------------------------------------------------------------------- walks
# Every inner loop is one of two walks over partner blocks, _walk_band and _walk_list,
# handing each block to BODY; _walk_pattern strings them together for the window
# kernels. The owned rows are queries, or keys when OWN_KEYS (dK/dV).
@triton.jit
def _walk_pattern(accs, res, ptrs, r, d, o0, m_r, lo, hi, GLOB, ROW_GLOBAL, KEY_OK, G, causal, scale_log2,
                  BODY: tl.constexpr, OWN_KEYS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PREC: tl.constexpr):  # fmt: skip
    # Every partner of the owned class indices o0 + a (a < BLOCK_O) of class r: the band,
    # then the global tokens (G = 0: no iteration). A pair of the band with a global
    # partner is counted once: owned queries skip, among the global keys, those in their
    # window; owned keys skip global queries in the band (ROW_GLOBAL flags) and take
    # every global query from the list, which costs fewer registers than the window test.
    # KEY_OK (owned queries only): the batch's key flags, absent keys are left out.
    # The band: query t meets key u iff lo <= u - t <= hi. Partner block j holds class
    # indices p0 + j*BLOCK_S + b, p0 = o0 + lo for owned queries, o0 - hi for owned keys;
    # either way owned row a meets partner b iff 0 <= j*BLOCK_S + b - a <= w_span = hi - lo,
    # for j < jn. Blocks [j1, j2) lie wholly inside the band (j*BLOCK_S >= BLOCK_O - 1 and
    # (j+1)*BLOCK_S <= w_span + 1) and need only the sequence-end mask; [0, j1) and
    # [j2, jn) straddle its edges and get the band mask. Only blocks that meet the class,
    # [j_lo, j_hi), are visited: near the start of a sequence a long one-sided window
    # ((4095, 0): 64 blocks of 64) lies mostly before the first key.
    w_span = hi - lo
    p0 = o0 - hi if OWN_KEYS else o0 + lo
    jn = _cdiv_k(BLOCK_O + w_span, BLOCK_S)
    j1 = tl.minimum((BLOCK_O + BLOCK_S - 2) // BLOCK_S, jn)
    j2 = tl.maximum(j1, (w_span + 1) // BLOCK_S)
    j_lo = tl.maximum(-p0, 0) // BLOCK_S  # the first block holding class index 0 or later
    j_hi = tl.minimum(jn, _cdiv_k(m_r - p0, BLOCK_S))  # past the block holding index m_r - 1
    starts = (j_lo, tl.maximum(j_lo, j1), tl.maximum(j_lo, j2))
    ends = (tl.minimum(j_hi, j1), tl.minimum(j_hi, j2), j_hi)
    for stage in tl.static_range(3):  # leading edge, inside, trailing edge
        accs = _walk_band(accs, res, ptrs, ROW_GLOBAL, KEY_OK, r, d, p0, m_r, w_span, scale_log2, starts[stage],
                          ends[stage], BODY, stage != 1, OWN_KEYS, BLOCK_O, BLOCK_S, HEAD_DIM, BLOCK_D,
                          DOT_PREC)  # fmt: skip
    opos, _ = _class_rows(r, d, o0, m_r, BLOCK_O)
    return _walk_list(accs, res, ptrs, opos, GLOB, None, KEY_OK, G, 0, _cdiv_k(G, BLOCK_G), d, lo, hi, causal,
                      scale_log2, BODY, OWN_KEYS, LISTED=True, OUTSIDE_WINDOW=not OWN_KEYS, SKIP_GLOBAL=False,
                      BLOCK_S=BLOCK_G, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)  # fmt: skip


@triton.jit
def _walk_band(accs, res, ptrs, ROW_GLOBAL, KEY_OK, r, d, p0, m_r, w_span, scale_log2, j_start, j_end,
               BODY: tl.constexpr, BAND: tl.constexpr, SKIP_GLOBAL: tl.constexpr, BLOCK_O: tl.constexpr,
               BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_PREC: tl.constexpr):  # fmt: skip
    # Partner blocks j_start .. j_end - 1 of the band (see _walk_pattern); BAND: mask its
    # edges; SKIP_GLOBAL: leave out global partners (ROW_GLOBAL flags); KEY_OK: leave out
    # absent keys (partners are keys; None: no key mask)
    offs_o = tl.arange(0, BLOCK_O)
    offs_s = tl.arange(0, BLOCK_S)
    for j in range(_trip(j_start), _trip(j_end)):
        idx = p0 + j * BLOCK_S + offs_s  # (S,) partner class indices
        s_ok = (idx >= 0) & (idx < m_r)  # (S,): windows are truncated at the sequence ends
        p_ok = _key_flags(KEY_OK, r + d * idx, s_ok)  # (S,) which partners count
        if SKIP_GLOBAL:
            p_ok = p_ok & (tl.load(ROW_GLOBAL + r + d * idx, mask=s_ok, other=1) == 0)
        if BAND:
            rel = j * BLOCK_S + offs_s[None, :] - offs_o[:, None]  # (OWN, S): partner - owned - (p0 - o0)
            ok = p_ok[None, :] & (rel >= 0) & (rel <= w_span)  # (OWN, S)
        else:
            ok = p_ok[None, :]  # (1, S)
        accs = BODY(accs, res, ptrs, r + d * idx, s_ok, ok, scale_log2, HEAD_DIM, BLOCK_D, DOT_PREC)
    return accs


@triton.jit
def _walk_list(accs, res, ptrs, opos, GLOB, ROW_GLOBAL, KEY_OK, count, j_start, j_end, d, lo, hi, causal,
               scale_log2, BODY: tl.constexpr, OWN_KEYS: tl.constexpr, LISTED: tl.constexpr,
               OUTSIDE_WINDOW: tl.constexpr, SKIP_GLOBAL: tl.constexpr, BLOCK_S: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # Partner blocks j_start .. j_end - 1 of a list: the global tokens GLOB[0 .. count)
    # when LISTED, else every position 0 .. count - 1. The owned rows are at opos (OWN,);
    # padding rows among them are computed and never stored. A pair counts when the
    # partner exists, key <= query if causal, the key is present (KEY_OK flags of partner
    # keys; None: no key mask), and
    #   OUTSIDE_WINDOW: the key is not in the query's window, i.e. not key - query = c*d
    #     with lo <= c <= hi (the window walk counted those);
    #   SKIP_GLOBAL: the partner is not a global row (ROW_GLOBAL flags; their pairs are
    #     counted elsewhere).
    offs_s = tl.arange(0, BLOCK_S)
    for j in range(_trip(j_start), _trip(j_end)):
        idx = j * BLOCK_S + offs_s  # (S,)
        s_ok = idx < count  # (S,)
        if LISTED:
            spos = tl.load(GLOB + idx, mask=s_ok, other=0)  # (S,) partner positions
        else:
            spos = idx
        p_ok = _key_flags(KEY_OK, spos, s_ok)  # (S,) which partners count
        if SKIP_GLOBAL:
            p_ok = p_ok & (tl.load(ROW_GLOBAL + spos, mask=s_ok, other=1) == 0)
        if OWN_KEYS:
            diff = opos[:, None] - spos[None, :]  # (OWN, S): key - query
        else:
            diff = spos[None, :] - opos[:, None]  # (OWN, S): key - query
        ok = p_ok[None, :] & ((diff <= 0) | (causal == 0))  # (OWN, S)
        if OUTSIDE_WINDOW:
            ok = ok & ~(((diff % d) == 0) & (diff >= lo * d) & (diff <= hi * d))
        accs = BODY(accs, res, ptrs, spos, s_ok, ok, scale_log2, HEAD_DIM, BLOCK_D, DOT_PREC)
    return accs


@triton.jit
def _key_blocks(gpos, g_ok, n, causal, BLOCK_N: tl.constexpr):
    # key blocks global rows gpos (G,) read: all, or when causal up to their last row's
    return _cdiv_k(tl.where(causal != 0, _max(tl.where(g_ok, gpos, 0), 0) + 1, n), BLOCK_N)


# ---------------------------------------------------------------------------- forward
@triton.jit
def _fwd_store(accs, Ob, STATSb, pos, ok, KEY_OK, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # O = acc / l and the statistics (m, 1/l) of rows pos (R,). A row with a key has
    # l >= 1 (its largest term is 2^0); l = 0 only in padding rows and, with a key mask
    # (KEY_OK not None), in rows it left without keys: there acc = 0, so O = 0, and the
    # statistics are (+inf, 0), so that the backward's P = 2^(s - m) / l is 0 for every
    # key of the row
    acc, l_i, m_i = accs  # (R, BLOCK_D), (R,), (R,)
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # (R,)
    inv_l = 1.0 / l_safe  # (R,)
    _store_rows(Ob, pos, ok, acc * inv_l[:, None], HEAD_DIM, BLOCK_D)
    if KEY_OK is not None:
        m_i = tl.where(l_i > 0, m_i, float("inf"))
        inv_l = tl.where(l_i > 0, inv_l, 0.0)
    tl.store(STATSb + 2 * pos, m_i, mask=ok)
    tl.store(STATSb + 2 * pos + 1, inv_l, mask=ok)


@triton.jit
def _fwd_init(R: tl.constexpr, BLOCK_D: tl.constexpr):
    # (acc, l, m): running sum of P V, running sum of 2^(s - m), running max (log2 units)
    return (
        tl.full([R, BLOCK_D], 0.0, tl.float32),  # (R, BLOCK_D)
        tl.full([R], 0.0, tl.float32),  # (R,)
        tl.full([R], -1.0e30, tl.float32),  # (R,)
    )


# Non-global rows of one dilation group. For query p = r + d*t:
#   O_p = sum_j softmax_j(s_pj) v_j over j in {r + d*u : lo <= u - t <= hi, 0 <= u < m_r}
#         and over the global keys outside that set (g <= p when causal),
#         j present in batch b (KEY_OK, B x n flags; None: every key);  O_p = 0 if no j,
#   (m_p, 1/l_p) = (max_j s_pj, 1 / sum_j 2^(s_pj - m_p)) ((+inf, 0) if no j),
#   s_pj = scale * log2(e) * q_p . k_j.
# k_j, v_j those of query head h's key/value head, h // (H / KVH).
# grid: (d * ceil(ceil(n/d) / BLOCK_M), B * HG); program (class r, row block, batch, head).
@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_window_kernel(
    Q, K, V, O, STATS, HEADS, GLOB, KEY_OK,
    scale_log2, n, H, KVH, HG, d, lo, hi, G, causal, n_tune,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    r, t0, m_r, b, h = _class_block(HEADS, n, HG, d, BLOCK_M)
    row0, kv0 = _row0(b, h, H, n), _kv_row0(b, h, H, KVH, n)
    pos, row_ok = _class_rows(r, d, t0, m_r, BLOCK_M)  # (BLOCK_M,)
    q = _load_rows(Q + row0 * HEAD_DIM, pos, row_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    kv = (K + kv0 * HEAD_DIM, V + kv0 * HEAD_DIM)
    if KEY_OK is not None:  # the (n,) flags of batch b
        KEY_OK += b.to(tl.int64) * n

    accs = _fwd_init(BLOCK_M, BLOCK_D)
    accs = _walk_pattern(accs, (q,), kv, r, d, t0, m_r, lo, hi, GLOB, None, KEY_OK, G, causal, scale_log2,
                         _fwd_body, False, BLOCK_M, BLOCK_N, BLOCK_G, HEAD_DIM, BLOCK_D, DOT_PREC)  # fmt: skip

    # Global rows are stored too (wrong: window only) and overwritten by
    # _fwd_global_rows_kernel, launched after this one on the same stream. Masking them
    # here would need their flags in the epilogue, which costs the loop registers.
    pos, row_ok = _class_rows(r, d, t0, m_r, BLOCK_M)
    _fwd_store(accs, O + row0 * HEAD_DIM, STATS + 2 * row0, pos, row_ok, KEY_OK, HEAD_DIM, BLOCK_D)


# Global rows: every present key (j <= g when causal), dense over n for these G rows only.
#   O_g = sum_j softmax_j(s_gj) v_j (0 if no j),  (m_g, 1/l_g) as above,
#   j present in batch b (KEY_OK; None: every key).
# grid: (ceil(G / BLOCK_G), B * H).
@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_global_rows_kernel(
    Q, K, V, O, STATS, GLOB, KEY_OK, scale_log2, n, H, KVH, G, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    gpos, g_ok, b, h = _global_block(GLOB, G, H, BLOCK_G)  # (BLOCK_G,) row positions
    row0, kv0 = _row0(b, h, H, n), _kv_row0(b, h, H, KVH, n)
    q = _load_rows(Q + row0 * HEAD_DIM, gpos, g_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_G, BLOCK_D)
    kv = (K + kv0 * HEAD_DIM, V + kv0 * HEAD_DIM)
    if KEY_OK is not None:  # the (n,) flags of batch b
        KEY_OK += b.to(tl.int64) * n
    accs = _walk_list(_fwd_init(BLOCK_G, BLOCK_D), (q,), kv, gpos, GLOB, None, KEY_OK, n, 0,
                      _key_blocks(gpos, g_ok, n, causal, BLOCK_N), 1, 0, 0, causal, scale_log2, _fwd_body,
                      OWN_KEYS=False, LISTED=False, OUTSIDE_WINDOW=False, SKIP_GLOBAL=False, BLOCK_S=BLOCK_N,
                      HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)  # fmt: skip
    _fwd_store(accs, O + row0 * HEAD_DIM, STATS + 2 * row0, gpos, g_ok, KEY_OK, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------- backward
# With P = softmax(S), dO given:  dV = P^T dO,  dP = dO V^T,
#   dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i),
#   dQ = scale * dS K,  dK = scale * dS^T Q.
# P is recomputed from the saved row statistics: P_ij = 2^(s_ij - m_i) / l_i. With a key mask, P_ij = 0
# for absent keys j: dQ leaves them out as the forward does, dK/dV store 0 for them; a
# row without keys has statistics (+inf, 0), so its P is 0 for every key (and its O, delta are 0).


# delta_i = rowsum(dO_i * O_i), fp32.  grid: (ceil(n / BLOCK_M), B * H).
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_delta_kernel(
    O, DO, DELTA, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr
):  # fmt: skip
    row0 = tl.program_id(1).to(tl.int64) * n
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows
    o = _load_rows(O + row0 * HEAD_DIM, i, i < n, HEAD_DIM, BLOCK_D).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(DO + row0 * HEAD_DIM, i, i < n, HEAD_DIM, BLOCK_D).to(tl.float32)  # (BLOCK_M, BLOCK_D)
    tl.store(DELTA + row0 + i, _sum(o * do, 1), mask=i < n)


# dK, dV of one key block of one class of key/value head g, from the query heads that
# read it (grouped-query attention: those of this dilation group among g's, QHEADS[slot,
# :QCNT[slot]]), each (a) its non-global queries whose window holds the key and (b)
# every global query (j <= g when causal):
#   dV_j = sum_h sum_i P_hij dO_hi,  dK_j = scale * sum_h sum_i dS_hij q_hi;
#   dV_j = dK_j = 0 for a key absent in batch b (KEY_OK; None: every key present).
# The group's sum stays in registers: k, v are read once and never repeated per head.
# accumulate != 0 (a key/value head whose query heads span several dilation groups, one
# launch each): add to what DK, DV hold (zeroed by the host) instead of storing.
# A block of absent keys only walks nothing.
# grid: (d * ceil(ceil(n/d) / BLOCK_N), B * HG), HG key/value heads.
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_kv_window_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, HEADS, QHEADS, QCNT, ROW_GLOBAL, GLOB, KEY_OK,
    scale, scale_log2, n, H, KVH, HG, d, lo, hi, G, causal, GQ, accumulate, n_tune,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    r, u0, m_r, b, g = _class_block(HEADS, n, HG, d, BLOCK_N)
    kv0 = _row0(b, g, KVH, n)
    kpos, col_ok = _class_rows(r, d, u0, m_r, BLOCK_N)  # (BLOCK_N,)
    k = _load_rows(K + kv0 * HEAD_DIM, kpos, col_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(V + kv0 * HEAD_DIM, kpos, col_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)

    slot = tl.program_id(1) % HG
    n_heads = tl.load(QCNT + slot)  # the query heads reading g here
    if KEY_OK is not None:  # the (n,) flags of batch b; no key present: no head to walk
        KEY_OK += b.to(tl.int64) * n
        n_heads = tl.where(_max(_key_flags(KEY_OK, kpos, col_ok).to(tl.int32), 0) > 0, n_heads, 0)
    for i in range(_trip(0), _trip(n_heads)):
        rows = _query_ptrs(Q, DO, STATS, DELTA, _row0(b, tl.load(QHEADS + slot * GQ + i), H, n), HEAD_DIM)
        # partners are queries, never masked: absent owned keys are zeroed below
        dk, dv = _walk_pattern((dk, dv), (k, v), rows, r, d, u0, m_r, lo, hi, GLOB, ROW_GLOBAL, None, G, causal,
                               scale_log2, _dkdv_body, True, BLOCK_N, BLOCK_M, BLOCK_G, HEAD_DIM, BLOCK_D,
                               DOT_PREC)  # fmt: skip

    kpos, col_ok = _class_rows(r, d, u0, m_r, BLOCK_N)
    add = tl.where(col_ok, accumulate, 0) != 0  # (BLOCK_N,) rows to read back first
    dk = dk * scale + _load_rows(DK + kv0 * HEAD_DIM, kpos, add, HEAD_DIM, BLOCK_D)  # (BLOCK_N, BLOCK_D)
    dv = dv + _load_rows(DV + kv0 * HEAD_DIM, kpos, add, HEAD_DIM, BLOCK_D)
    if KEY_OK is not None:  # absent keys: 0, whatever the walk or an earlier launch left
        present = _key_flags(KEY_OK, kpos, col_ok)[:, None]  # (BLOCK_N, 1)
        dk, dv = tl.where(present, dk, 0.0), tl.where(present, dv, 0.0)
    _store_rows(DK + kv0 * HEAD_DIM, kpos, col_ok, dk, HEAD_DIM, BLOCK_D)
    _store_rows(DV + kv0 * HEAD_DIM, kpos, col_ok, dv, HEAD_DIM, BLOCK_D)


# Global keys, the part the window kernel cannot see: non-global queries i that reach
# global key g outside their window (g <= i when causal), of every query head reading
# this key/value head (h = kv * GQ + j, each with its own dilation from DIL). Read-add-
# write into dK, dV (fp32 buffers), one program per block of global keys of one
# key/value head, so no two programs touch a row.
#   dV_g += sum_h sum_i P_hig dO_hi,  dK_g += scale * sum_h sum_i dS_hig q_hi;
#   dV_g = dK_g = 0 for a global key absent in batch b (KEY_OK; None: every key present).
# grid: (ceil(G / BLOCK_G), B * KVH).
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_kv_global_keys_kernel(
    Q, K, V, DO, STATS, DELTA, DK, DV, ROW_GLOBAL, GLOB, DIL, KEY_OK,
    scale, scale_log2, n, H, KVH, lo, hi, G, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    gpos, g_ok, b, g = _global_block(GLOB, G, KVH, BLOCK_G)  # (BLOCK_G,) key positions
    kv0 = _row0(b, g, KVH, n)
    k = _load_rows(K + kv0 * HEAD_DIM, gpos, g_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_G, BLOCK_D)
    v = _load_rows(V + kv0 * HEAD_DIM, gpos, g_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_G, BLOCK_D)
    dk = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    # causal: queries before the block's first key never see it
    first = tl.where(causal != 0, _min(tl.where(g_ok, gpos, n), 0) // BLOCK_M, 0)
    GQ = H // KVH
    for j in range(_trip(0), _trip(GQ)):
        h = g * GQ + j
        d = tl.load(DIL + h)
        # this head's offsets, clipped to its longest class (as the host does per group)
        reach = _cdiv_k(n, d) - 1
        rows = _query_ptrs(Q, DO, STATS, DELTA, _row0(b, h, H, n), HEAD_DIM)
        dk, dv = _walk_list((dk, dv), (k, v), rows, gpos, GLOB, ROW_GLOBAL, None, n, first, _cdiv_k(n, BLOCK_M), d,
                            tl.maximum(lo, -reach), tl.minimum(hi, reach), causal, scale_log2, _dkdv_body,
                            OWN_KEYS=True, LISTED=False, OUTSIDE_WINDOW=True, SKIP_GLOBAL=True, BLOCK_S=BLOCK_M,
                            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)  # fmt: skip
    dk = dk * scale + _load_rows(DK + kv0 * HEAD_DIM, gpos, g_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_G, BLOCK_D)
    dv = dv + _load_rows(DV + kv0 * HEAD_DIM, gpos, g_ok, HEAD_DIM, BLOCK_D)  # (BLOCK_G, BLOCK_D)
    if KEY_OK is not None:  # absent global keys: 0, the window kernel's part included
        present = _key_flags(KEY_OK + b.to(tl.int64) * n, gpos, g_ok)[:, None]  # (BLOCK_G, 1)
        dk, dv = tl.where(present, dk, 0.0), tl.where(present, dv, 0.0)
    _store_rows(DK + kv0 * HEAD_DIM, gpos, g_ok, dk, HEAD_DIM, BLOCK_D)
    _store_rows(DV + kv0 * HEAD_DIM, gpos, g_ok, dv, HEAD_DIM, BLOCK_D)


# dQ of the non-global rows of one dilation group: the window and the global keys outside
# it, exactly the keys of the forward (of the query head's key/value head, present ones
# only with KEY_OK).
#   dQ_i = scale * sum_j dS_ij k_j.
# grid: as _fwd_window_kernel.
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_q_window_kernel(
    Q, K, V, DO, STATS, DELTA, DQ, HEADS, GLOB, KEY_OK,
    scale, scale_log2, n, H, KVH, HG, d, lo, hi, G, causal, n_tune,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    r, t0, m_r, b, h = _class_block(HEADS, n, HG, d, BLOCK_M)
    row0, kv0 = _row0(b, h, H, n), _kv_row0(b, h, H, KVH, n)
    pos, row_ok = _class_rows(r, d, t0, m_r, BLOCK_M)  # (BLOCK_M,)
    res = _query_rows(_query_ptrs(Q, DO, STATS, DELTA, row0, HEAD_DIM), pos, row_ok, HEAD_DIM, BLOCK_D)
    kv = (K + kv0 * HEAD_DIM, V + kv0 * HEAD_DIM)
    if KEY_OK is not None:  # the (n,) flags of batch b
        KEY_OK += b.to(tl.int64) * n

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    (dq,) = _walk_pattern((dq,), res, kv, r, d, t0, m_r, lo, hi, GLOB, None, KEY_OK, G, causal, scale_log2,
                          _dq_body, False, BLOCK_M, BLOCK_N, BLOCK_G, HEAD_DIM, BLOCK_D, DOT_PREC)  # fmt: skip

    # global rows: overwritten by _bwd_q_global_rows_kernel, launched after this one
    pos, row_ok = _class_rows(r, d, t0, m_r, BLOCK_M)
    _store_rows(DQ + row0 * HEAD_DIM, pos, row_ok, dq * scale, HEAD_DIM, BLOCK_D)


# dQ of the global rows: every present key (j <= g when causal).
# grid: (ceil(G / BLOCK_G), B * H).
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_q_global_rows_kernel(
    Q, K, V, DO, STATS, DELTA, DQ, GLOB, KEY_OK, scale, scale_log2, n, H, KVH, G, causal,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    gpos, g_ok, b, h = _global_block(GLOB, G, H, BLOCK_G)  # (BLOCK_G,) row positions
    row0, kv0 = _row0(b, h, H, n), _kv_row0(b, h, H, KVH, n)
    res = _query_rows(_query_ptrs(Q, DO, STATS, DELTA, row0, HEAD_DIM), gpos, g_ok, HEAD_DIM, BLOCK_D)
    kv = (K + kv0 * HEAD_DIM, V + kv0 * HEAD_DIM)
    if KEY_OK is not None:  # the (n,) flags of batch b
        KEY_OK += b.to(tl.int64) * n
    dq = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    (dq,) = _walk_list((dq,), res, kv, gpos, GLOB, None, KEY_OK,
                       n, 0, _key_blocks(gpos, g_ok, n, causal, BLOCK_N), 1, 0, 0, causal, scale_log2, _dq_body,
                       OWN_KEYS=False, LISTED=False, OUTSIDE_WINDOW=False, SKIP_GLOBAL=False, BLOCK_S=BLOCK_N,
                       HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)  # fmt: skip
    _store_rows(DQ + row0 * HEAD_DIM, gpos, g_ok, dq * scale, HEAD_DIM, BLOCK_D)


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

        (resident * own + 2 * stages * walk) * bd * esize + row * stages * walk + 1 KiB

    own: rows of the block a program owns; walk: rows of the blocks its loops stream,
    the window's (the other of bm, bn) or the global loop's (bg), whichever is larger:
    each streamed block's two tiles (k, v or q, dO) get one buffer per stage, plus its
    fp32 row vectors (``row`` bytes: 12 for the query rows dK/dV streams, their m, 1/l
    and delta; else 8); fp32 inputs hold the resident tiles twice (tf32x3 splits them
    into a high and a low part). Fitted to what Triton's sm90 compiler
    allocates (for each config: scripts/triton_resources.py); tests/test_triton.py
    compiles configs on both sides of the limit, with global blocks of 16 and 64, and
    checks the estimate is not below the compiler's figure. It can be below it for
    small single-stage configs (layout conversions), far from the limit."""
    owner, resident = _KINDS[kind]
    own, walk = (bm, bn) if owner == "BLOCK_M" else (bn, bm)
    walk = max(walk, bg)
    if esize == 4:
        resident *= 2
    row_bytes = 12 if kind == "kv" else 8  # dK/dV streams query rows: their (m, 1/l) and delta
    return (resident * own + 2 * stages * walk) * bd * esize + row_bytes * stages * walk + 1024


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


class _KeepSums:
    """The dK/dV tuner's hooks. With ``accumulate`` the kernel adds to DK, DV, and the
    autotuner runs every config many times on them before the launch that counts: each
    benchmarked run gets them back as they were (Triton's ``restore_value``, but only
    when accumulating, so that storing launches copy nothing)."""

    def __init__(self):
        self.saved: dict = {}

    def pre(self, kwargs: dict, reset_only: bool = False) -> None:
        if not reset_only and kwargs["accumulate"]:
            self.saved = {a: kwargs[a].clone() for a in ("DK", "DV")}

    def post(self, kwargs: dict, exception=None) -> None:
        for a, t in self.saved.items():
            kwargs[a].copy_(t)
        self.saved = {}


def _tuner(kernel, rows: list[tuple[int, int, int, int]], kind: str):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": b}, num_warps=w, num_stages=s) for m, b, w, s in rows]
    # keyed on head_dim (BLOCK_D), window (lo, hi), dilation (d) and the size bucket
    # (n_tune): the best blocks at n = 4096 are not those at 32768; the autotuner adds
    # the dtypes. None of these is specialised, so a new key retunes without recompiling.
    prune = functools.partial(_prune, kind=kind)
    key = ["BLOCK_D", "lo", "hi", "d", "n_tune"]
    hooks = {}
    if kind == "kv":
        keep = _KeepSums()
        hooks = {"pre_hook": keep.pre, "post_hook": keep.post}
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, **hooks)(kernel)


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


def _offsets(left: int, right: int, n: int) -> tuple[int, int]:
    """Window offsets (lo, hi) = (-left, right), clipped to [-n, n] (farther never meets
    a key; keeps them, and lo * d in the kernels, inside int32)."""
    return max(-left, -n), min(right, n)


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


def _kv_slots(heads: list[int], GQ: int) -> tuple[list[int], list[int], list[int]]:
    """For the query heads of one dilation group: the key/value heads they read (sorted),
    and for each, its query heads among them (a row of GQ entries, padded with 0) and
    their count, as the dK/dV kernel reads them (QHEADS, QCNT)."""
    by_kv: dict[int, list[int]] = {}
    for h in heads:
        by_kv.setdefault(h // GQ, []).append(h)
    kvs = sorted(by_kv)
    table = [h for g in kvs for h in by_kv[g] + [0] * (GQ - len(by_kv[g]))]
    return kvs, table, [len(by_kv[g]) for g in kvs]


def _window_launch(kernel, tuner, args: tuple, *, programs_over: str, n: int, d: int, B: int, HG: int,
                   fixed: tuple, tune: bool, **const) -> dict:  # fmt: skip
    """Launch a window kernel (forward, dK/dV or dQ) over one dilation group.

    ``programs_over`` is "BLOCK_M" when a program owns a block of query rows (its
    loop walks key blocks) and "BLOCK_N" when it owns a block of keys."""
    n_cls = _cdiv(n, d)

    def grid(meta):
        return (d * _cdiv(n_cls, meta[programs_over]), B * HG)

    if tune:
        tuner[grid](*args, **const)
        c = tuner.best_config
        return {
            "BLOCK_M": c.kwargs["BLOCK_M"],
            "BLOCK_N": c.kwargs["BLOCK_N"],
            "num_warps": c.num_warps,
            "num_stages": c.num_stages,
            "autotuned": True,
        }
    bm, bn, w, s = (INTERPRETER_BLOCK, INTERPRETER_BLOCK, None, None) if INTERPRETED else fixed
    kernel[grid](*args, **const, BLOCK_M=bm, BLOCK_N=bn, **_launch_opts(w, s))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s, "autotuned": False}


def _global_launch(kernel, args: tuple, *, streams: str, G: int, BH: int, bg: int, bd: int, esize: int,
                   **const) -> None:  # fmt: skip
    """Launch a global-token kernel: one program per block of global tokens, streaming
    blocks (``streams``: "BLOCK_N" of keys, "BLOCK_M" of queries) over the sequence."""
    bs = INTERPRETER_BLOCK if INTERPRETED else 32 if bd * esize > 256 else 64
    kernel[(_cdiv(G, bg), BH)](*args, **const, BLOCK_G=bg, **{streams: bs}, **_launch_opts(4, 2))


def _launch_opts(num_warps: int | None, num_stages: int | None) -> dict:
    return {} if INTERPRETED else {"num_warps": num_warps, "num_stages": num_stages}


def _dot_args(dtype: torch.dtype) -> dict:
    """DOT_PREC for fp32 inputs: plain TF32 would miss the fp32 tolerance, so the
    compiled kernels use "tf32x3" (three TF32 products: about fp32 accuracy on tensor
    cores, and it compiles several times faster than "ieee"); the interpreter computes
    in numpy ("ieee"). For 16-bit inputs it is ignored."""
    if dtype == torch.float32:
        prec = "ieee" if INTERPRETED else "tf32x3"
    else:
        prec = "tf32"
    return {"DOT_PREC": prec}


def _key_flags_arg(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """KEY_OK of the kernels: the key mask ``(B, n)`` bool as int8 flags (the same bytes,
    no copy when contiguous), or None: every key, and the code without the mask."""
    return None if key_mask is None else key_mask.contiguous().view(torch.int8)


def _block_g(G: int) -> int:
    return INTERPRETER_BLOCK if INTERPRETED else min(64, max(16, _next_pow2(G)))


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilations: tuple[int, ...],
    left: int,
    right: int,
    causal: bool,
    glob: tuple[int, ...],
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward. q contiguous ``(B, H, n, D)``, k, v contiguous
    ``(B, KVH, n, D)`` (KVH dividing H); ``dilations`` one per query head; the window
    ``(left, right)``; ``glob`` sorted unique positions; ``key_mask`` ``(B, n)`` bool,
    True where a key is present, or None. Returns ``out`` (input dtype) and the row
    statistics ``(B, H, n, 2)`` fp32 that :func:`backward` needs: each row's largest
    score ``m`` (base 2) and ``1/l`` ((+inf, 0) in rows the key mask leaves without keys)."""
    B, H, n, D = q.shape
    KVH = k.shape[1]
    bd, esize, G = block_d(D), q.element_size(), len(glob)
    lo, hi = _offsets(left, right, n)
    out = torch.empty_like(q)
    stats = torch.empty((B, H, n, 2), dtype=torch.float32, device=q.device)  # each row's (m, 1/l)
    _, g_t, _ = _meta(q.device, n, tuple(dilations), tuple(glob))
    dot = _dot_args(q.dtype)
    scale_log2 = float(scale) * LOG2E
    bg = _block_g(G)
    tune = not INTERPRETED and n >= AUTOTUNE_MIN_SEQ
    q, k, v = _kernel_inputs(q, k, v)  # after out is allocated: it keeps the caller's dtype
    keys = _key_flags_arg(key_mask)
    cfg: dict = {}
    for d, lo_g, hi_g, heads in _groups(tuple(dilations), n, lo, hi):
        heads_t = _heads(q.device, tuple(heads))
        args = (
            q,
            k,
            v,
            out,
            stats,
            heads_t,
            g_t,
            keys,
            scale_log2,
            n,
            H,
            KVH,
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
            fixed=_fixed(bd, esize, "fwd"), tune=tune, HEAD_DIM=D, BLOCK_D=bd, BLOCK_G=bg, **dot,
        )  # fmt: skip
    if G:
        _global_launch(
            _fwd_global_rows_kernel, (q, k, v, out, stats, g_t, keys, scale_log2, n, H, KVH, G, int(causal)),
            streams="BLOCK_N", G=G, BH=B * H, bg=bg, bd=bd, esize=esize, HEAD_DIM=D, BLOCK_D=bd, **dot,
        )  # fmt: skip
    LAST_CONFIG.clear()
    LAST_CONFIG.update(cfg, BLOCK_D=bd, BLOCK_G=bg, interpreted=INTERPRETED)
    return out, stats


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    dilations: tuple[int, ...],
    left: int,
    right: int,
    causal: bool,
    glob: tuple[int, ...],
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q ``(B, H, n, D)`` and k, v ``(B, KVH, n, D)`` from dO, recomputing P
    from the saved STATS. Every tensor contiguous, as :func:`forward` got and returned them,
    and the forward's ``key_mask``."""
    B, H, n, D = q.shape
    KVH = k.shape[1]
    GQ = H // KVH
    dtype = q.dtype
    bd, esize, G = block_d(D), q.element_size(), len(glob)
    lo, hi = _offsets(left, right, n)
    row_global, g_t, dil_t = _meta(q.device, n, tuple(dilations), tuple(glob))
    dot = _dot_args(q.dtype)
    scale_log2 = float(scale) * LOG2E
    bg = _block_g(G)
    tune = not INTERPRETED and n >= AUTOTUNE_MIN_SEQ

    delta = torch.empty(stats.shape[:-1], dtype=torch.float32, device=q.device)  # (B, H, n)
    bmd = INTERPRETER_BLOCK if INTERPRETED else 64
    _bwd_delta_kernel[(_cdiv(n, bmd), B * H)](out, do, delta, n, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bmd)

    dq = torch.empty_like(q)
    groups = _groups(tuple(dilations), n, lo, hi)
    slots = [_kv_slots(heads, GQ) for *_, heads in groups]
    # a key/value head read by query heads of several dilation groups gets one dK/dV
    # launch per group, each adding to the last: zeroed fp32 buffers. With global keys
    # dK, dV get a second, read-add-write pass: fp32 until then.
    kv_launches = [g for kvs, _, _ in slots for g in kvs]
    accumulate = len(kv_launches) != len(set(kv_launches))
    acc_dtype = torch.float32 if G or accumulate else dtype
    alloc = torch.zeros if accumulate else torch.empty
    dk = alloc(k.shape, dtype=acc_dtype, device=q.device)
    dv = alloc(k.shape, dtype=acc_dtype, device=q.device)
    do, q, k, v, out = _kernel_inputs(do, q, k, v, out)  # the gradients keep the caller's dtype
    keys = _key_flags_arg(key_mask)
    cfg_kv: dict = {}
    cfg_q: dict = {}
    for (d, lo_g, hi_g, heads), (kvs, qtab, qcnt) in zip(groups, slots):
        common = dict(n=n, d=d, B=B, tune=tune, HEAD_DIM=D, BLOCK_D=bd, BLOCK_G=bg)
        cfg_kv = _window_launch(
            _bwd_kv_window_kernel, _bwd_kv_window_tuned,
            (q, k, v, do, stats, delta, dk, dv, _heads(q.device, tuple(kvs)), _heads(q.device, tuple(qtab)),
             _heads(q.device, tuple(qcnt)), row_global, g_t, keys, scale, scale_log2, n, H, KVH, len(kvs), d, lo_g,
             hi_g, G, int(causal), GQ, int(accumulate), _next_pow2(n)),
            programs_over="BLOCK_N", fixed=_fixed(bd, esize, "kv"), HG=len(kvs), **dot, **common,
        )  # fmt: skip
        cfg_q = _window_launch(
            _bwd_q_window_kernel, _bwd_q_window_tuned,
            (q, k, v, do, stats, delta, dq, _heads(q.device, tuple(heads)), g_t, keys, scale, scale_log2, n, H, KVH,
             len(heads), d, lo_g, hi_g, G, int(causal), _next_pow2(n)),
            programs_over="BLOCK_M", fixed=_fixed(bd, esize, "q"), HG=len(heads), **dot, **common,
        )  # fmt: skip
    if G:
        glob_common = dict(G=G, bg=bg, bd=bd, esize=esize, HEAD_DIM=D, BLOCK_D=bd, **dot)
        # after every group's dK/dV window kernel: it adds to what they stored
        _global_launch(
            _bwd_kv_global_keys_kernel,
            (q, k, v, do, stats, delta, dk, dv, row_global, g_t, dil_t, keys, scale, scale_log2, n, H, KVH, lo, hi, G,
             int(causal)),
            streams="BLOCK_M", BH=B * KVH, **glob_common,
        )  # fmt: skip
        _global_launch(
            _bwd_q_global_rows_kernel,
            (q, k, v, do, stats, delta, dq, g_t, keys, scale, scale_log2, n, H, KVH, G, int(causal)),
            streams="BLOCK_N", BH=B * H, **glob_common,
        )  # fmt: skip
    if acc_dtype != dtype:
        dk, dv = dk.to(dtype), dv.to(dtype)
    LAST_CONFIG["backward"] = {"kv": cfg_kv, "q": cfg_q, "BLOCK_G": bg, "interpreted": INTERPRETED}
    return dq, dk, dv
