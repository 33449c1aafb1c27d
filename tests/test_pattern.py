"""The Pattern: validation, hand-drawn masks, pairs() against the mask. Property
tests over random patterns are in test_pattern_properties.py."""

from __future__ import annotations

import pytest
import torch

from attnbench import Pattern


def drawn(picture: str) -> torch.Tensor:
    """Parse a mask drawn with 'x' (attended) and '.' (not)."""
    rows = [r.split() for r in picture.strip().splitlines()]
    return torch.tensor([[c == "x" for c in r] for r in rows])


def test_hand_drawn_sliding_window():
    # w = 2: one neighbour each side, truncated at the edges
    expect = drawn(
        """
        x x . . . .
        x x x . . .
        . x x x . .
        . . x x x .
        . . . x x x
        . . . . x x
        """
    )
    assert torch.equal(Pattern(2).mask(6), expect)


def test_hand_drawn_dilated_causal():
    # w = 2, d = 2, causal: keys i, i-2, i-4
    expect = drawn(
        """
        x . . . . . .
        . x . . . . .
        x . x . . . .
        . x . x . . .
        x . x . x . .
        . x . x . x .
        . . x . x . x
        """
    )
    assert torch.equal(Pattern(2, dilation=2, causal=True).mask(7), expect)


def test_hand_drawn_global():
    # w = 2 with token 3 global: row 3 and column 3 are full
    expect = drawn(
        """
        x x . x . . .
        x x x x . . .
        . x x x . . .
        x x x x x x x
        . . . x x x .
        . . . x x x x
        . . . x . x x
        """
    )
    assert torch.equal(Pattern(2, global_tokens=[3]).mask(7), expect)


def test_causal_global_still_causal():
    m = Pattern(2, causal=True, global_tokens=(0, 4)).mask(6)
    assert not torch.triu(m, diagonal=1).any()
    assert m[4, :5].all() and m[:, 0].all()


def test_window_covering_sequence_is_dense():
    assert Pattern(20).mask(7).all()
    assert torch.equal(Pattern(20, causal=True).mask(7), torch.tril(torch.ones(7, 7, dtype=torch.bool)))


def test_per_head_mask_and_dilations():
    p = Pattern(2, dilation=(1, 2))
    m = p.mask(5, heads=2)
    assert m.shape == (2, 5, 5)
    assert torch.equal(m[0], Pattern(2).mask(5)) and torch.equal(m[1], Pattern(2, 2).mask(5))
    with pytest.raises(ValueError, match="heads=3"):
        p.mask(5, heads=3)
    with pytest.raises(ValueError, match="per-head dilation needs heads"):
        p.mask(5)


