"""attnbench.hf: the implementations inside Hugging Face's Longformer and LED, proven
equal to Hugging Face's own attention on small models built from configs (random
weights, no download), outputs and the gradient of every parameter, under the
verification policy: the unpatched model in float64 is the oracle, in float32 the
control."""

from __future__ import annotations

import copy

import pytest
import torch
from fresh_python import run_fresh

import attnbench
from attnbench.verify import judge

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention  # noqa: E402

import attnbench.hf as hf  # noqa: E402

#: implementations that run here with global tokens and backward; flex's CPU path is inference only
IMPLS = ["naive", "loop", "chunked", "sdpa", "hf_longformer", "flex", "triton"]
B, N = 3, 27  # 27 tokens: padded by Hugging Face to a multiple of the window


def _available(impl: str, backward: bool = True) -> None:
    """Skips unless ``impl`` runs here on the CPU in float32, where these models run."""
    if impl not in {im.name for im in attnbench.available_impls("cpu", torch.float32)}:
        why = attnbench.get_impl(impl).unavailable_reason() or "it does not run on the CPU in fp32"
        pytest.skip(f"{impl} unavailable here: {why}")
    if backward and impl == "flex":
        pytest.skip("FlexAttention's compiled CPU path is inference-only: no gradients to compare")


def longformer(windows=(4, 8)) -> torch.nn.Module:
    cfg = transformers.LongformerConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=len(windows), num_attention_heads=2, intermediate_size=37,
        attention_window=list(windows), max_position_embeddings=64, pad_token_id=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LongformerModel(cfg).eval()


def led() -> torch.nn.Module:
    cfg = transformers.LEDConfig(
        vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, attention_window=[4, 8],
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, pad_token_id=1, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LEDModel(cfg).eval()


def inputs(globals_per_sample=((0, 13), (2,), ()), lengths=(27, 19, 23)) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (B, N), generator=g)
    mask = (torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]).long()  # right padding
    ids = ids.masked_fill(mask == 0, 1)
    glob = torch.zeros(B, N, dtype=torch.long)
    for b, positions in enumerate(globals_per_sample):
        glob[b, list(positions)] = 1
    return {"input_ids": ids, "attention_mask": mask, "global_attention_mask": glob}


