"""flash_attn: FlashAttention 2's local (sliding-window) attention, ``flash_attn_func``
from the ``flash-attn`` package, CUDA only.

Window mapping: with ``window_size=(left, right)`` query i attends to the keys
``[i - left, i + right]`` (its own key always included): attnbench's window is that
convention, so ``(pattern.left, pattern.right)`` is passed as it is (an int w is
``(w/2, w/2)``, or ``(w, 0)`` causal, with ``causal=True``). ``(0, 0)`` attends to the
own key only; ``-1`` (unbounded) is never passed. The window is aligned to the
bottom-right corner, which for equal query and key lengths is the diagonal.

Grouped-query and multi-query attention are FlashAttention's own: k, v with fewer heads
than q are passed as they are.

FlashAttention has no dilation and no global tokens (Dao-AILab/flash-attention#1001),
so they are not declared and the registry refuses such patterns with that reason.
Layout: ``flash_attn_func`` takes ``(B, n, H, D)``; q, k, v are transposed (a view; the
kernel needs only the last dimension contiguous) and the output transposed back.

Requirements: fp16 / bf16, head_dim <= 256 and a multiple of 8 (:func:`_check`),
an Ampere-or-newer GPU (the package's own error otherwise). Backward is the package's.
"""

from __future__ import annotations

import torch

from attnbench import Pattern, register
from attnbench.ops import cuda_probe

_base_probe = cuda_probe("flash_attn")


def _probe() -> str | None:
    """Package present, CUDA present, importable (its binary matches this torch) and
    new enough for local attention (``window_size`` arrived in flash-attn 2.3)."""
    why = _base_probe()
    if why:
        return why
    import inspect

    try:
        from flash_attn import flash_attn_func
    except Exception as e:  # typically a binary built against another torch
        return f"flash_attn failed to import: {type(e).__name__}: {e}"
    if "window_size" not in inspect.signature(flash_attn_func).parameters:
        return "flash_attn_func has no window_size (needs flash-attn >= 2.3)"
    return None


def _check(q: torch.Tensor, pattern: Pattern) -> list[str]:
    D = q.shape[-1]
    if D > 256 or D % 8:
        return [f"head_dim={D}: FlashAttention needs head_dim <= 256 and a multiple of 8"]
    return []


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    fwd = B * H * n * (D * esize + 4)  # output + fp32 logsumexp
    bwd = B * H * n * (3 * D * esize + D * 4 + 4) if backward else 0  # dq, dk, dv, fp32 dq accumulator, delta
    return float(fwd + bwd)


@register(
    "flash_attn",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16),
    features=("causal", "asymmetric_window", "backward"),
    probe=_probe,
    check=_check,
    memory=_memory,
    native_gqa=True,
)
def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """FlashAttention 2 flash_attn_func with window_size=(left, right)

    q ``(B, H, n, D)``, k, v ``(B, H_kv, n, D)`` -> ``(B, H, n, D)`` through ``flash_attn_func``.
    """
    from flash_attn import flash_attn_func

    window = (pattern.left, pattern.right)  # (w/2, w/2), or (w, 0) causal
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=0.0,
        softmax_scale=scale,
        causal=pattern.causal,
        window_size=window,
    )  # (B, n, H, D)
    return out.transpose(1, 2)
