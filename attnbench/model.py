"""Measured inside a model: a Hugging Face model with random weights, shaped like a
public one, with an implementation in every attention layer; its baseline is the model
with Hugging Face's own attention.

* ``longformer``: a Longformer-base-shaped encoder (``LongformerModel``), patched by
  :func:`attnbench.hf.patch`; baseline ``hf_longformer``, the model unpatched.
* ``modernbert``: a ModernBERT-base-shaped encoder (local layers of the window, every
  third layer global), through the backend of :func:`attnbench.hf.register`; baseline
  ``sdpa``, the model with ``attn_implementation="sdpa"``.
* ``mistral``: a Mistral-7B-shaped decoder (causal sliding window, grouped-query heads,
  the public FFN), through the backend; baseline ``sdpa``.

``model_layers=L`` (with ``model=``) turns any measurement into one of this model: the
same pipeline (first call, verify, time, memory), the same settings (``heads`` x
``head_dim`` is the hidden size, ``kv_heads``, ``window``, ``global_tokens`` the
positions of Longformer's global tokens in every sample, ``mode``: ``fwd``, or
``fwd_bwd`` with the gradients of every parameter), and a row like any other, its
``model`` column saying which model. The verification runs the model against the
baseline's on the first ``grad_check_seq_len`` tokens: for Longformer, Hugging Face in
float64 the oracle and float32 the control (for a pattern its layer cannot express,
attnbench's ``naive`` patched in float64); for the others, Hugging Face's sdpa in
float64 the oracle and its eager attention in the working dtype the control.

    python -m attnbench experiment=model              # Longformer: alone and inside, the figure
    python -m attnbench experiment=model_modernbert   # ModernBERT-base-shaped
    python -m attnbench experiment=model_mistral      # Mistral-7B-shaped
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .case import Wrong, runner_for
from .config import MODELS, BenchConfig
from .registry import Impl

__all__ = ["ModelCase", "Family", "FAMILIES", "encoder", "baseline_of"]

#: the backend name the models measured here register their implementation under
BACKEND = "attnbench-measured"


def encoder(layers: int, heads: int, head_dim: int, window: int, seq_len: int, seed: int) -> nn.Module:
    """A Longformer-base-shaped encoder (hidden heads x head_dim, FFN 4x, GELU, the
    layer's window), random weights from ``seed``, no dropout, in eval mode."""
    import transformers

    hidden = heads * head_dim
    cfg = transformers.LongformerConfig(
        vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, attention_window=max(window, 2), pad_token_id=1,
        max_position_embeddings=math.ceil(seq_len / max(window, 2)) * max(window, 2) + 2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LongformerModel(cfg, add_pooling_layer=False).eval()


def _modernbert(c: BenchConfig, n: int) -> nn.Module:
    """ModernBERT-base-shaped: its FFN (1152 for a hidden size of 768), local layers of
    ``local_attention`` = the window (w/2 keys each side), every third layer global."""
    import transformers

    hidden = c.heads * c.head_dim
    cfg = transformers.ModernBertConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 3 // 2, num_hidden_layers=c.model_layers,
        num_attention_heads=c.heads, local_attention=c.pattern().span, global_attn_every_n_layers=3,
        max_position_embeddings=max(n, 8192), pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2, attention_dropout=0.0, mlp_dropout=0.0, embedding_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(c.seed)
    return transformers.ModernBertModel(cfg).eval()


def _mistral(c: BenchConfig, n: int) -> nn.Module:
    """Mistral-7B-shaped: its FFN (14336 for a hidden size of 4096), ``sliding_window`` =
    the window's reach + 1 (4096 for (4095, 0)), ``kv_heads`` key/value heads."""
    import transformers

    hidden = c.heads * c.head_dim
    cfg = transformers.MistralConfig(
        vocab_size=1000, hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=c.model_layers,
        num_attention_heads=c.heads, num_key_value_heads=c.kv_heads or c.heads, head_dim=c.head_dim,
        sliding_window=c.pattern().left + 1, max_position_embeddings=max(n, 8192), attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(c.seed)
    return transformers.MistralModel(cfg).eval()


@dataclass(frozen=True)
class Family:
    """A model attnbench measures inside: how it is built with an implementation in it
    (``build(c, n, impl)``), and its baseline, the model with Hugging Face's own attention."""

    baseline: str
    build: Callable[[BenchConfig, int, str], nn.Module]


def _longformer_with(c: BenchConfig, n: int, impl: str) -> nn.Module:
    from . import hf

    model = encoder(c.model_layers, c.heads, c.head_dim, c.window, n, c.seed)
    if impl == FAMILIES["longformer"].baseline:
        return model
    layer = {"window": c.window, "dilation": c.dilation, "causal": c.causal}
    return hf.patch(model, impl=impl, patterns=lambda _: layer)


def _backend_with(build: Callable[[BenchConfig, int], nn.Module]) -> Callable[[BenchConfig, int, str], nn.Module]:
    """A model of ``build`` whose attention is the implementation, through attnbench's
    backend, or Hugging Face's own (``sdpa``, ``eager``) by that name."""

    def with_impl(c: BenchConfig, n: int, impl: str) -> nn.Module:
        from . import hf

        model = build(c, n)
        model.set_attn_implementation(impl if impl in ("sdpa", "eager") else hf.register(impl, name=BACKEND))
        return model

    return with_impl


#: every family, by the ``model`` setting's value
FAMILIES = {
    "longformer": Family("hf_longformer", _longformer_with),
    "modernbert": Family("sdpa", _backend_with(_modernbert)),
    "mistral": Family("sdpa", _backend_with(_mistral)),
}
assert set(FAMILIES) == set(MODELS)


def _inputs(c: BenchConfig, n: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(c.seed)
    ids = torch.randint(3, 1000, (c.batch, n), generator=gen)
    x = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if c.model == "longformer":
        glob = torch.zeros(c.batch, n, dtype=torch.long)
        glob[:, [g for g in c.pattern().global_tokens if g < n]] = 1
        x["global_attention_mask"] = glob.to(device)
    return x


@dataclass
class ModelCase:
    """One measurement of the model: the model, its inputs drawn once, the call (a
    :class:`~attnbench.case.Case`)."""

    config: BenchConfig
    impl: Impl
    model: nn.Module
    inputs: dict
    cotangent: torch.Tensor | None  # (batch, n, hidden), the bwd modes only

    @classmethod
    def build(cls, c: BenchConfig, impl: Impl) -> ModelCase:
        dev = torch.device(c.device)
        model = FAMILIES[c.model].build(c, c.seq_len, impl.name).to(dev, c.torch_dtype())
        cot = None
        if c.mode != "fwd":
            gen = torch.Generator(device=dev).manual_seed(c.seed + 1)
            shape = (c.batch, c.seq_len, c.heads * c.head_dim)
            cot = torch.randn(shape, generator=gen, device=dev, dtype=c.torch_dtype())
        return cls(c, impl, model, _inputs(c, c.seq_len, dev), cot)

    @property
    def device(self) -> torch.device:
        return self.inputs["input_ids"].device

    def forward(self) -> torch.Tensor:
        return self.model(**self.inputs).last_hidden_state  # (batch, n, hidden)

    def contract(self, out: torch.Tensor) -> None:  # Hugging Face's model keeps its own
        pass

    def runner(self):
        """(the timed call, the tensors whose gradient is cleared before each) for the
        mode; the backward computes the gradient of every parameter."""
        return runner_for(self.config.mode, self.forward, self.cotangent, list(self.model.parameters()))

    def verify(self, out: torch.Tensor) -> dict:
        """The model against its baseline on the first grad_check_seq_len tokens (same
        weights), under the verification policy."""
        from .verify import judge

        c = self.config
        n = min(c.seq_len, c.grad_check_seq_len)
        family = FAMILIES[c.model]
        if c.model == "longformer":
            plain = c.pattern().dilation == 1 and not c.causal  # what Hugging Face's layer expresses
            oracle = control = family.build(c, n, family.baseline if plain else "naive")
        else:  # sdpa in float64 (PyTorch's math kernel); eager, float64 softmax-less, is no oracle
            oracle, control = family.build(c, n, "sdpa"), family.build(c, n, "eager")
        x = _inputs(c, n, self.device)

        def run(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
            with torch.no_grad():
                return model.to(self.device, dtype)(**x).last_hidden_state

        got = run(family.build(c, n, self.impl.name), c.torch_dtype())
        want = run(oracle, torch.float64)
        verdict = judge(got, want, run(copy.deepcopy(control), c.torch_dtype()), what=f"model output, n={n}")
        fields = {"verified": f"model (n={n})", "max_abs_err": verdict.max_err, "mean_abs_err": verdict.mean_err,
                  "tol": verdict.tol}  # fmt: skip
        if not verdict.ok:
            raise Wrong(str(verdict), fields)
        return fields


def baseline_of(label: str) -> str:
    """The baseline of a row's ``model`` label (``<family label>, <L> layers``)."""
    family = next(f for f, lab in MODELS.items() if label.startswith(lab))
    return FAMILIES[family].baseline