def _run(model, x: dict, dtype: torch.dtype, cotangent: torch.Tensor | None):
    """(hidden states of the real tokens, {parameter: gradient}) of ``model`` in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    if "decoder_input_ids" in x:  # LED: the encoder is what attnbench patches
        out = model.get_encoder()(**{k: v for k, v in x.items() if k != "decoder_input_ids"}).last_hidden_state
    else:
        out = model(**x).last_hidden_state
    real = x["attention_mask"].bool()
    hidden = out[real]  # (real tokens, E)
    if cotangent is None:
        return hidden, {}
    (hidden * cotangent.to(dtype)).sum().backward()
    return hidden, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _check(model, x: dict, impl: str, backward: bool = True, patterns=None) -> None:
    real = int(x["attention_mask"].sum())
    cot = torch.randn(real, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) if backward else None
    want, want_grads = _run(model, x, torch.float64, cot)  # the oracle: Hugging Face in float64
    control, control_grads = _run(model, x, torch.float32, cot)  # Hugging Face in float32
    got, got_grads = _run(hf.patch(copy.deepcopy(model), impl=impl, patterns=patterns), x, torch.float32, cot)
    verdict = judge(got, want, control, what=f"{impl}: hidden states")
    assert verdict.ok, str(verdict)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        # Hugging Face in float64 gets NaN in the gradients of what only padded rows touch
        # (finfo.min added twice to their scores is -inf; a fully masked softmax row is NaN
        # in the backward): compare where the oracle is finite; attnbench's are finite everywhere
        ok = torch.isfinite(want_grads[name])
        assert torch.isfinite(got_grads[name]).all(), f"{impl}: d{name} is not finite"
        verdict = judge(got_grads[name][ok], want_grads[name][ok], control_grads[name][ok], what=f"{impl}: d{name}")
        assert verdict.ok, str(verdict)


@pytest.mark.parametrize("impl", IMPLS)
def test_longformer_with_global_tokens_padding_and_per_layer_windows(impl):
    """Different global positions per sample (one sample with none), right padding of
    different lengths, windows 4 and 8 in the two layers."""
    _available(impl, backward=impl != "flex")
    with torch.no_grad() if impl == "flex" else torch.enable_grad():
        _check(longformer(), inputs(), impl, backward=impl != "flex")


@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_longformer_without_global_attention(impl):
    x = inputs()
    del x["global_attention_mask"]
    _check(longformer(), x, impl)


@pytest.mark.parametrize("impl", ["chunked", "loop"])
def test_led_encoder(impl):
    x = inputs()
    x["decoder_input_ids"] = x["input_ids"][:, :5]
    _check(led(), x, impl)


def test_patch_and_unpatch_are_exact_and_reversible():
    model = longformer()
    layers = hf.patched_layers(model)
    assert len(layers) == 2 and all(type(layer) is LongformerSelfAttention for layer in layers)
    hf.patch(model, impl="chunked")
    assert all(type(layer) is hf.AttnbenchLongformerSelfAttention for layer in layers)
    assert all(layer._attnbench["impl"] == "chunked" for layer in layers)
    assert [layer._attnbench["window"] for layer in layers] == [4, 8]  # each layer's own window
    hf.unpatch(model)
    assert all(type(layer) is LongformerSelfAttention and "_attnbench" not in vars(layer) for layer in layers)


def test_samples_are_grouped_once_per_forward():
    """Every layer gets the same masks: the grouping (a device sync on CUDA) runs once.
    With key masks every sample keeps Hugging Face's padded length (27 -> 32, a multiple
    of the largest window) and is grouped by its global positions; without, by length."""
    x = inputs()
    for impl, groups in (("chunked", {(32, (0, 13)): [0], (32, (2,)): [1], (32, ()): [2]}),
                         ("hf_longformer", {(27, (0, 13)): [0], (19, (2,)): [1], (23, ()): [2]})):  # fmt: skip
        model = hf.patch(longformer(), impl=impl)
        hf._GROUPS.clear()
        with torch.no_grad():
            model(**x)
        ((_, _, got),) = hf._GROUPS.values()  # one entry for the two layers
        assert got == groups, impl


def test_left_padding_and_holes_with_key_masks():
    """Masks with holes anywhere (Hugging Face's own tests use random masks) and left
    padding are computed exactly by an implementation with key masks."""
    x = inputs()
    x["attention_mask"] = torch.ones(B, N, dtype=torch.long)
    x["attention_mask"][1, :6] = 0  # left padding
    x["attention_mask"][2, 3:5] = 0  # holes
    x["attention_mask"][2, 17:23] = 0
    x["global_attention_mask"][2] = 0
    x["global_attention_mask"][2, 9] = 1
    for impl in ("chunked", "naive"):
        _check(longformer(), x, impl)
    x["decoder_input_ids"] = x["input_ids"][:, :5]
    _check(led(), x, "chunked")


def test_a_mask_changed_in_place_is_never_served_stale_groups():
    """The grouping is reused only for masks equal in every entry: a layer called again
    with a mask tensor changed in place computes with the new mask."""
    x = inputs()
    model = hf.patch(longformer(), impl="chunked")
    with torch.no_grad():
        model(**x)
        x["attention_mask"][0, 20:] = 0  # in place: the same tensor, other values
        x["global_attention_mask"][1, 2] = 0
        got = model(**x).last_hidden_state
        fresh = hf.patch(longformer(), impl="chunked")
        hf._GROUPS.clear()
        want = fresh(**{k: v.clone() for k, v in x.items()}).last_hidden_state
    assert torch.equal(got, want)


def test_a_patched_model_saves_and_loads(tmp_path):
    """torch.save of the whole patched model loads as a patched model; save_pretrained
    keeps Hugging Face's weights, and the model from_pretrained (unpatched) patches again
    to the same outputs."""
    x = inputs()
    model = hf.patch(longformer(), impl="chunked")
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(type(layer) is hf.AttnbenchLongformerSelfAttention for layer in hf.patched_layers(again))
    model.save_pretrained(tmp_path / "pretrained")
    loaded = transformers.LongformerModel.from_pretrained(tmp_path / "pretrained").eval()
    assert all(type(layer) is LongformerSelfAttention for layer in hf.patched_layers(loaded))
    with torch.no_grad():
        want = model(**x).last_hidden_state
        assert torch.equal(again(**x).last_hidden_state, want)
        assert torch.equal(hf.patch(loaded, impl="chunked")(**x).last_hidden_state, want)


def test_refusals_say_why():
    x = inputs()
    model = hf.patch(longformer(), impl="chunked")
    with pytest.raises(ValueError, match="output_attentions=True"):
        model(**x, output_attentions=True)
    dropout = longformer()
    dropout.config.attention_probs_dropout_prob = 0.1
    for layer in hf.patched_layers(dropout):
        layer.dropout = 0.1
    with pytest.raises(ValueError, match="attention dropout in training mode"):
        hf.patch(dropout.train(), impl="chunked")(**x)
    left = dict(x, attention_mask=x["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="need an implementation with key masks"):
        hf.patch(longformer(), impl="hf_longformer")(**left)
    with pytest.raises(attnbench.UnsupportedError, match="dilation"):
        hf.patch(longformer(), impl="hf_longformer", patterns={0: {"dilation": 2}})(**x)
    with pytest.raises(ValueError, match="unknown key"):
        hf.patch(longformer(), impl="chunked", patterns={0: {"stride": 2}})


def test_patterns_add_dilation_and_causal_windows():
    """What Hugging Face cannot express, per layer: the patched model equals a float64
    run of the same patched model (the oracle here is attnbench's reference)."""
    model = longformer()
    x = inputs()
    patterns = {0: {"dilation": (1, 2)}, 1: {"window": 6, "causal": True}}
    ref = hf.patch(copy.deepcopy(model), impl="naive", patterns=patterns)
    got = hf.patch(copy.deepcopy(model), impl="chunked", patterns=patterns)
    want, _ = _run(ref, x, torch.float64, None)
    control, _ = _run(ref, x, torch.float32, None)
    hidden, _ = _run(got, x, torch.float32, None)
    assert judge(hidden, want, control).ok
    plain, _ = _run(longformer(), x, torch.float64, None)
    assert (plain - want).abs().max() > 1e-3  # the patterns changed the model


def test_char_lm_preset():
    schedule = hf.char_lm(num_layers=12, heads=8)
    windows = [schedule(i)["window"] for i in range(12)]
    assert windows[0] == 32 and windows[-1] == 512 and windows == sorted(windows)
    assert all(w % 2 == 0 for w in windows)
    assert schedule(0)["dilation"] == 1 and schedule(11)["dilation"] == (3, 3, 1, 1, 1, 1, 1, 1)


# ---------------------------------------------------------------------- measured inside a model
def _model_cfg(tmp_path, **kw):
    from attnbench.config import BenchConfig

    base = dict(model_layers=1, seq_len=64, window=8, heads=2, head_dim=16, global_tokens=[0], device="cpu",
                time_budget_s=0.05, min_reps=2, max_reps=3, isolate=False)  # fmt: skip
    base.update(results_dir=str(tmp_path), study="m")
    return BenchConfig(**{**base, **kw})


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_a_measurement_inside_the_model(tmp_path, mode):
    from attnbench.sweep import measure

    row = measure(_model_cfg(tmp_path, impl="chunked", mode=mode))
    assert row["status"] == "ok", row["reason"]
    assert row["model"] == "longformer-base-shaped, 1 layers" and row["verified"] == "model (n=64)"
    assert row["flops"] is None and row["time_ms_median"] > 0 and row["peak_mem_bytes"] > 0
    baseline = measure(_model_cfg(tmp_path, impl="hf_longformer", mode=mode))  # the unpatched model
    assert baseline["status"] == "ok" and baseline["verified"] == "model (n=64)", baseline["reason"]


def test_a_wrong_implementation_inside_the_model_is_caught(tmp_path, throwaway):
    from attnbench.sweep import measure

    throwaway("off", lambda q, k, v, p, s: attnbench.get_impl("naive").fn(q, k, v, p, s) * 1.01)
    row = measure(_model_cfg(tmp_path, impl="off"))
    assert row["status"] == "wrong" and "model output, n=64" in row["reason"]


def test_transformers_stays_optional():
    code = "import attnbench\ntry:\n    import attnbench.hf\nexcept ImportError as e:\n    print(e)\n"
    assert "pip install 'attnbench[hf]'" in run_fresh(code, blocked=("transformers",))


def test_an_unknown_implementation_is_refused_when_patching():
    """At patch (and register) time, with the registry's names; the model is left as it was."""
    model = longformer()
    with pytest.raises(ValueError, match=r"impl='nonexistent': unknown implementation; choose one of: .*chunked"):
        hf.patch(model, impl="nonexistent")
    assert all(type(layer) is LongformerSelfAttention for layer in hf.patched_layers(model))
    with pytest.raises(ValueError, match=r"impl='nonexistent': unknown implementation"):
        hf.register(impl="nonexistent")
