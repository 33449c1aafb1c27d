"""The ecosystem baselines (flex, sdpa, flash_attn, hf_longformer) against the float64
reference, and their refusals.

Tolerance: the verification policy (attnbench.verify), as everywhere. Unavailable
baselines are skipped with their probe's reason. FlexAttention compiles each new
shape and dtype (seconds on a CPU), so its cases share one shape.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_grads_ok, assert_output_ok, impl_or_skip, rand_qkv
from fresh_python import run_fresh

import attnbench
from attnbench import Pattern, UnsupportedError


def _check_forward(impl: str, shape: tuple[int, int, int, int], p: Pattern, dtype: torch.dtype, scale=None) -> None:
    q, k, v = rand_qkv(*shape, dtype)
    out = attnbench.attention(q, k, v, p, impl=impl, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_output_ok(out, q, k, v, p, f"{impl} {p.describe()} {tuple(shape)} {dtype}", scale)


def _check_backward(impl: str, shape: tuple[int, int, int, int], p: Pattern, dtype: torch.dtype) -> None:
    q, k, v = rand_qkv(*shape, dtype)
    assert_grads_ok(lambda *x: attnbench.attention(*x, p, impl=impl), q, k, v, p, f"{impl} {p.describe()} {dtype}")


def _refused(impl: str, q: torch.Tensor, p: Pattern, *fragments: str) -> None:
    """The call raises UnsupportedError whose reasons contain every fragment."""
    with pytest.raises(UnsupportedError) as info:
        attnbench.attention(q, q, q, p, impl=impl)
    text = "; ".join(info.value.reasons)
    for f in fragments:
        assert f in text, f"{impl}: expected a reason containing {f!r}, got: {text}"


# ---------------------------------------------------------------------------- flex
FLEX_SHAPE = (1, 2, 97, 16)  # one compiled shape for every pattern (ragged: 97 < 128)
FLEX_PATTERNS = [
    Pattern(8),
    Pattern(10, 3, True, (0, 60)),
    Pattern(6, (1, 2), False, (50, 96)),
    Pattern(256, global_tokens=(5,)),
]


@pytest.mark.parametrize("p", FLEX_PATTERNS, ids=lambda p: p.describe())
def test_flex_forward(p: Pattern) -> None:
    impl_or_skip("flex")
    _check_forward("flex", FLEX_SHAPE, p, torch.float32, scale=0.3)


def test_flex_forward_bf16_and_mask_cache() -> None:
    impl_or_skip("flex")
    import attnbench.impls.flex as flex

    p = Pattern(6, 2, False, (0, 40))
    flex.clear_cache()
    _check_forward("flex", FLEX_SHAPE, p, torch.bfloat16)
    assert flex.last_timing["cached"] is False and flex.last_timing["block_mask_ms"] > 0
    _check_forward("flex", FLEX_SHAPE, p, torch.bfloat16)
    assert flex.last_timing == {"block_mask_ms": 0.0, "cached": True}
    assert attnbench.get_impl("flex").last_call()["setup_ms"] == 0.0  # what a result row records


def test_flex_refuses_the_cpu_shapes_pytorch_gets_wrong() -> None:
    """The shapes where PyTorch's compiled CPU kernel is wrong (see impls/flex.py) are
    refused, their neighbours are not."""
    impl_or_skip("flex")
    if DEVICE != "cpu":
        pytest.skip("a bug of the CPU kernel")
    for n in (8, 40, 120):
        _refused("flex", torch.empty(1, 1, n, 16), Pattern(16), f"head_dim=16, seq_len={n}")
    for n, d in ((136, 16), (40, 24), (48, 16)):
        assert not attnbench.get_impl("flex").check(torch.empty(1, 1, n, d), Pattern(16)), (n, d)


_FLEX_CPU_BUG = """
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from attnbench import Pattern
from attnbench.verify import check_output
torch.manual_seed(0)
q, k, v = (torch.randn(1, 1, 40, 16) for _ in range(3))
near = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 8
bm = create_block_mask(near, None, None, 40, 40, device="cpu")
run = torch.compile(flex_attention, dynamic=False)
with torch.no_grad():
    for i in range(20):
        verdict = check_output(run(q, k, v, block_mask=bm, scale=0.25), q, k, v, Pattern(16), 0.25)
        if not verdict.ok:
            break
