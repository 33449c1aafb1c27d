"""cupy: raw CUDA banded kernels launched through CuPy, in the style of Longformer's
``diagonaled_mm`` custom kernel (three banded products; the backward pass reuses them).

With window offsets c - off (off = left), band width W = left + right + 1 and the
head's dilation d, column c of query row i is the key ``i + d*(c - off)``. The kernels
in ``_banded.cu`` (compiled once with NVRTC through ``cupy.RawModule``) compute

    S  = band(scale * Q K^T)       band_qk   (B, H, n, W) float32, -inf where no key
    O  = P V                       band_av   P the band probabilities
    dP = band(dO V^T)              band_qk   (0 where no key)
    dQ = scale * dS K              band_av
    dK = scale * dS^T Q            band_tv   the transposed band
    dV = P^T dO                    band_tv

with ``dS = P * (dP - rowsum(P * dP))`` and the softmax in PyTorch float32; the kernels
accumulate in float32 for fp32, fp16 and bf16 inputs. rowsum(P * dP) equals
``dO . O`` row by row (O = P V before rounding), which is how it is computed: the
float32 O is kept, so no second band-sized temporary is needed.

Global tokens, as ``chunked`` and Hugging Face do: the global keys' scores (B, H, n, G)
come from a torch matmul and are joined to the band under one softmax (the kernel
writes the band into the first W columns of a (B, H, n, W + G) buffer and skips the
global keys inside the band, so nothing is counted twice); global query rows are
recomputed as dense attention over all keys in torch.

All memory is allocated by PyTorch and handed to the kernels by pointer, and kernels
run on PyTorch's current stream, so ``torch.cuda.max_memory_allocated`` sees
everything. Memory is O(n * (w + G)): two float32 bands at the peak.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from attnbench import FEATURES, Pattern, register
from attnbench.ops import global_index, index_tensor

SOURCE = Path(__file__).with_name("_banded.cu")

# Must match the #defines in _banded.cu.
BLOCK = (16, 16, 1)
TILE = 64  # class indices per block
QK_COLS = 64  # band columns per band_qk block
MV_D = 64  # head dims per band_av / band_tv block
MAX_GRID_YZ = 65535

C_TYPES = {torch.float32: "float", torch.float16: "half_t", torch.bfloat16: "bf16_t"}
COMPILE_OPTIONS = ("--std=c++14",)

#: A launcher runs one kernel: ``launch(name, grid, args, device)`` with ``name`` a
#: name expression (e.g. ``"band_qk<float>"``) and ``args`` a list of ``(kind, value)``
#: with kind "p" (device pointer), "i" (int32) or "f" (float32).
Launcher = Callable[[str, tuple[int, int, int], list[tuple[str, float]], torch.device], None]


def kernel_name(kind: str, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> str:
    """The name expression of one kernel instantiation, e.g. ``band_av<half_t, float>``."""
    if kind == "band_qk":
        return f"band_qk<{C_TYPES[dtype]}>"
    return f"{kind}<{C_TYPES[dtype]}, {C_TYPES[out_dtype or dtype]}>"


def name_expressions() -> tuple[str, ...]:
    """Every instantiation the module launches (compiled together, once)."""
    names: list[str] = []
    for dt in C_TYPES:
        names.append(kernel_name("band_qk", dt))
        names.append(kernel_name("band_av", dt, torch.float32))  # forward O in float32
        names.append(kernel_name("band_av", dt, dt))  # dQ
        names.append(kernel_name("band_tv", dt, dt))  # dK, dV
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _cupy_problem() -> str | None:
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return "the 'cupy' package is not installed"
    try:
        import cupy  # noqa: F401
    except Exception as e:  # a broken install (e.g. a CUDA version mismatch)
        return f"importing cupy failed: {type(e).__name__}: {e}"
    return None


def _probe() -> str | None:
    why = _cupy_problem()
    if why is None and not torch.cuda.is_available():
        why = "no CUDA device found"
    return f"needs CuPy and a CUDA device ({why})" if why else None


def _check(q: torch.Tensor, pattern: Pattern) -> list[str]:
    B, H, n, D = q.shape
    if B * H > MAX_GRID_YZ:
        return [f"batch*heads={B * H} exceeds {MAX_GRID_YZ} (one CUDA grid row per batch and head)"]
    return []


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    W = pattern.span + 1
    G = len(pattern.global_tokens)
    band = 4.0 * B * H * n * (W + G)  # float32 scores / probabilities / gradients
    rows = B * H * n * D
    # float32 O + output; global columns (B,H,n,G) and dense global rows (B,H,G,n)
    extra = rows * (4 + esize) + B * H * n * G * (esize + 8) + B * H * G * n * (esize + 8)
    if backward:  # P saved + dP/dS; dQ, dK, dV, dO in float32 for the rowsum
        return 2 * band + extra + rows * (3 * esize + 8)
    return 2 * band + extra


# ---------------------------------------------------------------- the CuPy launcher


class CupyLauncher:
    """Compiles ``_banded.cu`` once (``cupy.RawModule``, NVRTC) and launches its
    kernels on PyTorch's current stream with raw pointers to torch tensors."""

    def __init__(self) -> None:
        self._module = None
        self._kernels: dict[str, object] = {}

    def _kernel(self, name: str):
        kern = self._kernels.get(name)
        if kern is not None:
            return kern
        import cupy

        if self._module is None:
            self._module = cupy.RawModule(
                code=SOURCE.read_text(), options=COMPILE_OPTIONS, name_expressions=name_expressions()
            )
        try:
            kern = self._module.get_function(name)  # compiles the module on first use
        except Exception as e:  # cupy.cuda.compiler.CompileException carries the log
            log = e.get_message() if hasattr(e, "get_message") else str(e)
            raise RuntimeError(f"compiling {SOURCE.name} for {name!r} failed:\n{log}") from e
        self._kernels[name] = kern
        return kern

    def __call__(
        self, name: str, grid: tuple[int, int, int], args: list[tuple[str, float]], device: torch.device
    ) -> None:
        import cupy
        import numpy as np

        conv = {"p": np.uint64, "i": np.int32, "f": np.float32}
        packed = tuple(conv[kind](value) for kind, value in args)
        with cupy.cuda.Device(device.index):
            kern = self._kernel(name)
            with _cupy_stream(cupy, torch.cuda.current_stream(device), device):
                kern(grid, BLOCK, packed)


