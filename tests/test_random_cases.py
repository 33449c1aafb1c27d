"""Random calls drawn from the whole space an implementation declares, against the
reference: (left, right) windows (odd, unequal, zero, wider than the sequence), causal,
dilation (shared, per head, as long as the sequence), global tokens (none, at the
ends, many), grouped-query heads, key masks with holes, awkward lengths and head
dims, batch > 1; forward, and backward where declared. Seeded: a failure names its
draw, which reproduces alone (``pytest tests/test_random_cases.py -k '<impl>-<seed>'``)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import DEVICE, assert_grads_ok, assert_output_ok, impl_or_skip, rand_key_mask, rand_qkv

import attnbench
from attnbench import Pattern
from attnbench.registry import required_features

#: draws per implementation: compiled (FlexAttention, per shape) and interpreted (Triton)
#: calls cost seconds each on the CPU, so fewer of theirs
DRAWS, SLOW_DRAWS = 5, 2


def draw(seed: int, im: attnbench.Impl) -> dict:
    """One call the implementation declares it runs: shape, pattern, key mask."""
    rng = random.Random(seed)
    slow = im.slow_on_cpu and DEVICE == "cpu"
    n = rng.choice([1, 2, 7, 13, 33, 61] if slow else [1, 5, 17, 64, 97, 150])
    kv = rng.choice([1, 2, 4])
    H = kv * rng.choice([1, 2])
    D = rng.choice([16, 24, 32] if slow else [8, 16, 24, 40, 64])
    B = rng.choice([1, 2])
    feats = im.features
    causal = "causal" in feats and rng.random() < 0.4
    left, right = rng.randint(0, n + 3), rng.randint(0, n + 3)
    if "asymmetric_window" not in feats and not causal:
        right = left
    dilation = 1
    if "dilation" in feats and rng.random() < 0.5:
        dilation = rng.randint(1, max(1, n))
    if "per_head_dilation" in feats and rng.random() < 0.3:
        dilation = tuple(rng.randint(1, 4) for _ in range(H))
    glob = ()
    if "global_tokens" in feats and rng.random() < 0.5:
        glob = tuple(rng.sample(range(n), rng.randint(1, min(n, 5)))) + ((0, n - 1) if rng.random() < 0.5 else ())
    p = Pattern((left, right), dilation, causal, glob)
    key_mask = "key_mask" in feats and B * n > 1 and rng.random() < 0.5
    return dict(B=B, H=H, kv=kv, n=n, D=D, pattern=p, key_mask=key_mask, seed=seed)


def _cases(backward: bool) -> list:
    out = []
    for name in attnbench.list_impls():
        im = attnbench.get_impl(name)
        if backward and "backward" not in im.features:
            continue
        for seed in range(SLOW_DRAWS if im.slow_on_cpu and DEVICE == "cpu" else DRAWS):
            out.append(pytest.param(name, seed, id=f"{name}-{seed}"))
    return out


def _call(impl: str, seed: int, backward: bool, dtype: torch.dtype = torch.float32):
    im = impl_or_skip(impl)
    if dtype not in im.dtypes:
        pytest.skip(f"{impl} does not declare {dtype}")
    c = draw(1000 * backward + seed, im)
    q, k, v = rand_qkv(c["B"], c["H"], c["n"], c["D"], dtype, seed=seed, kv_heads=c["kv"])
    km = rand_key_mask(c["B"], c["n"], seed=seed) if c["key_mask"] else None
    reasons = im.not_supported_reasons(c["pattern"], device=DEVICE, dtype=dtype, backward=backward,
                                       q=q.requires_grad_(backward), key_mask=km is not None)  # fmt: skip
    assert set(required_features(c["pattern"], backward, km is not None)) <= im.features
    if reasons:  # a per-call refusal the implementation declares (e.g. flex's CPU backward)
        pytest.skip(f"{impl} refuses {c}: {'; '.join(reasons)}")
    what = f"{impl} draw {seed}: B={c['B']} H={c['H']}/{c['kv']} n={c['n']} D={c['D']} {c['pattern']}"
    what += " with a key mask" if km is not None else ""
    return im, c, (q.detach(), k, v), km, what


@pytest.mark.parametrize("impl, seed", _cases(backward=False))
def test_random_forward(impl, seed):
    im, c, (q, k, v), km, what = _call(impl, seed, backward=False)
    out = attnbench.attention(q, k, v, c["pattern"], impl=impl, key_mask=km)
    assert_output_ok(out, q, k, v, c["pattern"], what, key_mask=km)


@pytest.mark.parametrize("impl, seed", _cases(backward=True))
def test_random_backward(impl, seed):
    im, c, (q, k, v), km, what = _call(impl, seed, backward=True)
    fn = lambda *x: attnbench.attention(*x, c["pattern"], impl=impl, key_mask=km)  # noqa: E731
    assert_grads_ok(fn, q, k, v, c["pattern"], what, key_mask=km)