print(i + 1, verdict.ok, verdict)
"""


@pytest.mark.full
def test_flex_cpu_bug_still_reproduces() -> None:
    """The refusal stands on a live reproduction. Whether the kernel goes wrong is decided
    per process (all 20 calls wrong, or all right; about half of fresh interpreters go
    wrong), so it runs in up to 10 fresh interpreters. When a PyTorch release fixes the
    kernel this fails, and the refusal can go."""
    impl_or_skip("flex")
    if DEVICE != "cpu":
        pytest.skip("a bug of the CPU kernel")
    for _ in range(10):
        _calls, ok, verdict = run_fresh(_FLEX_CPU_BUG).split(" ", 2)
        if ok == "False":
            return
    pytest.fail(f"PyTorch {torch.__version__} got this right in 10 interpreters: lift the refusal ({verdict})")


def test_flex_backward() -> None:
    impl_or_skip("flex")
    p = Pattern(6, 2, True, (0, 50))
    if DEVICE == "cpu":
        q, k, v = rand_qkv(*FLEX_SHAPE, torch.float32, requires_grad=True)
        _refused("flex", q, p, "inference-only; backward needs CUDA")
        # k alone requiring grad is refused too (check() sees only q)
        with pytest.raises(UnsupportedError, match="inference-only"):
            attnbench.attention(q.detach(), k, v.detach(), p, impl="flex")
        with torch.no_grad():  # inference on inputs that require grad is fine
            out = attnbench.attention(q, k, v, p, impl="flex", scale=0.3)  # scale as above: no recompilation
        assert_output_ok(out, q, k, v, p, "flex no_grad on inputs requiring grad", scale=0.3)
    else:
        _check_backward("flex", FLEX_SHAPE, p, torch.float32)


def test_flex_refuses_fp64() -> None:
    impl_or_skip("flex")
    q, _, _ = rand_qkv(1, 1, 8, 16, torch.float64)
    _refused("flex", q, Pattern(2), "dtype fp64 not supported")


# ---------------------------------------------------------------------------- sdpa
SDPA_CASES = [
    ((1, 2, 97, 16), Pattern(8)),
    ((2, 4, 61, 32), Pattern(4, (1, 2, 3, 1), True, (5, 60))),
    ((1, 2, 50, 8), Pattern(6, 3, False, (0, 25, 49))),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, p", SDPA_CASES, ids=[p.describe() for _, p in SDPA_CASES])
def test_sdpa_forward(shape, p: Pattern, dtype: torch.dtype) -> None:
    impl_or_skip("sdpa")
    _check_forward("sdpa", shape, p, dtype, scale=0.2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sdpa_backward(dtype: torch.dtype) -> None:
    impl_or_skip("sdpa")
    shape, p = SDPA_CASES[1]
    _check_backward("sdpa", shape, p, dtype)


# ---------------------------------------------------------------------- hf_longformer
HF_CASES = [
    ((1, 2, 96, 16), Pattern(8)),  # n a multiple of w: no padding
    ((2, 2, 97, 16), Pattern(8, global_tokens=(0, 50, 96))),  # padded to 104
    ((1, 3, 5, 16), Pattern(16, global_tokens=(2,))),  # n < w
    ((1, 2, 40, 32), Pattern(4, global_tokens=range(0, 40, 3))),  # many globals
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, p", HF_CASES, ids=[p.describe() for _, p in HF_CASES])
def test_hf_longformer_forward(shape, p: Pattern, dtype: torch.dtype) -> None:
    impl_or_skip("hf_longformer")
    _check_forward("hf_longformer", shape, p, dtype, scale=0.4)


def test_hf_longformer_backward() -> None:
    impl_or_skip("hf_longformer")
    shape, p = HF_CASES[1]
    _check_backward("hf_longformer", shape, p, torch.float32)


def test_hf_longformer_refusals() -> None:
    impl_or_skip("hf_longformer")
    q, _, _ = rand_qkv(1, 2, 32, 16, torch.float32)
    _refused("hf_longformer", q, Pattern(8, 2), "feature 'dilation' not supported")
    _refused("hf_longformer", q, Pattern(8, causal=True), "feature 'causal' not supported")
    _refused("hf_longformer", q, Pattern(8, (1, 1)), "feature 'per_head_dilation' not supported")
    _refused("hf_longformer", q, Pattern(2), "w >= 4")
    _refused("hf_longformer", q.double(), Pattern(8), "dtype fp64 not supported")
    # every reason at once
    _refused("hf_longformer", q.double(), Pattern(8, 3, True), "fp64", "'dilation'", "'causal'")


# ------------------------------------------------------------------------- flash_attn
def test_flash_attn_forward_backward() -> None:
    impl_or_skip("flash_attn")
    for p in (Pattern(16), Pattern(16, causal=True), Pattern(0)):
        _check_forward("flash_attn", (2, 2, 200, 64), p, torch.float16, scale=0.1)
    _check_backward("flash_attn", (1, 2, 200, 64), Pattern(16), torch.bfloat16)


def test_flash_attn_refusals() -> None:
    im = attnbench.get_impl("flash_attn")
    q = torch.zeros(1, 2, 16, 64, dtype=torch.float16)
    why = im.unavailable_reason()
    want = ["device 'cpu' not supported", "feature 'dilation' not supported", "feature 'global_tokens' not supported"]
    _refused("flash_attn", q, Pattern(4, 2, False, (0,)), *want, *([why] if why else []))
    _refused("flash_attn", q.float(), Pattern(4), "dtype fp32 not supported")
    if why is None:  # head_dim is checked per call, once the rest is fine
        _refused("flash_attn", torch.zeros(1, 2, 16, 12, dtype=torch.float16, device="cuda"), Pattern(4), "head_dim=12")


# ---------------------------------------------------------------------------- imports
def test_modules_import_with_torch_alone() -> None:
    """Importing the four modules loads none of their optional packages."""
    code = (
        "import sys\n"
        "import attnbench.impls.flex, attnbench.impls.sdpa, attnbench.impls.flash_attn, attnbench.impls.hf_longformer\n"
        "bad = [m for m in ('transformers', 'flash_attn', 'torch._inductor') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    run_fresh(code)


# ---------------------------------------------------------------------- refusals before anything runs
def _row(**kw) -> dict:
    """The benchmark's row for a CPU configuration, measured in this process."""
    from attnbench.config import BenchConfig
    from attnbench.sweep import measure

    base = dict(device="cpu", seq_len=256, window=8, heads=2, head_dim=32, isolate=False, time_budget_s=0.01)
    return measure(BenchConfig(**{**base, **kw}))


