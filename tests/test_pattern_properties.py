"""Property tests of the Pattern over random patterns (hypothesis): pairs() equals the
mask's count, and the mask equals the rule evaluated pair by pair. A module of its own
so that, where hypothesis is not installed (a bare GPU machine), only these skip."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnbench import Pattern  # noqa: E402

#: a window as given: an even int, any int (made causal), or (left, right) with odd and
#: unequal sides
windows = st.one_of(
    st.integers(0, 8).map(lambda x: (2 * x, None)),
    st.integers(0, 9).map(lambda x: (x, True)),
    st.tuples(st.integers(0, 9), st.integers(0, 9)).map(lambda lr: (lr, None)),
)

patterns = st.builds(
    lambda w, d, causal, g, n, per_head, heads: (
        Pattern(w[0], tuple(d for _ in range(heads)) if per_head else d, causal or bool(w[1]), [x % n for x in g]),
        w[0],
        n,
        heads,
    ),
    w=windows,
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
    p, _, n, heads = case
    m = p.mask(n, heads=heads)
    assert p.pairs(n, heads) == int(m.sum())
    assert m.diagonal(dim1=-2, dim2=-1).all(), "every row attends to itself"


@settings(max_examples=100, deadline=None)
@given(patterns)
def test_mask_matches_the_rule(case):
    """The mask equals the rule in the docstring, evaluated pair by pair from the
    window as it was given and the pattern's fields (dilation, causal, global tokens),
    never from the properties the implementations read (left, right, offset_range,
    dilations)."""
    p, given, n, heads = case
    m = p.mask(n, heads=heads)
    g = set(p.global_tokens)
    if isinstance(given, tuple):  # (left, right) as given
        left, right = given
    else:  # an int: w/2 on each side, or the w keys to the left when causal
        left, right = (given, 0) if p.causal else (given // 2, given // 2)
    dils = p.dilation if isinstance(p.dilation, tuple) else (p.dilation,) * heads
    for h, d in enumerate(dils):
        for i in range(n):
            for j in range(n):
                in_win = any(j == i + d * c for c in range(-left, right + 1))  # every d-th
                want = (in_win or i in g or j in g) and (not p.causal or j <= i)
                assert bool(m[h, i, j]) == want, (p, n, h, i, j)


@settings(max_examples=100, deadline=None)
@given(windows, st.booleans())
def test_equal_windows_are_one_pattern(w, causal):
    """A window and its other spellings are one pattern: equal, same hash, same label,
    same mask (the shortest form is kept)."""
    given, forced = w
    causal = causal or bool(forced)
    p = Pattern(given, causal=causal)
    spelled = Pattern((p.left, p.right), causal=causal)
    assert p == spelled and hash(p) == hash(spelled) and p.describe() == spelled.describe()
    assert torch.equal(p.mask(23), spelled.mask(23))
