"""The attention pattern: one definition from which the mask, the reference and the
work counts derive.

Convention:

* ``window`` is ``(left, right)``, FlashAttention's ``window_size``: query ``i`` may
  attend to the ``left`` keys before it and the ``right`` keys after it (in steps of the
  dilation), and to itself. An int ``w`` is the Longformer paper's and Hugging Face's
  ``attention_window``: ``w`` neighbours besides itself, ``(w/2, w/2)`` (so ``w`` is
  even), or ``(w, 0)`` when ``causal`` (any ``w``).
* ``dilation`` d multiplies the step: key ``j`` is in query ``i``'s window iff
  ``j = i + d*c`` for an integer ``c`` in ``[-left, right]`` and ``0 <= j < n``.
  Windows are truncated at the sequence edges, never shifted.
* ``global_tokens``: a global query attends to every key and every query attends to
  every global key. ``causal`` forbids ``j > i`` everywhere, globals included, so a
  causal window is ``(left, 0)`` whatever ``right`` was given.

One pattern, one spelling: the window is kept in its shortest form, an int where an int
says it (``(64, 64)`` is ``128``; ``(4095, 0)`` with ``causal`` is ``4095``), so equal
patterns compare and hash equal and an int window's rows keep their labels.
"""

from __future__ import annotations

import bisect
import numbers
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Pattern", "window_rule"]


def window_rule(q_idx, kv_idx, d, lo, hi):
    """The sliding-window half of the pattern: key ``kv_idx`` lies in query ``q_idx``'s
    window at dilation ``d`` iff ``kv_idx = q_idx + d*c`` for an integer ``c`` in
    ``[lo, hi]`` (:attr:`Pattern.offset_range`). Edges need no test: keys outside
    ``[0, n)`` are never asked about.

    Works elementwise on ints and on broadcasting tensors alike, so the mask, the
    exact pair count, FlexAttention's ``mask_mod`` and the loop implementation all ask
    this one function.
    """
    diff = kv_idx - q_idx
    return (diff % d == 0) & (diff >= lo * d) & (diff <= hi * d)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _canonical_window(w: object, causal: bool) -> int | tuple[int, int]:
    """The window in its shortest form: an int where an int says it, else (left, right)."""
    if isinstance(w, (list, tuple)):
        if len(w) != 2 or not all(_is_int(x) and x >= 0 for x in w):
            raise ValueError(
                f"window={list(w)!r}: a (left, right) window is two ints >= 0, the keys before and after each query"
            )
        left, right = int(w[0]), int(w[1])
    elif _is_int(w) and w >= 0:
        if causal:
            return int(w)  # (w, 0)
        if w % 2:
            raise ValueError(
                f"window={w!r}: an int window is split w/2 per side, so it must be even unless causal; "
                f"give (left, right) for an asymmetric window, e.g. window=[{w // 2 + 1},{w // 2}]"
            )
        return int(w)
    else:
        raise ValueError(
            f"window={w!r}: must be an int >= 0 (neighbours per query besides itself) or (left, right), two ints >= 0"
        )
    if causal:
        return left  # causal forbids every key to the right
    return 2 * left if left == right else (left, right)


