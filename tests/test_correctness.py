"""Every registered implementation against the float64 reference.

Parametrised over the registry x pattern cases x dtypes the implementation declares.
The tolerance is the verification policy's (attnbench.verify), the same the engine's
gate applies: relative to PyTorch's own error in that dtype (the control), plus a small
floor. Implementations registered ``slow_on_cpu`` (interpreted kernels,
compile-heavy baselines, the paper's Python loop) run the cases marked ``small`` on
the CPU, in fp32 and on a few cases in bf16 / fp16 (``SLOW_DTYPES``): each compiled
shape or interpreted call costs seconds there, and the loop's backward one autograd
node per query; the quick tier (``make test``) runs their core cases (``FULL``).
Per-call refusals an implementation declares through its ``check`` (e.g.
FlexAttention's CPU backward) are left out here and tested with the implementation;
so are the refusals (test_registry.py, test_baselines.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, assert_grads_ok, assert_output_ok, impl_or_skip, rand_key_mask, rand_qkv

import attnbench
from attnbench import Pattern


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    H: int
    n: int
    D: int
    pattern: Pattern
    small: bool = False  # also run for slow_on_cpu implementations (in the full tier)
    core: bool = False  # small, and run for them in the quick tier too (see FULL below)
    KV: int | None = None  # key/value heads (grouped-query attention); None: H
    key_mask: bool = False  # a per-sample key mask on top (conftest.rand_key_mask)

    def __str__(self) -> str:
        return self.id


CASES = [
    Case("n1", 1, 2, 1, 16, Pattern(4), small=True),
    Case("n7-w0", 1, 2, 7, 16, Pattern(0), small=True),
    Case("n97-w8", 1, 2, 97, 16, Pattern(8), small=True),
    Case("n97-w256-dense", 1, 2, 97, 16, Pattern(256), small=True),
    Case("n97-w10-d3", 1, 2, 97, 16, Pattern(10, 3), small=True),
    Case("n257-w16-d2-hd40", 1, 2, 257, 40, Pattern(16, 2)),
    Case("n1000-w64", 1, 2, 1000, 64, Pattern(64)),
    Case("n1000-w32-d3-g", 1, 2, 1000, 16, Pattern(32, 3, False, (0, 500, 999))),
    Case("n98-perhead-1123", 1, 4, 98, 16, Pattern(6, (1, 1, 2, 3)), small=True),
    Case("n97-g-start", 1, 2, 97, 16, Pattern(8, global_tokens=(0,)), small=True),
    Case("n97-g-mid-end", 1, 2, 97, 16, Pattern(8, global_tokens=(48, 96)), small=True, core=True),
    Case("n97-g-many", 1, 2, 97, 16, Pattern(4, global_tokens=range(0, 97, 3))),
    Case("n97-causal", 1, 2, 97, 16, Pattern(8, causal=True), small=True),
    Case("n97-causal-d2-g", 1, 2, 97, 32, Pattern(6, 2, True, (0, 50)), small=True, core=True),
    Case("n61-causal-perhead-g", 1, 4, 61, 16, Pattern(4, (1, 2, 3, 1), True, (5, 60))),
    Case("b3-n50-d2-g", 3, 2, 50, 16, Pattern(8, 2, False, (0,)), small=True),
    Case("n130-hd128-g", 1, 2, 130, 128, Pattern(16, global_tokens=(0,))),
    Case("b2-n257-perhead-g", 2, 4, 257, 32, Pattern(16, (1, 1, 2, 3), False, (0, 128, 256))),
    # (left, right) windows: odd and unequal sides, one-sided without causal, causal odd
    Case("n97-lr5-2", 1, 2, 97, 16, Pattern((5, 2)), small=True),
    Case("n97-lr0-7-d2-g", 1, 2, 97, 16, Pattern((0, 7), 2, False, (0, 60)), small=True, core=True),
    Case("n97-causal-w7", 1, 2, 97, 16, Pattern(7, causal=True), small=True),
    Case("n257-lr31-0-g", 1, 2, 257, 32, Pattern((31, 0), 1, False, (200,))),
    Case("n257-causal-lr13-5-d2-g", 1, 2, 257, 16, Pattern((13, 5), 2, True, (0, 100))),
    Case("n1000-lr63-1-g", 1, 2, 1000, 16, Pattern((63, 1), 1, False, (0, 999))),
    Case("n98-perhead-lr6-3", 1, 4, 98, 16, Pattern((6, 3), (1, 2, 1, 3)), small=True, core=True),
    # grouped-query and multi-query attention: 8 query heads on 2 or 1 key/value heads
    Case("n97-gqa8-2", 1, 8, 97, 16, Pattern(8), small=True, KV=2),
    Case("n97-mqa8-1-causal-w5-g", 1, 8, 97, 16, Pattern(5, 1, True, (3, 50)), small=True, core=True, KV=1),
    Case(
        "n97-gqa8-2-perhead-lr",
        1,
        8,
        97,
        16,
        Pattern((9, 4), (1, 2, 1, 3, 3, 3, 1, 2), False, (0,)),
        small=True,
        core=True,
        KV=2,
    ),  # fmt: skip
    Case("b2-n257-gqa8-2-lr-d2", 2, 8, 257, 32, Pattern((20, 11), 2, False, (0, 128)), KV=2),
    Case("n257-mqa8-1-lr", 1, 8, 257, 64, Pattern((127, 64)), KV=1),
    # key masks with holes anywhere, right and left padding (rows left without keys)
    Case("b3-n97-keys", 3, 2, 97, 16, Pattern(8), small=True, key_mask=True),
    Case(
        "b3-n97-keys-causal-d2-g-gqa",
        3,
        4,
        97,
        16,
        Pattern(7, 2, True, (0, 50)),
        small=True,
        core=True,
        KV=2,
        key_mask=True,
    ),
    Case("b3-n257-keys-lr-perhead-g", 3, 4, 257, 32, Pattern((9, 4), (1, 2, 1, 3), False, (10, 200)), key_mask=True),
]

#: slow_on_cpu implementations on the CPU: fp32 everywhere, low precision on a few cases
SLOW_DTYPES = {
    "n97-causal-d2-g": (torch.float32, torch.bfloat16, torch.float16),
    "n98-perhead-1123": (torch.float32, torch.bfloat16),
    "n97-gqa8-2-perhead-lr": (torch.float32, torch.bfloat16),
}

#: the full tier (``pytest -m full``; ``make test`` leaves it out): for slow_on_cpu
#: implementations on the CPU, the small cases beyond the core ones and low precision
#: beyond the first case. The core cases hold every feature at least once: globals at
#: the last key, causal with dilation and globals (in every dtype), per-head dilation,
#: one-sided windows, grouped- and multi-query heads, key masks with all of them. The
#: edge lengths and windows (n = 1, window 0, window >= n) are in the full tier for
#: them; in the quick tier the random cases (test_random_cases.py) and Triton's block
#: tests (window 0) still reach some.
FULL = pytest.mark.full

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
GRAD_DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _params(dtypes: list[torch.dtype], backward: bool):
    out = []
    available = {im.name for im in attnbench.available_impls(DEVICE)}
    for name in attnbench.list_impls():
        im = attnbench.get_impl(name)
        if backward and "backward" not in im.features:
            continue
        if name not in available:
            out.append(pytest.param(name, None, None, id=f"{name}-unavailable"))  # one skip, with the reason
            continue
        slow = im.slow_on_cpu and DEVICE == "cpu"
        for case in CASES:
            if slow and not case.small:
                continue
            needs = attnbench.registry.required_features(case.pattern, backward=backward, key_mask=case.key_mask)
            if not set(needs) <= im.features:
                continue  # a refusal, tested with the registry
            for dt in dtypes:
                if dt not in im.dtypes:
                    continue
                if slow and dt not in SLOW_DTYPES.get(case.id, (torch.float32,)):
                    continue  # every compile or interpreted call costs seconds here
                probe = torch.empty(case.B, case.H, case.n, case.D, dtype=dt, device=DEVICE)
                if im.not_supported_reasons(case.pattern, device=DEVICE, dtype=dt, backward=backward,
                                            q=probe.requires_grad_(backward), key_mask=case.key_mask):  # fmt: skip
                    continue  # a declared refusal (per device or per call), tested where the impl is
                full = slow and not (case.core and (dt == torch.float32 or case.id == "n97-causal-d2-g"))
                out.append(pytest.param(name, case, dt, id=f"{name}-{case.id}-{str(dt)[6:]}", marks=[FULL] * full))
    return out


@pytest.mark.parametrize("impl, case, dtype", _params(DTYPES, backward=False))
def test_forward(impl, case, dtype):
    impl_or_skip(impl)
    assert case is not None
    q, k, v = rand_qkv(case.B, case.H, case.n, case.D, dtype, kv_heads=case.KV)
    km = rand_key_mask(case.B, case.n) if case.key_mask else None
    out = attnbench.attention(q, k, v, case.pattern, impl=impl, key_mask=km)
    assert out.shape == q.shape and out.dtype == dtype
    assert_output_ok(out, q, k, v, case.pattern, f"{impl} {case}", key_mask=km)


@pytest.mark.parametrize("impl, case, dtype", _params(GRAD_DTYPES, backward=True))
def test_backward(impl, case, dtype):
    impl_or_skip(impl)
    assert case is not None
    q, k, v = rand_qkv(case.B, case.H, case.n, case.D, dtype, kv_heads=case.KV)
    km = rand_key_mask(case.B, case.n) if case.key_mask else None
    assert_grads_ok(lambda *x: attnbench.attention(*x, case.pattern, impl=impl, key_mask=km), q, k, v, case.pattern,
                    f"{impl} {case}", key_mask=km)  # fmt: skip


@pytest.mark.parametrize("impl", attnbench.list_impls())
def test_non_contiguous_inputs(impl):
    im = impl_or_skip(impl)
    dtype = torch.float32 if torch.float32 in im.dtypes else im.dtypes[0]
    p = Pattern(8) if not im.features >= {"global_tokens"} else Pattern(8, global_tokens=(0,))
    g = torch.Generator().manual_seed(0)
    # (B, n, H, D) transposed to (B, H, n, D): strides a kernel must not assume away
    q, k, v = (torch.randn(2, 45, 2, 32, generator=g).to(DEVICE, dtype).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    assert_output_ok(attnbench.attention(q, k, v, p, impl=impl), q, k, v, p, f"{impl} non-contiguous")


def test_verification_can_fail():
    """The policy is not vacuous: a small perturbation is caught and reported."""
    q, k, v = rand_qkv(1, 2, 40, 16, torch.float32)
    p = Pattern(4)
    out = attnbench.attention(q, k, v, p, impl="chunked")
    assert_output_ok(out, q, k, v, p, "unperturbed")
    with pytest.raises(AssertionError, match=r"max abs diff .* > tol .*mean abs diff .*control's max"):
        assert_output_ok(out + 1e-3, q, k, v, p, "perturbed")


def test_reference_rows_matches_reference():
    p = Pattern(6, (1, 3), True, (0, 30))
    q, k, v = rand_qkv(2, 2, 77, 16, torch.float32)
    rows = [0, 1, 30, 31, 50, 76]
    full = attnbench.reference(q, k, v, p)
    part = attnbench.reference_rows(q, k, v, p, rows)
    assert part.shape == (2, 2, len(rows), 16)
    torch.testing.assert_close(part, full[:, :, rows], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"rows: every row must lie in \[0, 77\)"):
        attnbench.reference_rows(q, k, v, p, [77])
