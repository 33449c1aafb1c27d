"""attnbench as transformers' attention backend (attnbench.hf.register) in today's
models with sliding-window layers: ModernBERT (bidirectional local layers, every third
global), Mistral (causal sliding window, grouped-query heads) and Gemma 3 (sliding
and full layers alternating), small configs with the public configs' structure,
random weights. Outputs of the real tokens and the gradient of every parameter, with
padded batches (right, left, holes), under the verification policy.

The oracle is Hugging Face's own model with attn_implementation="sdpa" in float64
(PyTorch's math kernel: float64 throughout, 0 for a row without keys); the control,
its "eager" attention in float32. Hugging Face's eager attention in float64 is no
oracle: it takes its softmax in float32, where the float64 mask's finfo.min becomes
-inf, so a padded row without keys is NaN and spreads to every token of its sample
through the next layer (0 x NaN); test_eager_in_float64_is_not_an_oracle shows it."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import attnbench
from attnbench.verify import judge

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
import attnbench.hf as hf  # noqa: E402

B, N = 3, 44


def mistral(**kw) -> torch.nn.Module:
    cfg = transformers.MistralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=256, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MistralModel(cfg).eval()


def modernbert(**kw) -> torch.nn.Module:
    cfg = transformers.ModernBertConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        local_attention=16, global_attn_every_n_layers=3, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.ModernBertModel(cfg).eval()


def gemma3(**kw) -> torch.nn.Module:
    cfg = transformers.Gemma3TextConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=12, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Gemma3TextModel(cfg).eval()


MODELS = {"modernbert": modernbert, "mistral": mistral, "gemma3": gemma3}
#: each model's layers: (attention window label, layers) of one forward at n = N
LAYERS = {
    "modernbert": {"w16": 2, f"w{2 * (N - 1)}": 1},  # local_attention 16: (8, 8); the global layer: all keys
    "mistral": {"w15 causal": 2},  # sliding_window 16: itself and the 15 keys before it
    "gemma3": {"w11 causal": 2, f"w{N - 1} causal": 1},
}


def inputs(n: int = N) -> dict:
    """Three samples: no padding; right padding; left padding and holes."""
    ids = torch.randint(3, 100, (B, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, n, dtype=torch.long)
    mask[1, n - 9 :] = 0
    mask[2, :7] = 0
    mask[2, 20:23] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model, attn: str, x: dict, dtype: torch.dtype, cot: torch.Tensor | None):
    """(hidden states of the real tokens, {parameter: gradient}) of ``model`` with
    attn_implementation ``attn`` in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    model.set_attn_implementation(attn)
    hidden = model(**x).last_hidden_state[x["attention_mask"].bool()]  # (real tokens, E)
    if cot is None:
        return hidden, {}
    (hidden * cot.to(dtype)).sum().backward()
    return hidden, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check(model, impl: str, backward: bool = True) -> None:
    x = inputs()
    name = hf.register(impl, name=f"attnbench-{impl}")
    real = int(x["attention_mask"].sum())
    cot = torch.randn(real, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) if backward else None
    want, want_grads = _run(model, "sdpa", x, torch.float64, cot)  # the oracle
    control, control_grads = _run(model, "eager", x, torch.float32, cot)
    hf.CALLS.clear()
    got, got_grads = _run(model, name, x, torch.float32, cot)
    verdict = judge(got, want, control, what=f"{impl}: hidden states")
    assert verdict.ok, str(verdict)
    assert set(got_grads) == set(want_grads)
    for p in want_grads:
        verdict = judge(got_grads[p], want_grads[p], control_grads[p], what=f"{impl}: d{p}")
        assert verdict.ok, str(verdict)
    return dict(hf.CALLS)


def _available(impl: str) -> None:
    if impl not in {im.name for im in attnbench.available_impls("cpu", torch.float32)}:
        pytest.skip(f"{impl} unavailable here: {attnbench.get_impl(impl).unavailable_reason()}")
    if "key_mask" not in attnbench.get_impl(impl).features:
        pytest.skip(f"{impl} has no key masks: a padded batch is refused (test_refusals_say_why)")


def _quick(family: str, impl: str, quick: tuple[str, ...]):
    """Interpreted (Triton) and compiled (FlexAttention) runs cost seconds a layer on the
    CPU: the quick tier runs them on the models named, the full tier on every one."""
    return pytest.param(family, impl, marks=[pytest.mark.full] * (family not in quick), id=f"{family}-{impl}")


@pytest.mark.parametrize(
    "family, impl",
    [(f, i) for f in MODELS for i in ("naive", "chunked")] + [_quick(f, "triton", ("gemma3",)) for f in MODELS],
)  # Gemma 3: grouped-query heads, sliding and full layers, causal
def test_outputs_and_every_gradient_equal_huggingface(family, impl):
    """A padded batch through every layer, forward and backward; attnbench's code ran for
    every layer, with the layer's own window (a counter, not a belief)."""
    _available(impl)
    calls = _check(MODELS[family](), impl)
    assert calls == {(impl, label): count for label, count in LAYERS[family].items()}, calls


@pytest.mark.parametrize("family, impl", [_quick(f, "flex", ("modernbert",)) for f in MODELS])
def test_flex_outputs_equal_huggingface(family, impl):
    """FlexAttention's compiled CPU path is inference-only: outputs."""
    _available(impl)
    with torch.no_grad():
        _check(MODELS[family](), impl, backward=False)


