"""attnbench's implementations inside Hugging Face transformers models, two ways.

**An attention backend** for the models whose attention goes through transformers'
``AttentionInterface`` (ModernBERT, Mistral, Qwen2/3, Gemma 3, ...)::

    import attnbench.hf
    attnbench.hf.register(impl="chunked")         # attn_implementation="attnbench"
    model = AutoModel.from_pretrained(name, attn_implementation="attnbench")
    attnbench.hf.register(impl="triton", name="attnbench-triton")   # another, per model
    model.set_attn_implementation("attnbench-triton")

Every attention layer then runs :func:`attnbench.attention`. The pattern comes from the
mask Hugging Face builds for the layer's type, which the backend's own mask builder
reads instead of materialising: a sliding layer is its exact window (Mistral's
``sliding_window=4096`` is ``(4095, 0)`` causal, ModernBERT's local layers ``(64, 64)``),
a full layer a window covering the sequence (same implementation: one model, one
implementation measured). The 2D attention mask becomes a key mask (padding on either
side, holes anywhere), honoured exactly. Decoding with a cache (fewer queries than keys)
is exact for causal layers, the queries being the last rows. Refused with a clear
error, never approximated: logit softcapping (Gemma 2), attention sinks (GPT-OSS),
attention dropout in training, ``output_attentions``, a prepared 4D mask, and any mask
Hugging Face composes from parts beyond the window and the padding (packed sequences,
image-token blocks, chunked attention), named.

**A patch** for Longformer and LED, whose self-attention predates that interface::

    model = LongformerModel.from_pretrained("allenai/longformer-base-4096").eval()
    attnbench.hf.patch(model, impl="chunked")     # every Longformer and LED-encoder self-attention
    out = model(input_ids, attention_mask=mask, global_attention_mask=global_mask)
    attnbench.hf.unpatch(model)                   # Hugging Face's own attention again

What a patched layer computes, for each sample of a batch: the layer's own projections
(``query``, ``key``, ``value``) go through ``attnbench.attention(q, k, v, Pattern(window,
global_tokens=<the sample's global positions>), impl=..., key_mask=<its unmasked
tokens>)``, with the layer's own ``attention_window``; then the global rows are
computed again with Hugging Face's separate global projections (``query_global``,
``key_global``, ``value_global``), as a small dense product over every unmasked key,
as Hugging Face does; masked tokens' outputs are 0, as Hugging Face's. Samples that
share their global positions go through one call. An implementation without the
``key_mask`` feature gets samples grouped by length instead, which works for padding
on the right only. A patched layer is an instance of a subclass of Hugging Face's
class defined here, so a patched model pickles and loads (``torch.save``).

Refused with a clear error rather than approximated: attention dropout in training
mode, ``output_attentions=True`` (no implementation returns probabilities), masks with
holes for an implementation without key masks, and whatever the implementation cannot
run (:class:`attnbench.UnsupportedError`, with every reason). ``patterns`` adds what
Hugging Face's layer cannot express: dilation (also per head) and causal windows, per
layer. :func:`char_lm` is the Longformer paper's character-level language-model
schedule, as a preset.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .pattern import Pattern
from .registry import attention, get_impl

try:
    import transformers  # noqa: F401
    from transformers.models.led.modeling_led import LEDEncoderSelfAttention
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
except ImportError as e:
    raise ImportError(
        "attnbench.hf needs Hugging Face transformers: pip install 'attnbench[hf]' (transformers>=5.0)"
    ) from e

__all__ = ["patch", "unpatch", "patched_layers", "char_lm", "PATCHABLE", "register", "CALLS", "HFMask"]

#: the self-attention classes a patch replaces
PATCHABLE = (LongformerSelfAttention, LEDEncoderSelfAttention)

#: per layer: {"window": int, "dilation": int or per-head tuple, "causal": bool}
LayerPattern = Mapping[str, Any]

#: calls of attnbench's code from inside a model, by (implementation, pattern label): the
#: backend's attention layers and the patched Longformer / LED layers count here
CALLS: collections.Counter = collections.Counter()


# ====================================================================== Longformer and LED
def patched_layers(model: nn.Module) -> list[nn.Module]:
    """The Longformer / LED-encoder self-attention modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, PATCHABLE)]


