"""flex: PyTorch FlexAttention (``torch.nn.attention.flex_attention``), compiled, with a
``mask_mod`` that states the exact pattern.

The ``mask_mod`` is the pattern's own predicate, :meth:`attnbench.Pattern.mask_mod`:
"does query ``q_idx`` of head ``h`` attend to key ``kv_idx``?" Every pattern parameter
in it (window bounds, causal flag, per-head dilations, global flags) is a captured
tensor, never a Python constant, so a new window size or global set does not force a
recompilation of the kernel; new shapes and dtypes do.

The ``BlockMask`` (128 x 128 tiles; tiles wholly inside the pattern skip the mask_mod,
tiles wholly outside are skipped) is built once per (seq_len, heads, pattern, device)
and kept in a small LRU cache. Its construction time is reported apart from the
kernel (:func:`report`, the registry's ``report``: ``setup_ms`` is the time to build
the mask of the last call, 0.0 when it came from the cache).
Small masks are built eagerly; large ones (over ``EAGER_MASK_LIMIT`` mask entries)
with ``torch.compile(create_block_mask)``, which never materialises the n x n mask
(the eager builder does: pytorch#134756), at the price of a compilation on first use.

Requirements and what this module declares (verified with torch 2.13 on the CPU):

* CPU: the compiled C++ kernel accepts fp32, fp16 and bf16 but not fp64 (inductor
  raises), and it is inference-only: ``flex_attention`` raises NotImplementedError for
  inputs that require grad, compiled or not (pytorch#148752). ``backward`` is declared
  (it exists on CUDA) and refused on the CPU through ``unsupported_on``, so the registry
  refuses such a call (and the benchmark skips it) before anything compiles.
* CUDA (Triton kernel; not verified here): head_dim must be at least 16, refused in
  :func:`_check`. Ragged lengths (n not a multiple of 128) are handled by FlexAttention.
* fp64 is not declared: refused on the CPU, unverified on CUDA.

Compiled with ``dynamic=False``: one specialised kernel per shape and dtype. (With
dynamic shapes, which dynamo turns on after a shape change, inductor generated C++ for
this mask_mod that failed to compile on the CPU in torch 2.13: an undeclared
``cur_qSplitSize`` symbol.) The first compiled call takes seconds (about 10-20 s for
the very first one on a 2-core CPU, a few s per new shape/dtype after), hence
``slow_on_cpu``. The softmax scale is a compile-time constant too (dynamo specialises
Python floats): a new scale recompiles, the default 1/sqrt(D) changes only with D.
The recompilation limit is raised during calls and hitting it raises, so the compiled
kernel never silently degrades to eager FlexAttention (which materialises the full
score matrix: pytorch#152528).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import OrderedDict
from typing import Any

import torch

from attnbench import FEATURES, Pattern, UnsupportedError, register

#: LRU cache size for block masks, keyed by (seq_len, heads, pattern, device)
CACHE_SIZE = 16
#: above this many mask entries (heads * n * n), the block mask is built compiled
EAGER_MASK_LIMIT = 1 << 24
#: dynamo's recompilation limit while this module calls the compiled kernel (one
#: compilation per shape and dtype)
RECOMPILE_LIMIT = 256
BLOCK = 128  # FlexAttention's default sparse block size

#: timing of the last call: ``block_mask_ms`` (0.0 when the mask was cached), ``cached``
last_timing: dict[str, Any] = {"block_mask_ms": 0.0, "cached": False}

_MASKS: OrderedDict[tuple, Any] = OrderedDict()


def _probe() -> str | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as e:
        return f"needs torch.nn.attention.flex_attention (torch >= 2.5): {e}"
    return None


_CPU_INFERENCE_ONLY = "FlexAttention's compiled CPU path is inference-only; backward needs CUDA"


# PyTorch's compiled CPU kernel (torch 2.13, AVX2) gives wrong rows, about 1 off or nan,
# at head_dim 8 or 16 and n = 8, 24, ..., 120 (n % 16 == 8 below one 128-block). The
# wrong rows change from call to call, and whether they come at all from process to
# process (at n = 40, about half of fresh interpreters get every call wrong and the
# others every call right), as when a kernel reads memory it never wrote: so a right
# answer lifts nothing. Eight calls each at every n from 1 to 80 (head_dim 16; to 77
# at 32), every n % 8 == 0 to 264 (16), n % 16 == 8 to 264 (8) and n % 32 == 8 to 264
# (24, 32, 64) found no other wrong row. Reduced to PyTorch alone:
#
#     q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
#     near = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 8
#     bm = create_block_mask(near, None, None, 40, 40, device="cpu")
#     got = torch.compile(flex_attention)(q, k, v, block_mask=bm)  # under no_grad
#     i = torch.arange(40)
#     want = torch.softmax((q @ k.mT / 4).masked_fill((i[:, None] - i).abs() > 8, float("-inf")), -1) @ v
#     (got - want).abs().max()  # about 1 or nan in about half of fresh processes, not 1e-7
_CPU_WRONG = "PyTorch's compiled CPU FlexAttention gives wrong rows at head_dim <= 16 with n in 8, 24, ..., 120"


def _cpu_kernel_wrong(head_dim: int, n: int) -> bool:
    return head_dim <= 16 and n < 128 and n % 16 == 8


def _check(q: torch.Tensor, pattern: Pattern) -> list[str]:
    reasons = []
    if q.device.type == "cpu" and _cpu_kernel_wrong(q.shape[-1], q.shape[-2]):
        reasons.append(f"head_dim={q.shape[-1]}, seq_len={q.shape[-2]}: {_CPU_WRONG} (impls/flex.py reduces it)")
    if q.device.type == "cuda" and q.shape[-1] < 16:
        reasons.append(f"head_dim={q.shape[-1]}: FlexAttention's CUDA (Triton) kernel needs head_dim >= 16")
    return reasons


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    hm = H if pattern.per_head else 1  # block-mask head rows
    nb = math.ceil(n / BLOCK)
    blocks = hm * nb * nb * 4 * 4  # kv/q indices, partial and full, int32
    build = hm * n * n * 2 if hm * n * n <= EAGER_MASK_LIMIT else 0  # eager builder: dense bool mask + temp
    out = B * H * n * (D * esize + 4)  # output + logsumexp
    bwd = B * H * n * (3 * D * esize + 8) if backward else 0  # dq, dk, dv, delta
    return float(blocks + build + out + bwd)


@functools.lru_cache(maxsize=1)
def _compiled_builder():
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=False)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_block_mask(
    pattern: Pattern, seq_len: int, heads: int, device: torch.device | str, key_mask: torch.Tensor | None = None
) -> tuple[Any, float]:
    """Build (uncached) the ``BlockMask`` of ``pattern``, and of ``key_mask`` ``(B, n)``
    on top when given; returns ``(mask, milliseconds)``.

    The mask has one head row when the dilation is shared by all heads (the kernel
    broadcasts it), ``heads`` rows for a per-head dilation; one batch row, or ``B`` with
    a key mask. Above ``EAGER_MASK_LIMIT`` entries the builder is compiled: its first use
    for a shape includes compilation (build twice to time the warm builder).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    dev = torch.device(device)
    mask_mod = pattern.mask_mod(seq_len, heads, dev)
    B = None
    if key_mask is not None:
        B, present, window = key_mask.shape[0], key_mask.to(dev), mask_mod

        def mask_mod(b, h, q_idx, kv_idx):  # the window, and key kv_idx present in sample b
            return window(b, h, q_idx, kv_idx) & present[b, kv_idx]

    hm = heads if pattern.per_head else None
    big = (B or 1) * (hm or 1) * seq_len * seq_len > EAGER_MASK_LIMIT
    builder = _compiled_builder() if big else create_block_mask
    _sync(dev)
    t0 = time.perf_counter()
    bm = builder(mask_mod, B, hm, seq_len, seq_len, device=dev)
    _sync(dev)
    return bm, (time.perf_counter() - t0) * 1e3