def test_flex_backward_on_the_cpu_is_refused_by_its_declared_data(monkeypatch) -> None:
    """impl=flex mode=bwd on the CPU is skipped from the registry's data, before anything
    compiles (the guard's own check sees no real tensor)."""
    import attnbench.impls.flex as flex

    im = attnbench.get_impl("flex")
    why = im.not_supported_reasons(Pattern(8), device="cpu", dtype=torch.float32, backward=True)
    assert any("inference-only" in r for r in why), why
    on_cuda = im.not_supported_reasons(Pattern(8), device="cuda", dtype=torch.float32, backward=True)
    assert not any("inference-only" in r for r in on_cuda), on_cuda

    def never():
        raise AssertionError("compiled a refused call")

    monkeypatch.setattr(flex, "_compiled_flex", never)
    monkeypatch.setattr(flex, "_compiled_builder", never)
    for mode in ("bwd", "fwd_bwd"):
        row = _row(impl="flex", mode=mode)
        assert row["status"] == "skipped" and "inference-only" in row["reason"], (mode, row["reason"])


def test_flash_attn_skipped_row_names_every_reason() -> None:
    """The row the benchmark writes lists every reason the registry gives, as the Python API does."""
    im = attnbench.get_impl("flash_attn")
    row = _row(impl="flash_attn", dtype="fp32", dilation=2, global_tokens=[0])
    reasons = im.not_supported_reasons(Pattern(8, 2, False, (0,)), device="cpu", dtype=torch.float32)
    assert len(reasons) >= 4, reasons
    assert row["status"] == "skipped" and all(r in row["reason"] for r in reasons), (row["reason"], reasons)