def patch(
    model: nn.Module,
    impl: str = "chunked",
    patterns: Mapping[int, LayerPattern] | Callable[[int], LayerPattern] | None = None,
) -> nn.Module:
    """Route every Longformer / LED-encoder self-attention of ``model`` through ``impl``.

    Args:
        model: a transformers ``LongformerModel`` (or a task model built on it), an
            ``LEDModel`` or ``LEDForConditionalGeneration``.
        impl: a name from :func:`attnbench.list_impls`.
        patterns: per layer (by its ``layer_id``), the pattern to use instead of the
            layer's own window: ``{"window": w, "dilation": d, "causal": c}``, any key
            left out keeping the layer's own (window) or the default (dilation 1, not
            causal); a mapping or a function of the layer id (:func:`char_lm`).
    Returns:
        ``model``, patched in place (:func:`unpatch` undoes it).
    """
    layers = patched_layers(model)
    if not layers:
        names = " or ".join(c.__name__ for c in PATCHABLE)
        raise ValueError(f"{type(model).__name__}: no {names} module to patch")
    get_impl(impl)  # an unknown name: the error lists the choices
    for layer in layers:
        spec = patterns(layer.layer_id) if callable(patterns) else (patterns or {}).get(layer.layer_id, {})
        unknown = set(spec) - {"window", "dilation", "causal"}
        if unknown:
            raise ValueError(
                f"patterns[{layer.layer_id}]: unknown key(s) {sorted(unknown)}; allowed: window, dilation, causal"
            )
        window = spec.get("window", 2 * layer.one_sided_attn_window_size)
        Pattern(window, spec.get("dilation", 1), spec.get("causal", False)).dilations(layer.num_heads)  # checked now
        layer._attnbench = {"impl": impl, "window": window, "dilation": spec.get("dilation", 1),
                            "causal": bool(spec.get("causal", False))}  # fmt: skip
        layer.__class__ = _PATCHED[_base(type(layer))]
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Hugging Face's own attention again, in every layer :func:`patch` changed."""
    for layer in patched_layers(model):
        if "_attnbench" in vars(layer):
            del layer._attnbench
        layer.__class__ = _base(type(layer))
    return model


def char_lm(num_layers: int, heads: int, first: int = 32, last: int = 512) -> Callable[[int], LayerPattern]:
    """The Longformer paper's character-level LM schedule (its section 4.1), as patterns:
    windows growing geometrically with depth from ``first`` (bottom layer) to ``last``
    (top), rounded to even; no dilation in the lower layers and, on two heads of the
    upper layers, dilation 2 then 3 (the layers split in thirds: 1, 2, 3)."""

    def schedule(layer: int) -> dict:
        frac = layer / max(num_layers - 1, 1)
        window = 2 * round(first * (last / first) ** frac / 2)
        d = 1 + (3 * layer) // num_layers  # 1, 2, 3 by thirds
        dilation = (d, d) + (1,) * (heads - 2) if d > 1 and heads > 2 else 1
        return {"window": window, "dilation": dilation}

    return schedule


