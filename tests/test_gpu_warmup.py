"""The warm-up's list of Triton compiles, recorded from the launch code, and one real
compile for sm90 that a launch then finds in Triton's cache (no GPU needed)."""

from __future__ import annotations

import os
import time

import pytest

from attnbench.children import run_pool
from attnbench.config import BenchConfig


def _tasks(**kw):
    from attnbench.gpu_warmup import triton_compiles

    c = BenchConfig(
        impl="triton", seq_len=8192, heads=4, head_dim=64, dtype="bf16", mode="fwd_bwd", device="cuda", **kw
    )
    return list(triton_compiles([c]))


def test_the_warmup_lists_what_the_launch_code_compiles():
    """Recorded from the launch code: every kernel of a training step with global
    tokens, each autotuned kernel once per config its pruning keeps, and the
    arguments' real dtypes (without global tokens dK and dV are the inputs' dtype,
    with them fp32 buffers: two different binaries)."""
    pytest.importorskip("triton")
    import torch
    from attnbench.impls import triton_fused as tf

    kern = tf.kernels(False)
    tasks = _tasks(global_tokens=[0, 100])
    names = {t.kernel for t in tasks}
    assert names == {"_fwd_window_kernel", "_fwd_global_rows_kernel", "_bwd_delta_kernel", "_bwd_kv_window_kernel",
                     "_bwd_q_window_kernel", "_bwd_kv_global_keys_kernel", "_bwd_q_global_rows_kernel"}  # fmt: skip
    tuned = kern._fwd_window_tuned
    q = torch.empty(0, dtype=torch.bfloat16)
    kept = kern._prune(tuned.configs, {"Q": q}, kind="fwd", BLOCK_D=64, BLOCK_G=16)
    fwd = [dict(t.kwargs) for t in tasks if t.kernel == "_fwd_window_kernel"]
    assert sorted((k["BLOCK_M"], k["BLOCK_N"], k["num_warps"], k["num_stages"]) for k in fwd) == sorted(
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept)  # fmt: skip
    dk = kern._bwd_kv_window_kernel.arg_names.index("DK")

    def dk_dtypes(tasks):
        return {t.args[dk] for t in tasks if t.kernel == "_bwd_kv_window_kernel"}

    assert dk_dtypes(tasks) == {torch.float32} and dk_dtypes(_tasks()) == {torch.bfloat16}
    assert len({(t.kernel, t.args, t.kwargs) for t in tasks}) == len(tasks)


def test_a_warmed_kernel_is_what_a_launch_finds(tmp_path, monkeypatch):
    """One real compile for sm90 (the backward's smallest kernel) as the warm-up makes
    it, in a child; then the same kernel reached as a launch reaches it, with real
    tensors: Triton's on-disk cache already holds it (no new file)."""
    pytest.importorskip("triton.backends.nvidia", reason="no CUDA backend in this triton")
    task = next(t for t in _tasks() if t.kernel == "_bwd_delta_kernel")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    ((_, got, _),) = run_pool(compile_then_reach, [task], 1, time.time() + 240)
    if isinstance(got, OSError):  # pragma: no cover - the toolchain, not the warm-up
        pytest.skip(f"Triton's CUDA toolchain cannot run here: {got}")
    assert not isinstance(got, Exception), got
    after_warmup, after_launch = got
    assert after_warmup > 0 and after_launch == after_warmup


def compile_then_reach(task) -> tuple[int, int]:
    """In a child: build ``task`` for sm90 as the warm-up does, then reach the same
    kernel by the path a launch takes, with real (CPU) tensors for arguments; the
    number of files in Triton's cache after each (equal: the warm-up's binary was
    found)."""
    import torch

    from attnbench.gpu_warmup import _kernel_module, compile_one

    def files() -> int:
        return sum(len(f) for _, _, f in os.walk(os.environ["TRITON_CACHE_DIR"]))

    compile_one(task, 90)
    after_warmup = files()
    _, kern = _kernel_module()
    fn = getattr(kern, task.kernel)
    fn.device_caches.clear()  # forget this process's copy: only the on-disk cache can answer
    args = [torch.empty(16, dtype=a) if isinstance(a, torch.dtype) else a for a in task.args]
    fn.warmup(*args, grid=(1,), **dict(task.kwargs))
    return after_warmup, files()