def get_block_mask(
    pattern: Pattern, seq_len: int, heads: int, device: torch.device | str, key_mask: torch.Tensor | None = None
) -> Any:
    """The cached ``BlockMask`` (built on a miss); updates :data:`last_timing`. With a key
    mask the entry holds a copy of it and is used only for a key mask equal to it in
    every entry, so a mask changed in place is never served a stale block mask."""
    dev = torch.device(device)
    key = (seq_len, heads, pattern, str(dev), None if key_mask is None else tuple(key_mask.shape))
    hit = _MASKS.get(key)
    if hit is not None and (key_mask is None or torch.equal(hit[1], key_mask)):
        _MASKS.move_to_end(key)
        last_timing.update(block_mask_ms=0.0, cached=True)
        return hit[0]
    bm, ms = build_block_mask(pattern, seq_len, heads, dev, key_mask)
    _MASKS[key] = (bm, None if key_mask is None else key_mask.clone())
    while len(_MASKS) > CACHE_SIZE:
        _MASKS.popitem(last=False)
    last_timing.update(block_mask_ms=ms, cached=False)
    return bm


def report() -> dict:
    """For the result row: ``setup_ms``, the milliseconds spent building the block mask
    in the last call (0.0 when it came from the cache)."""
    return {"setup_ms": float(last_timing["block_mask_ms"])}


def clear_cache() -> None:
    """Drop every cached block mask."""
    _MASKS.clear()


@register(
    "flex",
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    features=FEATURES,
    probe=_probe,
    check=_check,
    memory=_memory,
    tunables={"block_size": BLOCK, "cache_size": CACHE_SIZE},
    slow_on_cpu=True,
    report=report,
    native_gqa=True,
    unsupported_on={"cpu": {"backward": _CPU_INFERENCE_ONLY}},
)
def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch FlexAttention, compiled, exact mask_mod, cached 128x128 BlockMask

    q ``(B, H, n, D)``, k, v ``(B, H_kv, n, D)`` -> ``(B, H, n, D)`` through compiled
    ``flex_attention`` (``enable_gqa`` when H_kv < H; the mask_mod's ``h`` is the query
    head); a key mask ``(B, n)`` joins the mask_mod (a row left without keys is 0, as
    FlexAttention gives it).
    """
    B, H, n, D = q.shape
    cpu = q.device.type == "cpu"
    if cpu and any(t.requires_grad for t in (q, k, v)):
        if torch.is_grad_enabled():  # a direct call (attention() refuses it first)
            raise UnsupportedError("flex", [_CPU_INFERENCE_ONLY])
        # FlexAttention refuses CPU inputs that require grad even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    bm = get_block_mask(pattern, n, H, q.device, key_mask)
    fn = _compiled_flex()
    # On the CPU (inference only) always call in no_grad mode: dynamo guards on the
    # grad mode, so this saves a second compilation per shape.
    with (
        torch.no_grad() if cpu else contextlib.nullcontext(),
        torch._dynamo.config.patch(
            recompile_limit=RECOMPILE_LIMIT,
            accumulated_recompile_limit=4 * RECOMPILE_LIMIT,
            fail_on_recompile_limit_hit=True,
        ),
    ):
        return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=k.shape[1] != H)
