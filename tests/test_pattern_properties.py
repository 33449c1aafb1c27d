"""Property tests of the Pattern over random patterns (hypothesis): pairs() equals the
mask's count, and the mask equals the rule evaluated pair by pair. A module of its own
so that, where hypothesis is not installed (a bare GPU machine), only these skip."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnbench import Pattern  # noqa: E402

patterns = st.builds(
    lambda w, d, causal, g, n, per_head, heads: (
        Pattern(2 * w, tuple(d for _ in range(heads)) if per_head else d, causal, [x % n for x in g]),
        n,
        heads,
    ),
    w=st.integers(0, 8),
    d=st.integers(1, 4),
    causal=st.booleans(),
    g=st.lists(st.integers(0, 1000), max_size=5),
    n=st.integers(1, 60),
    per_head=st.booleans(),
    heads=st.integers(1, 3),
)


@settings(max_examples=150, deadline=None)
@given(patterns)
def test_pairs_equals_mask_sum(case):
    p, n, heads = case
    m = p.mask(n, heads=heads)
    assert p.pairs(n, heads) == int(m.sum())
    assert m.diagonal(dim1=-2, dim2=-1).all(), "every row attends to itself"


@settings(max_examples=100, deadline=None)
@given(patterns)
def test_mask_matches_the_rule(case):
    """The mask equals the rule in the docstring, evaluated pair by pair from the
    pattern's own fields (window, dilation, causal, global tokens), never from the
    properties the implementations read (offset_range, dilations)."""
    p, n, heads = case
    m = p.mask(n, heads=heads)
    w, g = p.window, set(p.global_tokens)
    dils = p.dilation if isinstance(p.dilation, tuple) else (p.dilation,) * heads
    for h, d in enumerate(dils):
        for i in range(n):
            for j in range(n):
                if p.causal:  # the w keys to the left, every d-th
                    in_win = any(j == i - d * c for c in range(0, w + 1))
                else:  # w/2 on each side, every d-th
                    in_win = any(j == i + d * c for c in range(-(w // 2), w // 2 + 1))
                want = (in_win or i in g or j in g) and (not p.causal or j <= i)
                assert bool(m[h, i, j]) == want, (p, n, h, i, j)
