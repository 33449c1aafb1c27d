"""Measured inside a model: a Longformer-base-shaped encoder (Hugging Face's
``LongformerModel``, random weights) with an implementation patched into every layer
(:mod:`attnbench.hf`); ``hf_longformer`` is the unpatched model, Hugging Face's own
attention.

``model_layers=L`` turns any measurement into one of this model: the same pipeline
(first call, verify, time, memory), the same settings (``heads`` x ``head_dim`` is the
hidden size, ``window``, ``global_tokens`` the positions of global tokens in every
sample, ``mode``: ``fwd``, or ``fwd_bwd`` with the gradients of every parameter), and a
row like any other, its ``model`` column saying which model. The verification runs the
patched model against the unpatched one (Hugging Face in float64 the oracle, float32
the control; for a pattern Hugging Face cannot express, attnbench's ``naive`` patched
in float64) on the first ``grad_check_seq_len`` tokens.

    python -m attnbench experiment=model      # attention alone and inside the model, the figure
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from .config import BenchConfig
from .registry import Impl

__all__ = ["ModelCase", "encoder", "write_model_figure"]

BASELINE = "hf_longformer"  # inside a model: the unpatched model, Hugging Face's own attention


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


def _inputs(c: BenchConfig, n: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(c.seed)
    ids = torch.randint(3, 1000, (c.batch, n), generator=gen)
    glob = torch.zeros(c.batch, n, dtype=torch.long)
    positions = [g for g in c.pattern().global_tokens if g < n]
    glob[:, positions] = 1
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "global_attention_mask": glob.to(device)}  # fmt: skip


def _patched(model: nn.Module, c: BenchConfig, impl: str) -> nn.Module:
    from . import hf

    if impl == BASELINE:
        return model
    layer = {"window": c.window, "dilation": c.dilation, "causal": c.causal}
    return hf.patch(model, impl=impl, patterns=lambda _: layer)


@dataclass
class ModelCase:
    """One measurement of the encoder: the model, its inputs drawn once, the call."""

    config: BenchConfig
    impl: Impl
    model: nn.Module
    inputs: dict
    cotangent: torch.Tensor | None  # (batch, n, hidden), the bwd modes only

    @classmethod
    def build(cls, c: BenchConfig, impl: Impl) -> ModelCase:
        dev = torch.device(c.device)
        model = encoder(c.model_layers, c.heads, c.head_dim, c.window, c.seq_len, c.seed)
        model = _patched(model, c, impl.name).to(dev, c.torch_dtype())
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
        from .measure import runner_for

        return runner_for(self.config.mode, self.forward, self.cotangent, list(self.model.parameters()))

    def verify(self, out: torch.Tensor) -> dict:
        """The patched model against the unpatched one on the first grad_check_seq_len
        tokens (same weights), under the verification policy."""
        from .measure import Wrong
        from .verify import judge

        c = self.config
        n = min(c.seq_len, c.grad_check_seq_len)
        base = encoder(c.model_layers, c.heads, c.head_dim, c.window, n, c.seed)
        plain = c.pattern().dilation == 1 and not c.causal  # what Hugging Face's layer expresses
        oracle = base if plain else _patched(copy.deepcopy(base), c, "naive")
        x = _inputs(c, n, self.device)

        def run(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
            with torch.no_grad():
                return copy.deepcopy(model).to(self.device, dtype)(**x).last_hidden_state

        got = run(_patched(copy.deepcopy(base), c, self.impl.name), c.torch_dtype())
        verdict = judge(got, run(oracle, torch.float64), run(oracle, c.torch_dtype()), what=f"model output, n={n}")
        fields = {"verified": f"model (n={n})", "max_abs_err": verdict.max_err, "mean_abs_err": verdict.mean_err,
                  "tol": verdict.tol}  # fmt: skip
        if not verdict.ok:
            raise Wrong(str(verdict), fields)
        return fields


# ---------------------------------------------------------------------- the figure
def write_model_figure(rows: list[dict], table_path: Path) -> Path | None:
    """``<study>.png`` beside the table: for each mode, at the largest n where both were
    measured, each implementation's speed-up over hf_longformer for the attention call
    alone and for the whole model (how much of the kernel's gain reaches the model)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from .plot import impl_color, impl_order

    df = pd.DataFrame(rows)
    df = df[df["status"] == "ok"].copy()
    if df.empty or not (df["model"] != "").any() or not (df["model"] == "").any():
        return None
    df["time"] = pd.to_numeric(df["time_ms_median"])
    df["n"] = pd.to_numeric(df["seq_len"])
    df["where"] = df["model"].map(lambda m: "model" if m else "attention")
    modes = [m for m in ("fwd", "fwd_bwd") if m in set(df["mode"])]
    fig = Figure(figsize=(6.2 * len(modes), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        sub = df[df["mode"] == mode]
        base = sub[sub["impl"] == BASELINE].set_index(["where", "n"])["time"]
        both = [n for n in sorted(set(sub["n"])) if ("attention", n) in base.index and ("model", n) in base.index]
        if not both:
            continue
        n = both[-1]
        impls = [i for i in impl_order(sub["impl"]) if i != BASELINE]
        for x, impl in enumerate(impls):
            for dx, where, hatch in ((-0.2, "attention", ""), (0.2, "model", "//")):
                t = sub[(sub["impl"] == impl) & (sub["where"] == where) & (sub["n"] == n)]["time"]
                if t.empty:
                    continue
                speedup = base[(where, n)] / t.iloc[0]
                ax.bar(x + dx, speedup, 0.38, color=impl_color(impl), hatch=hatch, edgecolor="white")
                ax.text(x + dx, speedup, f"{speedup:.2g}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="#444444", lw=0.8)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(range(len(impls)), impls, rotation=20)
        ax.set_ylabel(f"speed-up over {BASELINE} (log)")
        ax.set_title(f"{mode}, n = {n}: attention alone (plain) and whole model (hatched)", fontsize=9)
    model = next(m for m in df["model"] if m)
    r = rows[0]
    fig.suptitle(f"{model}; {r.get('device_name')}, {r.get('dtype')}", fontsize=9)
    fig.tight_layout()
    path = table_path.with_suffix(".png")
    fig.savefig(path)
    return path
