"""triton: fused FlashAttention-2 style kernels for the whole pattern (window,
dilation, per-head dilation, global tokens, causal) and per-sample key masks, forward
and backward.

    S = scale * Q K^T restricted to the pattern, never stored: each block of query rows
    streams only the key blocks that meet its window, then the global keys, keeping a
    running max m and sum l (online softmax, fp32); O = acc / l, and each row's (m, 1/l)
    is saved. Backward recomputes P = exp(S - m) / l: delta = rowsum(dO * O), then a dK/dV kernel
    and a dQ kernel (dS = P * (dP - delta)), as in Triton's fused-attention tutorial.

Work and memory O(n * (w + G)) per head: dilation is handled by addressing each residue
class with a stride of d tokens (no skipped key is visited), per-head dilation by one
launch per dilation group, global rows by their own kernels, a key mask by one flag
per (sample, key) that the kernels read with each block of keys (no mask: the flags
are None and the code is the one without). The kernels and their formulas are in
``impls/_triton_kernels.py``.

CPU tensors run in Triton's interpreter (numpy, slow: tests use small sizes); CUDA
tensors run compiled kernels, autotuned per head_dim and window for long sequences.
The call goes through the custom op ``torch.ops.attnbench.triton_longformer_fwd``
(with a fake implementation and a registered backward), so it composes with
``torch.compile``; it is the only path, eager or compiled.

Triton is imported only when a call runs: ``import attnbench.impls.triton_fused``
needs torch alone, and the probe names what is missing.
"""

import functools
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from attnbench import FEATURES, Pattern, register

# The constants the registry publishes (tunables=, built at import, without triton) and
# the kernel module's launch code shares: defined here only, imported by the kernels.
MAX_HEAD_DIM = 256
#: block sizes in the interpreter. Each interpreted op costs tens of microseconds of
#: Python whatever its size, so fewer, larger blocks run faster; 32 still gives several
#: blocks per class at test sizes (n ~ 100)
INTERPRETER_BLOCK = 32
#: on CUDA, sequences at least this long use the autotuned kernels; shorter ones use a
#: fixed config per head_dim, so that small problems do not pay for tuning
AUTOTUNE_MIN_SEQ = 4096


def block_d(head_dim: int) -> int:
    """Head dim as the kernels see it: the next power of two, at least 16 (tl.dot's
    minimum). The extra columns are masked loads of zeros, so q.k is unchanged and the
    scale stays the caller's (``1/sqrt(head_dim)`` of the real head_dim)."""
    return max(16, 1 << max(0, head_dim - 1).bit_length())


_KERNEL_FILE = Path(__file__).with_name("_triton_kernels.py")
_KERNEL_MODULES: dict[bool, ModuleType] = {}
_LOAD_LOCK = threading.Lock()
_LAST_MODULE: list[ModuleType] = []


def kernels(interpret: bool) -> ModuleType:
    """The kernel module, loaded once per mode under its own name.

    ``@triton.jit`` reads TRITON_INTERPRET when it decorates, so the module is executed
    with the variable set as wanted (then restored): ``interpret=True`` gives numpy
    kernels for CPU tensors, ``False`` compiled ones for CUDA; both can live in one
    process."""
    mod = _KERNEL_MODULES.get(interpret)
    if mod is not None:
        return mod
    with _LOAD_LOCK:
        mod = _KERNEL_MODULES.get(interpret)
        if mod is not None:
            return mod
        # triton itself first, under the process's own TRITON_INTERPRET: its standard
        # library (and gluon, which triton's launcher imports lazily and which checks
        # that mode) must not be decorated in the mode we set for our kernels only
        import triton
        import triton.language  # noqa: F401

        try:
            import triton.experimental.gluon  # noqa: F401
        except Exception:  # absent in older triton
            pass
        del triton
        name = f"{__package__}._triton_kernels_" + ("interpreted" if interpret else "compiled")
        spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
        mod = importlib.util.module_from_spec(spec)
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        if mod.INTERPRETED != interpret:  # pragma: no cover - a broken environment
            raise RuntimeError(f"triton kernels loaded with interpret={mod.INTERPRETED}, wanted {interpret}")
        _KERNEL_MODULES[interpret] = mod
        return mod


