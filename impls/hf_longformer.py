"""hf_longformer: Hugging Face transformers' own Longformer self-attention, driven with
our q, k, v.

What runs is ``LongformerSelfAttention.forward`` from
``transformers.models.longformer.modeling_longformer``, unmodified: its sliding-chunks
score product (``_sliding_chunks_query_key_matmul``), its edge and padding masks, its
global-key concatenation (``_concat_with_global_key_attn_probs``), its fp32 softmax, its
chunked probabilities x values (``_sliding_chunks_matmul_attn_probs_value``,
``_compute_attn_output_with_global_indices``) and its dense recomputation of global
rows (``_compute_global_attn_output_from_hidden``). Nothing of it is reimplemented here.

How q, k, v get in. ``forward`` takes hidden states ``(B, n, H*D)`` and projects them
with six ``nn.Linear`` layers (``query/key/value`` for the window and separate
``query_global/key_global/value_global`` for global rows). The layer is built on the
meta device (no weights allocated) and those six projections are replaced:

* the hidden states are q itself, laid out ``(B, n, H*D)``;
* ``query`` and ``query_global`` multiply by ``scale * sqrt(D)``, so that after HF's own
  ``/ sqrt(head_dim)`` the scores carry our scale (a new tensor, as HF divides in place);
* ``key`` / ``key_global`` return k and ``value`` / ``value_global`` return v (laid out
  ``(n, B, H*D)`` like a projection's output), ignoring the hidden states.

So global rows use the same q, k, v as the window, which the pattern requires (in the
model they come from separately trained projections), and HF's own index bookkeeping
gathers the global queries from the hidden states. This is more faithful than calling
the private helpers one by one: the glue between them is HF's too. Gradients flow to
q, k, v through these modules, so backward is HF's autograd graph.

Window convention. attnbench window w (neighbours besides self, w/2 per side) =
HF ``config.attention_window`` = w; HF's ``one_sided_attn_window_size`` = w/2; its score
band has ``2 * (w/2) + 1 = w + 1`` columns. HF has no dilation (the original allenai
code had it in its TVM kernel only), no causal mode and no asymmetric window (one
one-sided size for both sides). Grouped-query k, v are repeated per query head by the
registry (Longformer has no grouped heads). It needs w >= 4: its layer
asserts w > 0, and with w = 2 (one-sided 1) ``_sliding_chunks_query_key_matmul`` fails on
an empty slice copy (``LongformerModel`` with ``attention_window=2`` fails the same
way in transformers 5.24).

Padding. HF needs n to be a multiple of w (``LongformerModel._pad_to_window_size``
pads token ids). Here q, k, v are zero-padded to that length and the padded positions
are marked masked (attention mask < 0), as HF's model does for pad tokens; the padded
rows are cut from the output.

Attention mask passed to ``forward`` (per token, as ``LongformerModel`` builds it):
``< 0`` masked (padding), ``0`` local, ``> 0`` global.

dtypes: fp32, fp16, bf16. HF computes the softmax in fp32 whatever the input dtype, so
fp64 inputs get fp32 accuracy (max error about 2e-7 against the reference on a small
case): fp64 is not declared.

Under ``torch.compile`` the layer is compiled, except with global tokens, where Dynamo
cannot trace HF's global-attention path and the layer runs uncompiled (see
:func:`_run_uncompiled`).

Cost outside HF's code: the padding and the relayout of q, k, v to HF's token-major
layouts (copies of O(n * H * D)); the projections cost nothing but a scalar multiply.
The layer is called with keyword arguments only (transformers 4.x's extra
``layer_head_mask`` keeps its default); checked against transformers 5.24.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from attnbench import Pattern, register
from attnbench.ops import module_probe

_has_transformers = module_probe("transformers")


@functools.lru_cache(maxsize=1)
def _api_problem() -> str | None:
    try:
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
    except Exception as e:  # broken install or moved module
        return f"cannot import transformers' LongformerSelfAttention: {type(e).__name__}: {e}"
    need = (
        "_sliding_chunks_query_key_matmul",
        "_sliding_chunks_matmul_attn_probs_value",
        "_compute_global_attn_output_from_hidden",
    )
    missing = [m for m in need if not hasattr(LongformerSelfAttention, m)]
    if missing:
        return f"this transformers' LongformerSelfAttention lacks {', '.join(missing)}"
    return None


def _probe() -> str | None:
    return _has_transformers() or _api_problem()


def _check(q: torch.Tensor, pattern: Pattern) -> list[str]:
    if pattern.span < 4:
        return [
            f"window={pattern.window}: HF Longformer needs attention_window = w >= 4 "
            "(w = 0 fails its layer's assertion; w = 2 fails inside _sliding_chunks_query_key_matmul)"
        ]
    return []


def _memory(B: int, H: int, n: int, D: int, esize: int, pattern: Pattern, backward: bool) -> float:
    w = max(pattern.span, 2)
    m = math.ceil(n / w) * w
    G = len(pattern.global_tokens)
    # chunk scores (2x the band), the band, its mask, fp32 probabilities and their
    # cast, the diagonalised probabilities (1.5x the band); global keys' columns and
    # the dense global rows; the padded copies of q, k, v and the layouts of the output.
    band = B * H * m * (w + 1 + G) * (5 * esize + 8)
    glob = B * H * G * m * (esize + 8)
    io = 6 * B * H * m * D * esize
    return float((band + glob + io) * (2.5 if backward else 1.0))


class _Scale(nn.Module):
    """Query projection: ``x * factor`` (always a new tensor: HF divides it in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class _Fixed(nn.Module):
    """Key / value projection: returns the tensor set for this call, ``(n, B, H*D)``."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.value
        if t is None or t.shape != x.shape:
            raise RuntimeError(f"hf_longformer: projection input {tuple(x.shape)} does not match the set tensor")
        return t


@functools.lru_cache(maxsize=8)
def _layer(heads: int, head_dim: int, window: int) -> nn.Module:
    """A ``LongformerSelfAttention`` for (heads, head_dim, window), projections replaced."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        attention_window=[window],
        num_hidden_layers=1,
        attention_probs_dropout_prob=0.0,
    )
    with torch.device("meta"):  # the Linear weights are replaced: never allocate them
        layer = LongformerSelfAttention(cfg, layer_id=0)
    assert layer.one_sided_attn_window_size == window // 2
    layer.query = layer.query_global = _Scale()
    layer.key = layer.key_global = _Fixed()
    layer.value = layer.value_global = _Fixed()
    return layer.eval()