def test_normalisation():
    p = Pattern(4, dilation=[1, 2], global_tokens=[5, 0, 5, 2])
    assert p.global_tokens == (0, 2, 5) and p.dilation == (1, 2)
    assert Pattern(4, global_tokens=range(3)).global_tokens == (0, 1, 2)
    assert hash(p) == hash(Pattern(4, dilation=(1, 2), global_tokens=(0, 2, 5)))


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"window": 3}, "window=3", "must be even unless causal"),
        ({"window": -2}, "window=-2", "an int >= 0"),
        ({"window": 2.0}, "window=2.0", "an int >= 0"),
        ({"window": True}, "window=True", "an int >= 0"),
        ({"window": "4"}, "window='4'", "an int >= 0"),
        ({"window": (-1, 3)}, "window=[-1, 3]", "two ints >= 0"),
        ({"window": (1, 2, 3)}, "window=[1, 2, 3]", "two ints >= 0"),
        ({"window": (1.0, 2)}, "window=[1.0, 2]", "two ints >= 0"),
        ({"window": 2, "dilation": 0}, "dilation=0", "int >= 1"),
        ({"window": 2, "dilation": 1.5}, "dilation=1.5", "int >= 1"),
        ({"window": 2, "dilation": (1, 0)}, "dilation=(1, 0)", "ints >= 1"),
        ({"window": 2, "dilation": ()}, "dilation=()", "non-empty"),
        ({"window": 2, "global_tokens": (-1,)}, "global_tokens=(-1,)", "int >= 0"),
        ({"window": 2, "global_tokens": (1.5,)}, "global_tokens=(1.5,)", "int >= 0"),
        ({"window": 2, "global_tokens": "0"}, "global_tokens='0'", "sequence of int"),
        ({"window": 2, "causal": "yes"}, "causal='yes'", "bool"),
    ],
)
def test_invalid_values_name_field_value_and_rule(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        Pattern(**kwargs)
    assert field in str(e.value) and allowed in str(e.value)


def test_hand_drawn_asymmetric_window():
    # (left, right) = (2, 1): two keys before, one after, truncated at the edges
    expect = drawn(
        """
        x x . . . .
        x x x . . .
        x x x x . .
        . x x x x .
        . . x x x x
        . . . x x x
        """
    )
    assert torch.equal(Pattern((2, 1)).mask(6), expect)
    # dilation 2: keys i - 4, i - 2, i, i + 2
    m = Pattern((2, 1), dilation=2).mask(9)
    assert m[4].nonzero().flatten().tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "given, causal, left, right, window, label",
    [
        (512, False, 256, 256, 512, "w512"),
        ((256, 256), False, 256, 256, 512, "w512"),
        (4095, True, 4095, 0, 4095, "w4095 causal"),
        ((4095, 0), True, 4095, 0, 4095, "w4095 causal"),
        ((4095, 7), True, 4095, 0, 4095, "w4095 causal"),  # causal forbids every key to the right
        ((3, 1), False, 3, 1, (3, 1), "w[3,1]"),
        ([0, 5], False, 0, 5, (0, 5), "w[0,5]"),
        ((4095, 0), False, 4095, 0, (4095, 0), "w[4095,0]"),  # not causal: no key after, but not causal
    ],
)
def test_left_right_and_the_shortest_form(given, causal, left, right, window, label):
    """FlashAttention's (left, right) and the int window are one convention: an int w is
    (w/2, w/2), or (w, 0) when causal; the shortest spelling is kept."""
    p = Pattern(given, causal=causal)
    assert (p.left, p.right, p.window, p.describe()) == (left, right, window, label)
    assert p.offset_range == (-left, right) and p.span == left + right
    assert p == Pattern(window, causal=causal)


def test_global_out_of_range_and_per_head_length():
    with pytest.raises(ValueError, match=r"global_tokens=\(0, 9\).*0 <= g < seq_len=9"):
        Pattern(2, global_tokens=(0, 9)).mask(9)
    with pytest.raises(ValueError, match=r"dilation=\(1, 2, 3\).*3 entries.*heads=2"):
        Pattern(2, dilation=(1, 2, 3)).pairs(10, heads=2)
    with pytest.raises(ValueError, match="seq_len=0"):
        Pattern(2).mask(0)


def test_pairs_known_value():
    # n=6, w=2: 2 + 3*4 + 2 edge-truncated rows
    assert Pattern(2).pairs(6) == 16
    assert Pattern(2).pairs(6, heads=3) == 48
    # causal does the same work per interior query: w + 1
    assert Pattern(4, causal=True).pairs(100) == sum(min(i, 4) + 1 for i in range(100))


def test_mask_rows_matches_mask():
    p = Pattern(4, dilation=(1, 3), causal=False, global_tokens=(2, 40))
    full = p.mask(50, heads=2)
    rows = torch.tensor([0, 2, 17, 40, 49])
    assert torch.equal(p.mask_rows(rows, 50, heads=2), full[:, rows])


def test_pairs_of_an_absurd_length_is_arithmetic():
    """The pair count is arithmetic, so the work of a length no machine could run is
    counted at once and in constant memory (the guards then refuse it)."""
    import time

    t = time.perf_counter()
    n, p = 10**12, Pattern(512, global_tokens=list(range(64)))
    got = p.pairs(n, heads=12)
    window_only = 12 * (n * 513 - 2 * sum(range(1, 257)))  # each offset c reaches n - |c| rows
    assert window_only < got < window_only + 12 * 2 * 64 * n, got
    assert time.perf_counter() - t < 1.0