@dataclass(frozen=True)
class Pattern:
    """A sliding-window attention pattern: window, dilation, causal, global tokens.

    Args:
        window: ``(left, right)`` ints >= 0, keys before and after each query (in steps of
            the dilation), as FlashAttention's ``window_size``; or an int ``w``,
            neighbours besides itself: ``(w/2, w/2)`` (``w`` even), ``(w, 0)`` when causal.
            Kept in its shortest form (see the module docstring); :attr:`left` and
            :attr:`right` are what every consumer reads.
        dilation: int >= 1, or a tuple of per-head ints (its length must equal the
            number of heads at call time).
        causal: attend only to keys ``j <= i``; the window is then ``(left, 0)``.
        global_tokens: positions of global tokens; normalised to a sorted tuple of
            unique ints.

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """

    window: int | tuple[int, int]
    dilation: int | tuple[int, ...] = 1
    causal: bool = False
    global_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.causal, (bool,)) and not (_is_int(self.causal) and self.causal in (0, 1)):
            raise ValueError(f"causal={self.causal!r}: must be a bool")
        object.__setattr__(self, "causal", bool(self.causal))
        object.__setattr__(self, "window", _canonical_window(self.window, self.causal))

        d = self.dilation
        if isinstance(d, (list, tuple)):
            if len(d) == 0 or not all(_is_int(x) and x >= 1 for x in d):
                raise ValueError(f"dilation={d!r}: a per-head dilation must be a non-empty tuple of ints >= 1")
            d = tuple(int(x) for x in d)
        elif _is_int(d) and d >= 1:
            d = int(d)
        else:
            raise ValueError(f"dilation={d!r}: must be an int >= 1 or a tuple of per-head ints >= 1")
        object.__setattr__(self, "dilation", d)

        g = self.global_tokens
        if g is None:
            g = ()
        if _is_int(g):
            g = (g,)
        if isinstance(g, (str, bytes)) or not isinstance(g, Iterable):
            raise ValueError(f"global_tokens={g!r}: must be a sequence of int positions >= 0")
        g = tuple(g)
        for x in g:
            if not _is_int(x) or x < 0:
                raise ValueError(f"global_tokens={self.global_tokens!r}: position {x!r} is not an int >= 0")
        object.__setattr__(self, "global_tokens", tuple(sorted({int(x) for x in g})))

    # ------------------------------------------------------------------ queries
    @property
    def per_head(self) -> bool:
        """True when the dilation is given per head."""
        return isinstance(self.dilation, tuple)

    @property
    def max_dilation(self) -> int:
        return max(self.dilation) if isinstance(self.dilation, tuple) else self.dilation

    @property
    def left(self) -> int:
        """Keys before each query in its window (in steps of the dilation)."""
        w = self.window
        return w[0] if isinstance(w, tuple) else w if self.causal else w // 2

    @property
    def right(self) -> int:
        """Keys after each query in its window (in steps of the dilation); 0 when causal."""
        w = self.window
        return w[1] if isinstance(w, tuple) else 0 if self.causal else w // 2

    @property
    def span(self) -> int:
        """Neighbours per query besides itself, ``left + right`` (an int window's ``w``)."""
        return self.left + self.right

    @property
    def offset_range(self) -> tuple[int, int]:
        """Inclusive range ``(lo, hi) = (-left, right)`` of the window index c; key = i + d*c."""
        return -self.left, self.right

    def dilations(self, heads: int) -> tuple[int, ...]:
        """Per-head dilations for ``heads`` heads (checks a per-head tuple's length)."""
        if not _is_int(heads) or heads < 1:
            raise ValueError(f"heads={heads!r}: must be an int >= 1")
        if isinstance(self.dilation, tuple):
            if len(self.dilation) != heads:
                raise ValueError(
                    f"dilation={self.dilation!r}: per-head dilation has {len(self.dilation)} entries "
                    f"but the input has heads={heads}; give one per head or a single int"
                )
            return self.dilation
        return (self.dilation,) * heads

    def validate(self, seq_len: int, heads: int | None = None) -> None:
        """Check the pattern against a sequence length (and head count)."""
        if not _is_int(seq_len) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: must be an int >= 1")
        if self.global_tokens and self.global_tokens[-1] >= seq_len:
            bad = [g for g in self.global_tokens if g >= seq_len]
            raise ValueError(
                f"global_tokens={self.global_tokens!r}: position(s) {bad} out of range; "
                f"allowed 0 <= g < seq_len={seq_len}"
            )
        if heads is not None:
            self.dilations(heads)
        elif self.per_head:
            raise ValueError(f"dilation={self.dilation!r}: a per-head dilation needs heads=")

    def describe(self) -> str:
        """Short human label, e.g. ``w512 d2 causal g1``, ``w[3,1]`` for (left, right)."""
        d = self.dilation
        w = self.window
        s = f"w[{w[0]},{w[1]}]" if isinstance(w, tuple) else f"w{w}"
        if d != 1:
            s += " d" + ("/".join(map(str, d)) if isinstance(d, tuple) else str(d))
        if self.causal:
            s += " causal"
        if self.global_tokens:
            s += f" g{len(self.global_tokens)}"
        return s

    # ------------------------------------------------------------------ masks
    def mask_mod(self, seq_len: int, heads: int = 1, device: torch.device | str = "cpu"):
        """The pattern as a predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor``, in
        FlexAttention's convention (``b`` is ignored): True iff query ``q_idx`` of head
        ``h`` attends to key ``kv_idx``. Arguments broadcast like tensors.

        The specification in executable form: the window (:func:`window_rule` at the
        head's dilation), or a global query, or a global key; then ``kv_idx <= q_idx``
        when causal. Every parameter is a captured tensor, not a Python constant, so a
        compiled caller (FlexAttention) is not specialised on the window, the causal
        flag or the global positions.

        Captures: ``dil`` (heads,) int64, ``is_global`` (seq_len,) bool,
        ``bounds`` (3,) int64 = (lo, hi, causal).
        """
        self.validate(seq_len, heads)
        lo, hi = self.offset_range
        dil = torch.tensor(self.dilations(heads), dtype=torch.int64, device=device)  # (H,)
        is_global = torch.zeros(seq_len, dtype=torch.bool, device=device)  # (n,)
        if self.global_tokens:
            is_global[list(self.global_tokens)] = True
        bounds = torch.tensor([lo, hi, int(self.causal)], dtype=torch.int64, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = window_rule(q_idx, kv_idx, dil[h], bounds[0], bounds[1]) | is_global[q_idx] | is_global[kv_idx]
            return allowed & ((kv_idx <= q_idx) | (bounds[2] == 0))

        return mask_mod

    def mask_rows(
        self, rows: torch.Tensor, seq_len: int, heads: int | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Boolean mask of the given query rows: ``(R, n)``, or ``(heads, R, n)`` when
        ``heads`` is given. ``True`` = attended. Memory O(R * n) per distinct dilation."""
        self.validate(seq_len, heads)
        dev = rows.device if device is None else torch.device(device)
        H = 1 if heads is None else heads
        mod = self.mask_mod(seq_len, H, dev)
        i = rows.to(device=dev, dtype=torch.long).reshape(1, -1, 1)  # (1, R, 1)
        j = torch.arange(seq_len, device=dev).reshape(1, 1, -1)  # (1, 1, n)
        first: dict[int, int] = {}  # one evaluation per distinct dilation
        for h, d in enumerate(self.dilations(H)):
            first.setdefault(d, h)
        per_d = {d: mod(None, torch.tensor(h, device=dev), i, j)[0] for d, h in first.items()}  # (R, n) each
        if heads is None:
            return per_d[self.dilation]
        return torch.stack([per_d[d] for d in self.dilations(heads)])  # (H, R, n)

    def mask(self, seq_len: int, heads: int | None = None) -> torch.Tensor:
        """Dense boolean mask: ``(n, n)``, or ``(heads, n, n)`` when ``heads`` is given
        (required for per-head dilation). ``mask[..., i, j]`` is True iff query i
        attends to key j. This is the specification in executable form."""
        return self.mask_rows(torch.arange(seq_len), seq_len, heads)

    def pairs(self, seq_len: int, heads: int = 1) -> int:
        """Exact number of attended (query, key) pairs summed over ``heads`` heads, by
        arithmetic: no tensor of length n (time O(G log G) per distinct dilation for G
        global tokens, memory O(G)), so an absurd length costs nothing to count."""
        self.validate(seq_len, heads)
        n, (lo, hi), glob = seq_len, self.offset_range, self.global_tokens
        total = 0
        for d, count in Counter(self.dilations(heads)).items():
            # window offset c (key i + d*c) is inside [0, n) for max(0, n - d|c|) rows
            per = _band(n, d, 0, hi) + _band(n, d, 1, -lo)
            by_residue: dict[int, list[int]] = {}
            for h in glob:  # sorted, so each list is too
                by_residue.setdefault(h % d, []).append(h)
            for idx, g in enumerate(glob):
                # global row g: its window's keys are replaced by every key (j <= g when causal)
                per -= max(0, min(hi, (n - 1 - g) // d) - max(lo, -(g // d)) + 1)
                per += g + 1 if self.causal else n
                # global key g: every other row whose window misses it (rows i >= g when causal)
                rows = (n - g) - (len(glob) - idx) if self.causal else n - len(glob)
                # rows i = g - d*c in [0, n) with c in [lo, hi] have it in their window ...
                in_window = max(0, min(hi, g // d) - max(lo, -((n - 1 - g) // d)) + 1)
                # ... less the global rows among them, counted above
                same = by_residue[g % d]
                in_window -= bisect.bisect_right(same, g - d * lo) - bisect.bisect_left(same, g - d * hi)
                per += rows - in_window
            total += count * per
        return total


def _band(n: int, d: int, a: int, b: int) -> int:
    """``sum(max(0, n - d*c) for c in range(a, b + 1))`` for ``0 <= a``, in O(1)."""
    b = min(b, (n - 1) // d)
    if b < a:
        return 0
    m = b - a + 1
    return m * n - d * (a + b) * m // 2