# ---------------------------------------------------------------------- the patched forward
def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, n, E = x.shape
    return x.view(B, n, heads, E // heads).transpose(1, 2)  # (B, H, n, D)


def _refuse(layer: nn.Module, attention_mask, is_index_masked, output_attentions: bool) -> None:
    impl = layer._attnbench["impl"]
    if output_attentions:
        raise ValueError(
            f"output_attentions=True: attnbench's {impl!r} returns no attention probabilities; "
            "call the model with output_attentions=False or attnbench.hf.unpatch(model) first"
        )
    if layer.training and layer.dropout > 0:
        raise ValueError(
            f"attention dropout in training mode (attention_probs_dropout_prob={layer.dropout}) is not supported "
            f"with attnbench's {impl!r}: set it to 0.0 in the config, or call model.eval()"
        )
    if is_index_masked is None and attention_mask is None:
        raise ValueError("the layer got neither attention_mask nor is_index_masked (call the model, not the layer)")


def _global_rows(
    layer, h: torch.Tensor, positions: torch.Tensor, causal: bool, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Hugging Face's global rows: the global projections, dense over every unmasked key.
    h (B, n, E), positions (G,), key_mask (B, n) or None -> (B, H, G, D)."""
    H, D = layer.num_heads, layer.head_dim
    q = _split_heads(layer.query_global(h.index_select(1, positions)), H) / math.sqrt(D)  # (B, H, G, D)
    k = _split_heads(layer.key_global(h), H)  # (B, H, n, D)
    v = _split_heads(layer.value_global(h), H)
    s = torch.matmul(q, k.transpose(-1, -2)).float()  # (B, H, G, n)
    if causal:
        later = torch.arange(h.shape[1], device=h.device)[None, :] > positions[:, None]  # (G, n)
        s = s.masked_fill(later, float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))  # a global row keeps its own key
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


#: the samples grouped by pattern, of the latest masks: a model hands every layer the same
#: masks, so the grouping (and its reads of the masks, a device sync on CUDA) is done once
#: per forward; an entry serves only masks equal to its copies in every entry
_GROUPS: dict[tuple, tuple] = {}


def _groups(
    masked: torch.Tensor, is_global: torch.Tensor, by_length: bool
) -> dict[tuple[int, tuple[int, ...]], list[int]]:
    """{(length, global positions): sample indices} of masks (B, m). ``by_length``: each
    sample cut to its real length, which needs its padding to be a suffix (raises
    otherwise); else every sample keeps all m tokens (its masked ones go in a key mask)."""
    key = (tuple(masked.shape), masked.device, by_length)
    hit = _GROUPS.get(key)
    if hit is not None and torch.equal(hit[0], masked) and torch.equal(hit[1], is_global):
        return hit[2]
    B, m = masked.shape
    lengths = (~masked).sum(1) if by_length else torch.full((B,), m)  # (B,)
    if by_length and not torch.equal(masked, torch.arange(m, device=masked.device)[None, :] >= lengths[:, None]):
        raise ValueError(
            "attention_mask: masked tokens other than right padding (left padding or holes) need an "
            "implementation with key masks (the 'key_mask' feature: naive, sdpa, flex, chunked, loop, triton)"
        )
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for b, n in enumerate(lengths.tolist()):
        positions = tuple(torch.nonzero(is_global[b, :n]).flatten().tolist())
        groups.setdefault((n, positions), []).append(b)
    _GROUPS.clear()  # only the latest forward's masks matter
    _GROUPS[key] = (masked.clone(), is_global.clone(), groups)
    return groups


def _forward(
    self,
    hidden_states,
    attention_mask=None,
    is_index_masked=None,
    is_index_global_attn=None,
    is_global_attn=None,
    output_attentions=False,
):
    """LongformerSelfAttention.forward through attnbench: hidden_states (B, m, E), the
    mask's per-token convention (< 0 masked, 0 local, > 0 global); returns
    ``(attn_output (B, m, E),)`` with zeros on masked tokens, as Hugging Face does."""
    _refuse(self, attention_mask, is_index_masked, output_attentions)
    spec = self._attnbench
    B, m, E = hidden_states.shape
    H = self.num_heads
    masked = is_index_masked if is_index_masked is not None else attention_mask < 0  # (B, m)
    is_global = is_index_global_attn if is_index_global_attn is not None else attention_mask > 0
    with_keys = "key_mask" in get_impl(spec["impl"]).features
    q, k, v = (_split_heads(proj(hidden_states), H) for proj in (self.query, self.key, self.value))  # (B, H, m, D)
    out = hidden_states.new_zeros(B, H, m, self.head_dim)  # masked tokens stay 0
    for (n, positions), samples in _groups(masked, is_global, by_length=not with_keys).items():
        if n == 0:
            continue
        idx = torch.tensor(samples, device=hidden_states.device)
        keys = ~masked.index_select(0, idx) if with_keys else None  # (Bg, m): the tokens present
        keys = None if keys is None or bool(keys.all()) else keys
        p = Pattern(spec["window"], spec["dilation"], spec["causal"], positions)
        o = attention(*(t.index_select(0, idx)[:, :, :n] for t in (q, k, v)), p, impl=spec["impl"], key_mask=keys)
        CALLS[(spec["impl"], p.describe())] += 1
        if positions:
            g = torch.tensor(positions, device=hidden_states.device)
            h = hidden_states.index_select(0, idx)[:, :n]
            o = o.index_copy(2, g, _global_rows(self, h, g, spec["causal"], keys))  # (Bg, H, n, D)
        if keys is not None:
            o = o.masked_fill(~keys[:, None, :, None], 0.0)  # Hugging Face's masked tokens: 0
        out = out.index_copy(0, idx, nn.functional.pad(o, (0, 0, 0, m - n)))
    return (out.transpose(1, 2).reshape(B, m, E),)


def _base(cls: type) -> type:
    """Hugging Face's class of a layer, patched or not."""
    return next(c for c in cls.__mro__ if c in PATCHABLE)


class AttnbenchLongformerSelfAttention(LongformerSelfAttention):
    """A Longformer self-attention layer patched by :func:`patch` (a class of this module,
    so that a pickled model finds it)."""

    forward = _forward


class AttnbenchLEDEncoderSelfAttention(LEDEncoderSelfAttention):
    """An LED-encoder self-attention layer patched by :func:`patch`."""

    forward = _forward


_PATCHED = {LongformerSelfAttention: AttnbenchLongformerSelfAttention,
            LEDEncoderSelfAttention: AttnbenchLEDEncoderSelfAttention}  # fmt: skip


# ====================================================================== the attention backend
#: substrings of an attn_implementation name that transformers reads as a kind of attention
#: (flash: FlashAttention's checks; sdpa, flex_attention: their dispatch checks, sdpa's with
#: a fallback to eager; paged and a slash: paged attention and Hub kernels)
_RESERVED = ("flash", "sdpa", "flex_attention", "paged", "/", "|")


def register(impl: str = "chunked", name: str = "attnbench") -> str:
    """Make ``name`` an ``attn_implementation`` of transformers that runs every attention
    layer through attnbench's ``impl``; returns ``name``.

    ``AutoModel.from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` then uses it. Registered twice: the attention
    function (``AttentionInterface``) and its mask builder (``AttentionMaskInterface``),
    which hands each layer an :class:`HFMask` instead of a materialised mask. Register
    several implementations under several names to choose one per model. Raises
    ``ValueError`` for an unknown implementation or a name transformers reads as another
    kind of attention.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    get_impl(impl)  # an unknown name: the error lists the choices
    bad = [w for w in _RESERVED if w in name]
    if not name or bad:
        raise ValueError(
            f"name={name!r}: transformers reads names containing {bad or 'nothing'} as another kind of attention; "
            "choose another, e.g. 'attnbench-2'"
        )
    AttentionInterface.register(name, functools.partial(_attention, impl=impl))
    AttentionMaskInterface.register(name, _mask)
    return name


@dataclasses.dataclass(frozen=True)
class HFMask:
    """What the backend's mask builder gives a layer in place of a 4D mask: the window
    Hugging Face's mask function describes, and the 2D attention mask as a key mask.

    ``left`` / ``right``: keys before / after each query (None: unbounded); ``key_mask``
    ``(B, kv_length)`` bool, True where the key is present (None: every key); queries
    sit at positions ``q_offset + i``, keys at ``kv_offset + j``."""

    causal: bool
    left: int | None
    right: int | None
    key_mask: torch.Tensor | None
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int


def _mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> HFMask:
    """The mask builder of :func:`register` (``AttentionMaskInterface``'s signature)."""
    causal, left, right = _window_of(mask_function)
    key_mask = None
    if attention_mask is not None:
        present = attention_mask.bool()
        if present.shape[-1] < kv_offset + kv_length:  # as Hugging Face pads it: keys past it are absent
            present = nn.functional.pad(present, (0, kv_offset + kv_length - present.shape[-1]))
        present = present[:, kv_offset : kv_offset + kv_length]  # (B, kv_length)
        key_mask = None if bool(present.all()) else present
    return HFMask(causal, left, right, key_mask, q_length, kv_length, int(q_offset), int(kv_offset))


def _window_of(mask_function: Callable | None) -> tuple[bool, int | None, int | None]:
    """(causal, left, right) of a mask function Hugging Face composed from its standard
    parts (None: unbounded): causal or bidirectional, with a causal or a bidirectional
    sliding window; raises ValueError naming any other part (it would be approximated)."""
    import transformers.masking_utils as mu

    causal, left, right = False, None, None

    def tighter(a: int | None, b: int) -> int:
        return b if a is None else min(a, b)

    def walk(f: Callable) -> None:
        nonlocal causal, left, right
        if f is mu.causal_mask_function:
            causal = True
            return
        if f is mu.bidirectional_mask_function:
            return
        name = getattr(f, "__qualname__", type(f).__name__)
        cells = dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__ or ())))
        if name == "and_masks.<locals>.and_mask":
            for part in cells["mask_functions"]:
                walk(part)
        elif name == "sliding_window_overlay.<locals>.inner_mask":  # kv > q - sw: sw - 1 keys before
            left = tighter(left, cells["sliding_window"] - 1)
        elif name == "sliding_window_bidirectional_overlay.<locals>.inner_mask":  # |q - kv| <= sw
            left, right = tighter(left, cells["sliding_window"]), tighter(right, cells["sliding_window"])
        else:
            raise ValueError(
                f"this model's attention mask includes {name!r}, beyond a sliding window and the padding "
                "(packed sequences, image-token blocks, chunked attention): attnbench cannot express it exactly; "
                "use another attn_implementation for this model"
            )

    walk(mask_function if mask_function is not None else mu.causal_mask_function)
    return causal, left, 0 if causal else right


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: HFMask | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    *,
    impl: str,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function signature: query (B, H, q, D), key/value
    (B, H_kv, kv, D) -> (out (B, q, H, D), None)."""
    why = _refusal(module, attention_mask, dropout, kwargs)
    if why:
        raise ValueError(f"attn_implementation through attnbench's {impl!r}: {why}")
    q_len, kv_len = query.shape[2], key.shape[2]
    m = attention_mask
    if m is None:  # no mask built: every key present, the window from the layer itself
        reach = None if sliding_window is None else sliding_window - 1
        causal = bool(getattr(module, "is_causal", True))
        m = HFMask(causal, reach, 0 if causal else reach, None, q_len, kv_len, kv_len - q_len, 0)
    elif sliding_window is not None and m.left is not None and m.left != sliding_window - 1:
        raise ValueError(
            f"attn_implementation through attnbench's {impl!r}: the layer's sliding_window={sliding_window} "
            f"(its reach + 1) and its mask's window ({m.left} keys before each query) disagree"
        )
    pattern = Pattern(
        (min(kv_len - 1, kv_len - 1 if m.left is None else m.left), min(kv_len - 1, kv_len - 1 if m.right is None
         else m.right)), causal=m.causal,
    )  # fmt: skip
    if q_len != kv_len:  # decoding with a cache: the queries must be the last rows of a causal window
        if not m.causal or m.q_offset + q_len != m.kv_offset + kv_len:
            raise ValueError(
                f"attn_implementation through attnbench's {impl!r}: {q_len} queries at position {m.q_offset} "
                f"against {kv_len} keys at {m.kv_offset}: exact only as the last rows of a causal layer"
            )
        query = nn.functional.pad(query, (0, 0, kv_len - q_len, 0))  # rows before them: computed, discarded
    out = attention(query, key, value, pattern, impl=impl, scale=scaling, key_mask=m.key_mask)
    CALLS[(impl, pattern.describe())] += 1
    return out[:, :, kv_len - q_len :].transpose(1, 2).contiguous(), None


def _refusal(module: nn.Module, mask: Any, dropout: float, kwargs: dict) -> str:
    """Why this call cannot be computed exactly, or ""."""
    if kwargs.get("softcap") is not None:
        return f"logit softcapping (softcap={kwargs['softcap']}) is not attention attnbench computes"
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        return "attention sinks (GPT-OSS's s_aux) are not attention attnbench computes"
    if dropout and module.training:
        return f"attention dropout in training mode (dropout={dropout}): set it to 0.0, or call model.eval()"
    if kwargs.get("output_attentions"):
        return "output_attentions=True: no implementation returns attention probabilities"
    if kwargs.get("position_bias") is not None:
        return "an additive position bias is not attention attnbench computes"
    if isinstance(mask, torch.Tensor) or (mask is not None and not isinstance(mask, HFMask)):
        return (
            f"a prepared attention mask ({type(mask).__name__}) instead of the 2D padding mask: its pattern "
            "cannot be read back exactly; pass attention_mask as (batch, seq) 0/1"
        )
    return ""
