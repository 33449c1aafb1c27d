"""Every implementation that runs on PyTorch's CPU, compiled with torch.compile's default
backend (inductor), forward and backward, against the float64 reference under the
verification policy, as eager is.

Compiled code may lay out a view's base differently from eager: chunked's band, once an
``unfold`` and an ``as_strided`` skew, gave wrong key gradients under inductor and no
error. A crash (heap corruption) fails the test too: it kills the worker running it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, assert_grads_ok, assert_output_ok, impl_or_skip, rand_qkv

import attnbench
from attnbench import Pattern
from attnbench.registry import required_features

#: the richest pattern each implementation declares: (left, right), dilation, global
#: tokens, on grouped-query heads; else a symmetric window, with globals where declared
RICH = Pattern((5, 2), 2, False, (0, 12))
PLAIN = Pattern(8, global_tokens=(0, 12))


def _cases() -> list:
    out = []
    for name in attnbench.list_impls():
        im = attnbench.get_impl(name)
        if im.slow_on_cpu or DEVICE not in im.devices:
            continue  # FlexAttention is itself compiled, Triton's op is opaque to inductor, loop unrolls per query
        for p in (RICH, PLAIN):
            if set(required_features(p, backward=True)) <= im.features:
                out.append(pytest.param(name, p, id=f"{name}-{p.describe().replace(' ', '-')}"))
                break
    # Hugging Face's layer with global tokens runs uncompiled inside the compiled caller
    # (impls/hf_longformer.py says why); without them it is compiled, and checked here,
    # in the full tier: inductor takes a minute over Hugging Face's layer on the CPU
    out.append(pytest.param("hf_longformer", Pattern(8), id="hf_longformer-w8-compiled", marks=pytest.mark.full))
    # loop, once per query, unrolled by dynamo: the full tier
    out.append(pytest.param("loop", RICH, id=f"loop-{RICH.describe().replace(' ', '-')}", marks=pytest.mark.full))
    return out


@pytest.mark.skipif(DEVICE != "cpu", reason="inductor's CPU backend: the CPU suite")
@pytest.mark.parametrize("impl, pattern", _cases())
def test_inductor_matches_the_reference(impl, pattern):
    impl_or_skip(impl)
    torch._dynamo.reset()
    q, k, v = rand_qkv(1, 4, 37, 16, torch.float32, kv_heads=2)
    fn = torch.compile(lambda q, k, v: attnbench.attention(q, k, v, pattern, impl=impl))
    what = f"{impl} compiled {pattern.describe()}"
    assert_output_ok(fn(q, k, v), q, k, v, pattern, what)
    assert_grads_ok(fn, q, k, v, pattern, what)