def _kernels_for(t: torch.Tensor) -> ModuleType:
    mod = kernels(t.device.type == "cpu")
    _LAST_MODULE[:] = [mod]
    return mod


def last_config() -> dict:
    """Block sizes (and warps, stages) used by the most recent call: the forward's
    ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_D`` (head_dim padded), ``BLOCK_G`` (global
    block), ``num_warps``, ``num_stages``, whether they were ``autotuned`` (on CUDA:
    the autotuner's best_config) or ``interpreted``, and under ``"backward"`` the same
    for the latest backward. Empty before the first call."""
    if not _LAST_MODULE:
        return {}
    cfg = dict(_LAST_MODULE[0].LAST_CONFIG)
    if "backward" in cfg:
        cfg["backward"] = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg["backward"].items()}
    return cfg


def _report() -> dict:
    return {"tunables": last_config()}


#: scalar and pointer types of the kernels' runtime arguments, for compile_ahead
_ARG_TYPES = {
    **{a: "i32" for a in ("n", "H", "KVH", "HG", "d", "lo", "hi", "G", "causal", "GQ", "accumulate", "n_tune")},
    **{a: "fp32" for a in ("scale", "scale_log2")},
    **{a: "*fp32" for a in ("STATS", "DELTA", "DK", "DV")},
    **{a: "*i32" for a in ("HEADS", "QHEADS", "QCNT", "GLOB", "DIL")},
    "ROW_GLOBAL": "*i8",
    "KEY_OK": "*i8",  # the key mask's flags; a constexpr None without one
}


def compile_ahead(
    name: str,
    dtype: str = "bf16",
    head_dim: int = 64,
    block_m: int = 64,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    arch: int = 90,
    block_g: int = 16,
    key_mask: bool = False,
):
    """Compile one kernel of ``impls/_triton_kernels.py`` (e.g. "_fwd_window_kernel")
    for CUDA compute capability ``arch`` without a GPU, through Triton's whole pipeline
    (ptxas included). Returns Triton's compiled kernel: ``.asm["ptx"]``,
    ``.asm["cubin"]``, ``.metadata.shared`` (bytes of shared memory). ``dtype`` is
    "bf16", "fp16" or "fp32" (whose dots are three TF32 products, as on a GPU).
    ``block_g`` is the global-key block (16 to 64 on CUDA, by the number of global tokens).
    ``key_mask``: the code of a call with a key mask (KEY_OK a pointer), else of one
    without (KEY_OK None, a constexpr, as a launch passes it).
    Pointers are marked 16-byte aligned, as Triton's launcher marks torch's
    allocations, so the code is what a launch would build. Raises ``OSError`` where
    Triton's CUDA toolchain cannot run, ``ImportError`` without its CUDA backend."""
    import triton
    import triton.backends.nvidia  # noqa: F401  (the CUDA backend, or ImportError)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = kernels(False)
    fn = getattr(kern, name)
    types = dict(_ARG_TYPES, **{p: "*" + dtype for p in ("Q", "K", "V", "O", "DO", "DQ")})
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_g,
                  DOT_PREC="tf32x3" if dtype == "fp32" else "tf32")  # fmt: skip
    if not key_mask:
        consts["KEY_OK"] = None
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    cx = {(fn.arg_names.index(a),): consts[a] for a in fn.arg_names if a in consts}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=aligned)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("attnbench::triton_longformer_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    left: int,
    right: int,
    dilation: list[int],
    causal: bool,
    global_tokens: list[int],
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(B, H, n, D)``, k, v ``(B, H_kv, n, D)`` (H_kv dividing H), the window
    ``(left, right)``, ``key_mask`` ``(B, n)`` bool (True = present) or None. Returns
    (out, stats): out ``(B, H, n, D)`` contiguous in the input dtype, stats ``(B, H, n,
    2)`` fp32 each row's largest score (base 2) and 1 / its sum of 2^(s - max) ((+inf,
    0) in rows the key mask leaves without keys).
    ``dilation`` has one entry per query head."""
    kern = _kernels_for(q)
    return kern.forward(
        q.contiguous(), k.contiguous(), v.contiguous(), tuple(dilation), left, right, causal, tuple(global_tokens),
        scale, key_mask,
    )  # fmt: skip


@_fwd_op.register_fake
def _fwd_fake(q, k, v, left, right, dilation, causal, global_tokens, scale, key_mask=None):
    B, H, n, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, torch.empty((B, H, n, 2), dtype=torch.float32, device=q.device)


@torch.library.custom_op("attnbench::triton_longformer_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    left: int,
    right: int,
    dilation: list[int],
    causal: bool,
    global_tokens: list[int],
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the input dtype; dk, dv ``(B, H_kv, n, D)`` like k, v
    (0 for keys the key mask removes)."""
    kern = _kernels_for(q)
    return kern.backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), stats.contiguous(),
        tuple(dilation), left, right, causal, tuple(global_tokens), scale, key_mask,
    )  # fmt: skip


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, stats, left, right, dilation, causal, global_tokens, scale, key_mask=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, left, right, dilation, causal, global_tokens, scale, key_mask = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats, key_mask)
    ctx.params = (left, right, dilation, causal, global_tokens, scale)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dout, _dlse):
    q, k, v, out, stats, key_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.attnbench.triton_longformer_bwd(dout, q, k, v, out, stats, *ctx.params, key_mask)
    return dq, dk, dv, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _op_args(q: torch.Tensor, pattern: Pattern, scale: float) -> tuple:
    dil = list(pattern.dilations(q.shape[1]))
    return pattern.left, pattern.right, dil, pattern.causal, list(pattern.global_tokens), float(scale)