@register(
    "hf_longformer",
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    features=("global_tokens", "backward"),
    probe=_probe,
    check=_check,
    memory=_memory,
)
def hf_longformer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float) -> torch.Tensor:
    """Hugging Face transformers' LongformerSelfAttention.forward on our q, k, v (sliding chunks)

    q, k, v ``(B, H, n, D)`` -> ``(B, H, n, D)`` through HF's self-attention layer.
    """
    B, H, n, D = q.shape
    w = pattern.span  # symmetric (asymmetric windows are not declared): HF's attention_window
    m = math.ceil(n / w) * w  # HF: length a multiple of attention_window
    pad = m - n

    def tokens_first(t: torch.Tensor) -> torch.Tensor:  # (B, H, n, D) -> (m, B, H*D)
        return F.pad(t, (0, 0, 0, pad)).permute(2, 0, 1, 3).reshape(m, B, H * D)

    hidden = F.pad(q, (0, 0, 0, pad)).transpose(1, 2).reshape(B, m, H * D)  # (B, m, H*D)
    mask = torch.zeros(B, m, dtype=q.dtype, device=q.device)  # 0 local, >0 global, <0 masked
    if pattern.global_tokens:
        mask[:, list(pattern.global_tokens)] = 1.0
    mask[:, n:] = -1.0

    run = _run_uncompiled() if pattern.global_tokens else _run
    out = run(_layer(H, D, w), hidden, tokens_first(k), tokens_first(v), mask, scale * math.sqrt(D))  # (B, m, H*D)
    return out.view(B, m, H, D).transpose(1, 2)[:, :, :n]


def _run(layer: nn.Module, hidden, k, v, mask, factor: float) -> torch.Tensor:
    """HF's layer on hidden (B, m, H*D) with k, v (m, B, H*D) as its projections' output."""
    layer.query.factor = factor  # HF divides the queries by sqrt(head_dim): factor = scale * sqrt(D)
    layer.key.value, layer.value.value = k, v
    try:
        (out,) = layer(
            hidden,
            attention_mask=mask,
            is_index_masked=mask < 0,
            is_index_global_attn=mask > 0,
            is_global_attn=bool((mask > 0).any()),
            output_attentions=False,
        )
    finally:
        layer.key.value = layer.value.value = None
    return out


# With global tokens, HF's layer runs uncompiled inside a torch.compile'd caller (a graph
# break), because Dynamo cannot trace it (torch 2.13): after the graph break at its
# nonzero(), HF's size check `assert list(global_attn_scores.size()) == [...,
# max_num_global_attn_indices, ...]` compares with a 0-d tensor, and Dynamo stops with
# "AssertionError: Expected bool, got FakeTensor". Reduced to PyTorch alone:
#
#     def f(q, is_global):
#         mx = is_global.long().sum(dim=1).max()  # a 0-d tensor
#         idx = is_global.nonzero(as_tuple=True)  # data-dependent: a graph break
#         qg = q.new_zeros(q.shape[0], mx, q.shape[2])
#         qg[idx[0], : len(idx[0]) // q.shape[0]] = 1.0
#         s = torch.bmm(qg, q.transpose(1, 2))
#         assert list(s.size()) == [q.shape[0], mx, q.shape[1]]  # Dynamo: Expected bool
#         return s
#
#     torch.compile(f)(torch.ones(2, 5, 4), torch.tensor([[1, 0, 1, 0, 0]] * 2, dtype=torch.bool))
#
# A refusal is no better: Dynamo turns an exception raised while it traces into a graph
# break and runs the frame eagerly, where nothing refuses. Without global tokens the
# layer compiles and matches eager (tests/test_compile.py).
@functools.cache
def _run_uncompiled():
    return torch.compiler.disable(_run)  # made on first use: it imports torch._dynamo