def _cupy_stream(cupy, stream: torch.cuda.Stream, device: torch.device):
    """PyTorch's stream as a CuPy stream (a context manager making it CuPy's current one)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)  # CuPy >= 14
    if from_external is not None and hasattr(stream, "__cuda_stream__"):
        return from_external(stream)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)


@functools.lru_cache(maxsize=1)
def _cupy_launcher() -> CupyLauncher:
    return CupyLauncher()


# ---------------------------------------------------------------- banded products


@dataclass(frozen=True)
class Band:
    """The band's geometry for one call."""

    dils: tuple[int, ...]  # per-head dilation
    dil_t: torch.Tensor  # (H,) int32 on the device
    skip: torch.Tensor | None  # (n,) uint8, 1 at keys kept out of the band (global keys)
    off: int  # column of offset 0: w/2, or w when causal
    width: int  # W = w + 1


def _rows_grid(n: int, dils: Sequence[int]) -> int:
    # blocks enumerate (class, tile): d classes of at most ceil(n/d) class indices
    return max(d * math.ceil(math.ceil(n / d) / TILE) for d in set(dils))


def _ptr(t: torch.Tensor | None) -> tuple[str, int]:
    return ("p", 0 if t is None else t.data_ptr())


def band_qk(
    launch: Launcher,
    a: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    band: Band,
    alpha: float,
    fill: float,
    skip: bool,
) -> None:
    """``out[..., i, c] = alpha * a_i . x_key(i,c)`` for c < W (``fill`` where no key).
    a, x: (B, H, n, D) contiguous; out: (B, H, n, ld) float32 contiguous, ld >= W."""
    B, H, n, D = a.shape
    grid = (_rows_grid(n, band.dils), math.ceil(band.width / QK_COLS), B * H)
    args = [_ptr(a), _ptr(x), _ptr(out), _ptr(band.dil_t), _ptr(band.skip if skip else None)]
    args += [("i", H), ("i", n), ("i", D), ("i", band.width), ("i", band.off), ("i", out.shape[-1])]
    args += [("f", alpha), ("f", fill)]
    launch(kernel_name("band_qk", a.dtype), grid, args, a.device)


def band_mv(
    launch: Launcher,
    kind: str,
    p: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    band: Band,
    alpha: float,
) -> None:
    """``kind="band_av"``: ``out_i = alpha * sum_c p[i, c] x_key(i,c)``;
    ``kind="band_tv"``: ``out_j = alpha * sum_c p[row(j,c), c] x_row(j,c)`` (transposed band).
    p: (B, H, n, ld) float32 contiguous (band in its first W columns); x: (B, H, n, D)
    contiguous; out: (B, H, n, D) contiguous, float32 or x's dtype."""
    B, H, n, D = x.shape
    grid = (_rows_grid(n, band.dils), math.ceil(D / MV_D), B * H)
    args = [_ptr(p), _ptr(x), _ptr(out), _ptr(band.dil_t)]
    args += [("i", H), ("i", n), ("i", D), ("i", band.width), ("i", band.off), ("i", p.shape[-1])]
    args += [("f", alpha)]
    launch(kernel_name(kind, x.dtype, out.dtype), grid, args, x.device)


