"""attnbench's implementations inside Hugging Face's Longformer and LED.

    import attnbench.hf
    model = LongformerModel.from_pretrained("allenai/longformer-base-4096").eval()
    attnbench.hf.patch(model, impl="chunked")     # every Longformer and LED-encoder self-attention
    out = model(input_ids, attention_mask=mask, global_attention_mask=global_mask)
    attnbench.hf.unpatch(model)                   # Hugging Face's own attention again

What a patched layer computes, for each sample of a batch: the layer's own projections
(``query``, ``key``, ``value``) of its real tokens go through
``attnbench.attention(q, k, v, Pattern(window, global_tokens=<the sample's global
positions>), impl=...)``, with the layer's own ``attention_window``; then the global
rows are computed again with Hugging Face's separate global projections
(``query_global``, ``key_global``, ``value_global``), as a small dense product over all
real keys, as Hugging Face does. The projections, the output layout and the return
value stay Hugging Face's. Samples that share their length and global positions go
through one call.

Refused with a clear error rather than approximated: attention dropout in training
mode, ``output_attentions=True`` (no implementation returns probabilities), padding
anywhere but on the right, and whatever the implementation cannot run
(:class:`attnbench.UnsupportedError`, with every reason).

``patterns`` adds what Hugging Face's layer cannot express: dilation (also per head)
and causal windows, per layer. :func:`char_lm` is the Longformer paper's character-level
language-model schedule, as a preset.
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .pattern import Pattern
from .registry import attention

try:
    import transformers  # noqa: F401
except ImportError as e:
    raise ImportError(
        "attnbench.hf needs Hugging Face transformers: pip install 'attnbench[hf]' (transformers>=4.40)"
    ) from e

__all__ = ["patch", "unpatch", "patched_layers", "char_lm", "PATCHABLE"]

#: the self-attention classes a patch replaces (by name: transformers is not imported here)
PATCHABLE = ("LongformerSelfAttention", "LEDEncoderSelfAttention")

#: per layer: {"window": int, "dilation": int or per-head tuple, "causal": bool}
LayerPattern = Mapping[str, Any]


def patched_layers(model: nn.Module) -> list[nn.Module]:
    """The Longformer / LED-encoder self-attention modules of ``model``, in order."""
    return [m for m in model.modules() if type(m).__name__ in PATCHABLE]


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
        raise ValueError(f"{type(model).__name__}: no {' or '.join(PATCHABLE)} module to patch")
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
        layer.forward = types.MethodType(_forward, layer)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Hugging Face's own attention again, in every layer :func:`patch` changed."""
    for layer in patched_layers(model):
        if "_attnbench" in vars(layer):
            del layer.forward, layer._attnbench
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


def _global_rows(layer, h: torch.Tensor, positions: torch.Tensor, causal: bool) -> torch.Tensor:
    """Hugging Face's global rows: the global projections, dense over all real keys.
    h (B, n, E) the real tokens, positions (G,) -> (B, H, G, D)."""
    H, D = layer.num_heads, layer.head_dim
    q = _split_heads(layer.query_global(h.index_select(1, positions)), H) / math.sqrt(D)  # (B, H, G, D)
    k = _split_heads(layer.key_global(h), H)  # (B, H, n, D)
    v = _split_heads(layer.value_global(h), H)
    s = torch.matmul(q, k.transpose(-1, -2)).float()  # (B, H, G, n)
    if causal:
        later = torch.arange(h.shape[1], device=h.device)[None, :] > positions[:, None]  # (G, n)
        s = s.masked_fill(later, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


#: the samples grouped by pattern, per mask tensor: a model hands every layer the same
#: masks, so the grouping (and its reads of the masks, a device sync on CUDA) is done once
_GROUPS: dict[int, tuple] = {}


def _groups(masked: torch.Tensor, is_global: torch.Tensor) -> dict[tuple[int, tuple[int, ...]], list[int]]:
    """{(real length, global positions): sample indices} of masks (B, m); raises unless
    the padding of every sample is a suffix."""
    cached = _GROUPS.get(id(masked))
    if cached is not None and cached[0]() is masked and cached[1]() is is_global:
        return cached[2]
    B, m = masked.shape
    lengths = (~masked).sum(1)  # (B,)
    if not torch.equal(masked, torch.arange(m, device=masked.device)[None, :] >= lengths[:, None]):
        raise ValueError("attention_mask: attnbench.hf supports padding on the right only (a masked suffix per sample)")
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for b, n in enumerate(lengths.tolist()):
        positions = tuple(torch.nonzero(is_global[b, :n]).flatten().tolist())
        groups.setdefault((n, positions), []).append(b)
    if len(_GROUPS) > 8:  # only the latest forward's masks matter
        _GROUPS.clear()
    _GROUPS[id(masked)] = (weakref.ref(masked), weakref.ref(is_global), groups)
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
    mask's per-token convention (< 0 padding, 0 local, > 0 global); returns
    ``(attn_output (B, m, E),)`` with zeros on padded tokens, as Hugging Face does."""
    _refuse(self, attention_mask, is_index_masked, output_attentions)
    spec = self._attnbench
    B, m, E = hidden_states.shape
    H = self.num_heads
    masked = is_index_masked if is_index_masked is not None else attention_mask < 0  # (B, m)
    is_global = is_index_global_attn if is_index_global_attn is not None else attention_mask > 0
    q, k, v = (_split_heads(proj(hidden_states), H) for proj in (self.query, self.key, self.value))  # (B, H, m, D)
    out = hidden_states.new_zeros(B, H, m, self.head_dim)  # padded tokens stay 0
    for (n, positions), samples in _groups(masked, is_global).items():
        if n == 0:
            continue
        idx = torch.tensor(samples, device=hidden_states.device)
        p = Pattern(spec["window"], spec["dilation"], spec["causal"], positions)
        o = attention(*(t.index_select(0, idx)[:, :, :n] for t in (q, k, v)), p, impl=spec["impl"])  # (Bg, H, n, D)
        if positions:
            g = torch.tensor(positions, device=hidden_states.device)
            rows = _global_rows(self, hidden_states.index_select(0, idx)[:, :n], g, spec["causal"])  # (Bg, H, G, D)
            o = o.index_copy(2, g, rows)
        out = out.index_copy(0, idx, nn.functional.pad(o, (0, 0, 0, m - n)))
    return (out.transpose(1, 2).reshape(B, m, E),)