# ---------------------------------------------------------------------------- registry
@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    try:
        import numpy  # noqa: F401  (the interpreter computes in numpy)
    except ImportError:
        return "needs the 'numpy' package (not installed)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs the 'triton' package (not installed)"
    except Exception as e:  # a broken install is a reason, not a crash
        return f"triton failed to import: {type(e).__name__}: {e}"
    try:
        import triton.language  # noqa: F401
        import triton.runtime.interpreter  # noqa: F401
    except Exception as e:
        return f"triton failed to import: {type(e).__name__}: {e}"
    return None


def _check(q: torch.Tensor, pattern: Pattern) -> list[str]:
    B, H, n, D = q.shape
    reasons = []
    if D > MAX_HEAD_DIM:
        reasons.append(f"head_dim={D} not supported (at most {MAX_HEAD_DIM})")
    if B * H > 65535:
        reasons.append(f"batch*heads={B * H} exceeds the grid limit 65535")
    if n * block_d(D) >= 2**31:
        reasons.append(f"seq_len*head_dim={n * block_d(D)} overflows the kernels' int32 offsets within a head")
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device)[0] < 8:
        reasons.append("bf16 needs a GPU of compute capability >= 8.0")
    return reasons


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    io = B * H * n * D * esize
    rows = B * H * n * 4  # one fp32 per row: delta
    fwd = io + 2 * rows + n  # out, the row statistics (m, 1/l), the global-row flags
    if not backward:
        return float(fwd)
    dkv = 2 * B * H * n * D * (4 + esize) if pattern.global_tokens else 2 * io  # fp32 buffers, then cast
    return float(fwd + rows + io + dkv + io)  # + delta, dq, dk/dv, a contiguous dO


@register(
    "triton",
    devices=("cpu", "cuda"),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    features=FEATURES,
    probe=_probe,
    check=_check,
    memory=_memory,
    slow_on_cpu=True,
    interpreted_on_cpu=True,
    report=_report,
    native_gqa=True,
    tunables={
        "interpreter_block": INTERPRETER_BLOCK,
        "autotune_min_seq": AUTOTUNE_MIN_SEQ,
        "autotune_key": "head_dim, window, dilation, n (next power of two)",
        "max_head_dim": MAX_HEAD_DIM,
    },
)
def triton_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """fused Triton kernels, FlashAttention-2 style over window + global keys (interpreted on CPU)"""
    out, _ = torch.ops.attnbench.triton_longformer_fwd(q, k, v, *_op_args(q, pattern, scale), key_mask)
    return out
