"""Small helpers shared by implementations (implementations never import each other)."""

from __future__ import annotations

import functools

import torch

from .pattern import Pattern

__all__ = [
    "repeat_kv",
    "head_groups",
    "gather_heads",
    "scatter_heads",
    "index_tensor",
    "global_index",
    "cuda_probe",
    "module_probe",
]


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated for grouped-query attention: ``(B, H_kv, n, D)`` ->
    ``(B, heads, n, D)``, query head ``h`` reading key/value head ``h // (heads // H_kv)``
    (the convention of Hugging Face's ``repeat_kv`` and FlashAttention). Differentiable:
    the gradient sums over each group. ``x`` itself when H_kv == heads."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def head_groups(pattern: Pattern, heads: int) -> list[tuple[int, list[int]]]:
    """Heads grouped by dilation: ``[(d, [head indices]), ...]`` in order of first use."""
    groups: dict[int, list[int]] = {}
    for h, d in enumerate(pattern.dilations(heads)):
        groups.setdefault(d, []).append(h)
    return list(groups.items())


def gather_heads(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x[:, idx]`` without a copy when idx covers every head in order."""
    if idx == list(range(x.shape[1])):
        return x
    return x.index_select(1, index_tensor(tuple(idx), torch.long, x.device))


def scatter_heads(parts: list[tuple[list[int], torch.Tensor]], heads: int) -> torch.Tensor:
    """Inverse of :func:`gather_heads` over groups: concatenate along heads and
    restore the original head order (differentiable)."""
    if len(parts) == 1:
        return parts[0][1]
    order = [h for idx, _ in parts for h in idx]
    cat = torch.cat([t for _, t in parts], dim=1)
    inv = [0] * heads
    for i, h in enumerate(order):
        inv[h] = i
    return cat.index_select(1, index_tensor(tuple(inv), torch.long, cat.device))


@functools.lru_cache(maxsize=64)
def index_tensor(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on ``device``, made once per process: a copy from pageable
    host memory in every call would be timed with the call. Do not modify it."""
    return torch.tensor(values, dtype=dtype, device=device)


def global_index(pattern: Pattern, device: torch.device | str) -> torch.Tensor:
    """Global token positions as a long tensor ``(G,)`` (cached: do not modify)."""
    return index_tensor(tuple(pattern.global_tokens), torch.long, torch.device(device))


def module_probe(*modules: str):
    """An availability probe: a reason naming the first missing package, or None."""

    def probe() -> str | None:
        import importlib.util

        for m in modules:
            if importlib.util.find_spec(m) is None:
                return f"needs the '{m}' package (not installed)"
        return None

    return probe


def cuda_probe(*modules: str):
    """Probe: the packages are importable and a CUDA device is present."""
    pkg = module_probe(*modules)

    def probe() -> str | None:
        why = pkg()
        if why:
            return why
        if not torch.cuda.is_available():
            return "needs a CUDA device (none found)"
        return None

    return probe