class _BandAttention(torch.autograd.Function):
    """Band rows of the attention (every query row; global rows are overwritten later):
    softmax over the band joined with the global-key columns ``sg``."""

    @staticmethod
    def forward(ctx, q, k, v, sg, vg, band: Band, scale: float, launch: Launcher):
        B, H, n, D = q.shape
        W = band.width
        G = 0 if sg is None else sg.shape[-1]
        s = torch.empty(B, H, n, W + G, dtype=torch.float32, device=q.device)
        band_qk(launch, q, k, s, band, scale, float("-inf"), skip=G > 0)
        if G:
            s[..., W:] = sg
        p = torch.softmax(s, dim=-1)  # every row keeps a finite entry: its own key
        del s
        o = torch.empty(B, H, n, D, dtype=torch.float32, device=q.device)
        band_mv(launch, "band_av", p, v, o, band, 1.0)
        if G:
            o += torch.matmul(p[..., W:], vg.float())  # (B,H,n,G) @ (B,H,G,D)
        ctx.save_for_backward(q, k, v, vg, p, o)
        ctx.band, ctx.scale, ctx.launch, ctx.G = band, scale, launch, G
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        q, k, v, vg, p, o = ctx.saved_tensors
        band, scale, launch, G = ctx.band, ctx.scale, ctx.launch, ctx.G
        W = band.width
        g = g.contiguous()
        need_q, need_k, need_v, need_sg, need_vg = ctx.needs_input_grad[:5]
        dq = dk = dv = dsg = dvg = None
        if need_v:
            dv = torch.empty_like(v)
            band_mv(launch, "band_tv", p, g, dv, band, 1.0)  # dV = P^T dO
        if G and need_vg:
            dvg = torch.matmul(p[..., W:].transpose(-1, -2), g.float()).to(vg.dtype)
        if need_q or need_k or need_sg:
            dp = torch.empty_like(p)
            band_qk(launch, g, v, dp, band, 1.0, 0.0, skip=False)  # dP = band(dO V^T)
            if G:
                dp[..., W:] = torch.matmul(g.float(), vg.float().transpose(-1, -2))
            delta = (g.float() * o).sum(-1, keepdim=True)  # rowsum(P * dP) = dO . O
            ds = dp.sub_(delta).mul_(p)  # dS = P * (dP - delta), in place
            if need_q:
                dq = torch.empty_like(q)
                band_mv(launch, "band_av", ds, k, dq, band, scale)  # dQ = scale dS K
            if need_k:
                dk = torch.empty_like(k)
                band_mv(launch, "band_tv", ds, q, dk, band, scale)  # dK = scale dS^T Q
            if G and need_sg:
                dsg = ds[..., W:]
        return dq, dk, dv, dsg, dvg, None, None, None


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float, launch: Launcher
) -> torch.Tensor:
    """The whole pattern with the banded kernels run by ``launch``."""
    B, H, n, D = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lo, hi = pattern.offset_range
    dils = pattern.dilations(H)
    glob = global_index(pattern, q.device)  # (G,)
    G = glob.numel()
    sg = vg = skip = None
    if G:
        skip = torch.zeros(n, dtype=torch.uint8, device=q.device)
        skip[glob] = 1
        kg, vg = k.index_select(2, glob), v.index_select(2, glob)  # (B, H, G, D)
        sg = (torch.matmul(q, kg.transpose(-1, -2)) * scale).float()  # (B, H, n, G)
        if pattern.causal:
            later = glob.view(1, -1) > torch.arange(n, device=q.device).view(-1, 1)  # (n, G)
            sg = sg.masked_fill(later, float("-inf"))
    band = Band(
        dils=dils,
        dil_t=index_tensor(tuple(dils), torch.int32, q.device),
        skip=skip,
        off=-lo,
        width=hi - lo + 1,
    )
    out = _BandAttention.apply(q, k, v, sg, vg, band, scale, launch)
    if G:
        # global rows attend to every key (j <= g when causal): dense (B, H, G, n)
        sr = (torch.matmul(q.index_select(2, glob), k.transpose(-1, -2)) * scale).float()
        if pattern.causal:
            sr = sr.masked_fill(torch.arange(n, device=q.device).view(1, -1) > glob.view(-1, 1), float("-inf"))
        og = torch.matmul(torch.softmax(sr, dim=-1).to(v.dtype), v)  # (B, H, G, D)
        out = out.index_copy(2, glob, og)
    return out


@register(
    "cupy",
    devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    features=tuple(f for f in FEATURES if f != "key_mask"),  # one mask for every sample
    probe=_probe,
    check=_check,
    memory=_memory,
    tunables={"tile": TILE, "qk_cols": QK_COLS, "mv_cols": 32, "mv_dims": MV_D, "block": "16x16"},
)
def cupy_banded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """raw CUDA banded kernels via CuPy (Longformer diagonaled_mm style), fp32 accumulation"""
    return banded_attention(q, k, v, pattern, scale, _cupy_launcher())
