"""Compiling Triton's kernels ahead, in parallel, for the jobs gpu_check will measure.

What a job launches is learned from the launch code itself: the ``triton``
implementation is called (forward, and backward for the training modes) on empty CPU
tensors of the job's shape, with every kernel of the compiled kernel module
(``impls/_triton_kernels.py``) replaced by a recorder. So each recorded launch carries
the arguments, constexprs, warps and stages a CUDA call would pass, and an autotuned
launch stands for every config its pruning keeps (the autotuner benchmarks, so
compiles, each of them). Nothing runs; the recording takes milliseconds.

Each distinct launch is then compiled in a pool of processes through
``JITFunction.warmup`` (Triton's own way to a compiled kernel without a launch), for
the GPU's architecture, with a driver that only names that target: no GPU is needed,
and the binary lands in Triton's on-disk cache under the key a launch looks up, so the
measured job finds it there instead of compiling.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable, Iterator
from unittest import mock

import torch

from .config import BenchConfig

__all__ = ["Compile", "triton_compiles", "compile_one"]


@dataclasses.dataclass(frozen=True)
class Compile:
    """One kernel binary to build. ``kernel``: its name in the compiled kernel module;
    ``args``: its positional arguments with each tensor replaced by its dtype (Triton's
    MockTensor stands in: a dtype and an aligned address, which is all a compile
    reads); ``kwargs``: (name, value) pairs (constexprs, num_warps, num_stages, ...);
    ``dtype`` and ``head_dim``: of the job it is compiled for."""

    kernel: str
    args: tuple
    kwargs: tuple
    dtype: str
    head_dim: int

    @property
    def group(self) -> str:
        return f"{self.dtype} D={self.head_dim}"

    def key(self, no_spec: frozenset[int]) -> tuple:
        """What makes two compiles one binary: the arguments a kernel does not
        specialise on (``no_spec``: their positions) count by type only."""
        args = tuple(type(a).__name__ if i in no_spec else a for i, a in enumerate(self.args))
        return self.kernel, args, self.kwargs


def _kernel_module():
    from .impls import triton_fused

    return triton_fused, triton_fused.kernels(False)


class _Recorder:
    """Stands in for one kernel (a JITFunction or an Autotuner) of the kernel module:
    ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, target, out: list):
        self.target, self.out = target, out
        self.best_config = None

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        import triton

        t = self.target
        if isinstance(t, triton.runtime.Autotuner):
            t.nargs = dict(zip(t.arg_names, args))  # as Autotuner.warmup does before pruning
            try:
                configs = t.prune_configs(kwargs)
            finally:
                t.nargs = None
            self.best_config = configs[0]
            fn = t.fn
            self.out += [(fn, args, {**kwargs, **cfg.all_kwargs()}) for cfg in configs]
        else:
            self.out.append((t, args, kwargs))


def _record(c: BenchConfig) -> list[tuple]:
    """(JITFunction, args, kwargs) of every launch a CUDA call of ``c`` makes."""
    import triton

    from .reference import default_scale
    from .registry import get_impl

    tf, kern = _kernel_module()
    out: list[tuple] = []
    kernels = {
        n: o for n, o in vars(kern).items() if isinstance(o, (triton.runtime.JITFunction, triton.runtime.Autotuner))
    }
    recorders = {n: _Recorder(o, out) for n, o in kernels.items()}
    grad = c.mode != "fwd"
    kv_heads = c.kv_heads or c.heads
    # batch 1: no kernel is specialised on it; empty tensors: nothing is touched
    q = torch.empty(1, c.heads, c.seq_len, c.head_dim, dtype=c.torch_dtype())
    k, v = (torch.empty(1, kv_heads, c.seq_len, c.head_dim, dtype=c.torch_dtype()) for _ in range(2))
    with mock.patch.multiple(kern, **recorders), mock.patch.object(tf, "_kernels_for", lambda t: kern):
        with torch.set_grad_enabled(grad):
            q, k, v = (t.requires_grad_(grad) for t in (q, k, v))
            o = get_impl("triton").fn(q, k, v, c.pattern(), default_scale(c.head_dim))
            if grad:
                o.backward(torch.empty_like(o))
    return out


def _portable(a):
    return a.dtype if isinstance(a, torch.Tensor) else a


def triton_compiles(configs: Iterable[BenchConfig]) -> Iterator[Compile]:
    """Every distinct kernel binary the ``triton`` jobs among ``configs`` will need on
    CUDA, in first-needed order, each as soon as it is known."""
    seen = set()
    for c in configs:
        if c.impl != "triton":
            continue
        for fn, args, kwargs in _record(c):
            portable = tuple(_portable(a) for a in args)
            task = Compile(fn.__name__, portable, tuple(sorted(kwargs.items())), c.dtype, c.head_dim)
            key = task.key(_no_spec(fn))
            if key not in seen:
                seen.add(key)
                yield task


def _no_spec(fn) -> frozenset[int]:
    return frozenset(p.num for p in fn.params if p.do_not_specialize)


class _TargetOnly:
    """A Triton driver that only names the target: enough to compile, never to launch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


@functools.cache
def _compile_for(arch: int) -> None:
    from triton.runtime.driver import driver

    driver.set_active(_TargetOnly(arch))


def compile_one(task: Compile, arch: int = 90) -> float:
    """Build ``task`` for CUDA compute capability ``arch`` (90: H100, H200) into
    Triton's cache, in this process (a pool's child: its Triton driver is replaced);
    the seconds it took (about 0 when the cache had it)."""
    _compile_for(arch)
    _, kern = _kernel_module()
    t0 = time.perf_counter()
    getattr(kern, task.kernel).warmup(*task.args, grid=(1,), **dict(task.kwargs))
    return time.perf_counter() - t0