def test_decoding_with_a_cache_is_exact():
    """Greedy generation with a cache past the sliding window (fewer queries than keys,
    and a sliding cache's offset): the same tokens and scores as Hugging Face's sdpa."""
    model = transformers.MistralForCausalLM(mistral().config).eval()
    x = inputs(24)
    x["attention_mask"][2, 20:23] = 1  # generation pads on the left only
    name = hf.register("chunked", name="attnbench-chunked")
    out = {}
    for attn in ("sdpa", name):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            out[attn] = model.generate(**x, max_new_tokens=20, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    assert torch.equal(out["sdpa"].sequences, out[name].sequences)
    for step, (a, b) in enumerate(zip(out["sdpa"].scores, out[name].scores)):
        assert (a - b).abs().max() < 1e-4, f"step {step}: scores differ by {(a - b).abs().max():.2e}"


def test_refusals_say_why():
    name = hf.register("chunked", name="attnbench-chunked")
    x = inputs()
    softcap = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=12, attn_logit_softcapping=50.0,
    )).eval()  # fmt: skip
    dropout = mistral(attention_dropout=0.1).train()
    for why, model in (("logit softcapping", softcap), ("attention dropout in training", dropout)):
        model.set_attn_implementation(name)
        with pytest.raises(ValueError, match=why):
            model(**x)
    model = mistral()
    model.set_attn_implementation(name)
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(**x, output_attentions=True)
    packed = torch.cat([torch.arange(20), torch.arange(20)])[None]  # two sequences in one row
    with pytest.raises(ValueError, match="packed_sequence|remap_positions"):
        model(input_ids=x["input_ids"][:1], position_ids=packed, use_cache=False)
    with pytest.raises(ValueError, match="prepared attention mask"):
        model(input_ids=x["input_ids"], attention_mask=torch.ones(B, 1, N, N, dtype=torch.bool))
    sinks = hf._refusal(torch.nn.Module(), None, 0.0, {"s_aux": torch.zeros(4)})  # GPT-OSS's learned sinks
    assert "attention sinks" in sinks
    model.set_attn_implementation(hf.register("hf_longformer", name="attnbench-hflongformer"))
    with pytest.raises(attnbench.UnsupportedError, match="key_mask"):
        model(**x)  # a padded batch needs key masks
    with pytest.raises(ValueError, match="as another kind of attention"):
        hf.register("chunked", name="attnbench-flash")
    with pytest.raises(ValueError, match="unknown implementation"):
        hf.register("nope")


def test_eager_in_float64_is_not_an_oracle():
    """Why the oracle is sdpa: Hugging Face's eager attention in float64 turns a padded
    row without keys into NaN, which spreads to every token of its sample."""
    x = inputs()
    eager, _ = _run(mistral(), "eager", x, torch.float64, None)
    sdpa, _ = _run(mistral(), "sdpa", x, torch.float64, None)
    assert not torch.isfinite(eager).all() and torch.isfinite(sdpa).all()


def test_a_model_with_the_backend_pickles():
    name = hf.register("chunked", name="attnbench-chunked")
    model = mistral()
    model.set_attn_implementation(name)
    again = pickle.loads(pickle.dumps(model))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(**x).last_hidden_state, again(**x).last_hidden_state)


# ---------------------------------------------------------------------- measured inside these models
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("family", ["modernbert", "mistral"])
def test_a_measurement_inside_the_model(tmp_path, family, mode):
    """model=modernbert / mistral: the engine's pipeline on the model with the
    implementation in every layer, verified against Hugging Face's sdpa in float64;
    the baseline row is the model with Hugging Face's own attention."""
    from attnbench.config import BenchConfig
    from attnbench.sweep import measure

    shape = dict(heads=4, head_dim=16, window=16) if family == "modernbert" else dict(
        heads=4, kv_heads=2, head_dim=16, window=15, causal=True)  # fmt: skip
    base = dict(model=family, model_layers=3, seq_len=64, device="cpu", mode=mode, results_dir=str(tmp_path),
                study="m", time_budget_s=0.05, min_reps=1, max_reps=2, isolate=False,
                grad_check_seq_len=48)  # fmt: skip
    label = {"modernbert": "modernbert-base-shaped, 3 layers", "mistral": "mistral-7b-shaped, 3 layers"}[family]
    hf.CALLS.clear()
    row = measure(BenchConfig(impl="chunked", **base, **shape))
    assert row["status"] == "ok", row["reason"]
    assert row["model"] == label and row["verified"] == "model (n=48)" and row["time_ms_median"] > 0
    assert sum(hf.CALLS.values()) >= 3  # the implementation ran in the model's layers
    baseline = measure(BenchConfig(impl="sdpa", **base, **shape))  # Hugging Face's own attention
    assert baseline["status"] == "ok" and baseline["model"] == label, baseline["reason"]


def test_a_model_refuses_a_window_it_does_not_have():
    from attnbench.config import BenchConfig

    with pytest.raises(ValueError, match="model='mistral': its sliding layers have a causal window"):
        BenchConfig(model="mistral", model_layers=2, window=16).validate()
    with pytest.raises(ValueError, match="model='modernbert'.*symmetric window"):
        BenchConfig(model="modernbert", model_layers=2, window=(8, 2)).validate()
    with pytest.raises(ValueError, match="model='gpt2': unknown; choose one of: longformer, modernbert, mistral"):
        BenchConfig(model="gpt2").validate()
