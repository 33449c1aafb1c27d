"""Registry behaviour, lazy imports, and the errors users see."""

from __future__ import annotations

import pytest
import torch
from fresh_python import run_fresh

import attnbench
from attnbench import Pattern, UnsupportedError
from attnbench import registry as reg


def test_available_impls_is_the_one_filter(throwaway):
    throwaway("gpu_only", devices=("cuda",))
    throwaway("absent", probe=lambda: "needs the 'zzz' package (not installed)")
    throwaway("bf16_only", dtypes=(torch.bfloat16,))
    every = [im.name for im in attnbench.available_impls()]
    on_cpu = [im.name for im in attnbench.available_impls("cpu")]
    fp32_cpu = [im.name for im in attnbench.available_impls("cpu", torch.float32)]
    assert "absent" not in every and "gpu_only" in every and "gpu_only" not in on_cpu
    assert "bf16_only" in on_cpu and "bf16_only" not in fp32_cpu and "chunked" in fp32_cpu
    assert every == [n for n in attnbench.list_impls() if n in every]  # the registry's order


def test_last_call_reports_through_the_impl(throwaway):
    """What an implementation chose comes back through its declared report, or its
    declared tunables: never through module globals."""
    throwaway("plain", tunables={"block": 64})
    throwaway("reporting", report=lambda: {"setup_ms": 1.5, "tunables": {"block": 32}})
    assert attnbench.get_impl("plain").last_call() == {"tunables": {"block": 64}}
    assert attnbench.get_impl("reporting").last_call() == {"setup_ms": 1.5, "tunables": {"block": 32}}


def test_builtin_impls_registered():
    names = attnbench.list_impls()
    assert {"naive", "loop", "chunked"} <= set(names)
    rows = {r["name"]: r for r in attnbench.describe()}
    assert rows["chunked"]["available"] and "backward" in rows["chunked"]["features"]
    for r in rows.values():  # every unavailable implementation says why
        assert r["available"] or r["reason"], r


def test_import_is_lazy():
    """Importing attnbench and registering the implementations loads no optional
    package; only probing availability (describe) or a call may import one."""
    code = (
        "import sys, attnbench\n"
        "assert 'triton' not in sys.modules and 'cupy' not in sys.modules, 'eager import'\n"
        "eager = [m for m in sys.modules if m.startswith('attnbench.impls.')]\n"
        "assert not eager, f'implementations imported eagerly: {eager}'\n"
        "attnbench.list_impls()\n"
        "bad = [m for m in ('triton', 'cupy', 'flash_attn', 'transformers') if m in sys.modules]\n"
        "assert not bad, f'registering implementations imported {bad}'\n"
    )
    run_fresh(code)


def test_duplicate_name_is_an_error(throwaway):
    throwaway("dup_impl")
    with pytest.raises(ValueError, match="'dup_impl' is already registered"):
        throwaway("dup_impl")
    with pytest.raises(ValueError, match="already registered"):
        attnbench.register("chunked")(lambda *a: None)


def test_unknown_feature_in_registration():
    with pytest.raises(ValueError, match=r"unknown feature\(s\) \['sparse'\]"):
        attnbench.register("x", features=("sparse",))


def test_unsupported_lists_every_reason(throwaway):
    throwaway("bare", devices=("cuda",), dtypes=(torch.float16,), features=())
    q = k = v = torch.randn(1, 2, 16, 8, requires_grad=True)
    with pytest.raises(UnsupportedError) as e:
        attnbench.attention(q, k, v, Pattern(4, (1, 2), True, (0,)), impl="bare")
    msg = str(e.value)
    for part in (
        "device 'cpu' not supported",
        "dtype fp32 not supported",
        "'dilation'",
        "'per_head_dilation'",
        "'global_tokens'",
        "'causal'",
        "'backward'",
    ):
        assert part in msg, msg
    assert len(e.value.reasons) == 7


def test_asymmetric_window_is_a_feature(throwaway):
    """A non-causal window with unequal sides needs the feature; a causal window is
    (left, 0) for every implementation that declares causal."""
    assert "asymmetric_window" in reg.required_features(Pattern((3, 1)))
    assert "asymmetric_window" not in reg.required_features(Pattern((3, 1), causal=True))
    assert "asymmetric_window" not in reg.required_features(Pattern((2, 2)))
    throwaway("symmetric_only", features=("causal", "backward"))
    q = torch.randn(1, 1, 6, 8)
    with pytest.raises(UnsupportedError, match="feature 'asymmetric_window' not supported"):
        attnbench.attention(q, q, q, Pattern((3, 1)), impl="symmetric_only")
    hf = attnbench.get_impl("hf_longformer")
    assert "feature 'asymmetric_window' not supported" in hf.not_supported_reasons(
        Pattern((3, 1)), device="cpu", dtype=torch.float32
    )


def test_grouped_query_heads_native_or_repeated(throwaway):
    """k, v with fewer heads reach a native implementation as they are; the others get
    them repeated per query head, inside the call, and the memory estimate counts it."""
    seen = {}

    def spy(name):
        def fn(q, k, v, pattern, scale):
            seen[name] = (k.shape[1], v.shape[1])
            return q.clone()

        return fn

    throwaway("gqa_native", spy("gqa_native"), native_gqa=True, memory=lambda *a: 1000.0)
    throwaway("gqa_repeat", spy("gqa_repeat"), memory=lambda *a: 1000.0)
    q, k, v = torch.randn(1, 8, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    for name in ("gqa_native", "gqa_repeat"):
        attnbench.attention(q, k, v, Pattern(2), impl=name)
    assert seen == {"gqa_native": (2, 2), "gqa_repeat": (8, 8)}
    native, repeat = attnbench.get_impl("gqa_native"), attnbench.get_impl("gqa_repeat")
    args = (1, 8, 2, 5, 4, 4, Pattern(2))
    assert native.estimate_memory(*args, False) == 1000.0
    assert repeat.estimate_memory(*args, False) == 1000.0 + 2 * 8 * 5 * 4 * 4  # the repeated k and v
    assert repeat.estimate_memory(*args, True) == 1000.0 + 2 * 2 * 8 * 5 * 4 * 4  # and their gradients
    assert {r["name"]: r["gqa"] for r in attnbench.describe()}["gqa_native"] == "native"


def test_unavailable_probe_is_a_reason(throwaway):
    throwaway("needs_pkg", probe=lambda: "needs the 'nonexistent' package (not installed)")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(UnsupportedError, match="nonexistent"):
        attnbench.attention(q, q, q, Pattern(2), impl="needs_pkg")
    assert {r["name"]: r for r in attnbench.describe()}["needs_pkg"]["available"] is False


def test_no_silent_fallback(throwaway):
    """An implementation that cannot run raises: it is never replaced by another."""
    throwaway("fp16_only", dtypes=(torch.float16,))
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(UnsupportedError):
        attnbench.attention(q, q, q, Pattern(2), impl="fp16_only")


def test_output_contract_enforced(throwaway):
    throwaway("bad_shape", lambda q, k, v, pattern, scale: q[..., :1])
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="returned shape"):
        attnbench.attention(q, q, q, Pattern(2), impl="bad_shape")


def test_unknown_impl_names_choices():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="impl='nope': unknown implementation; choose one of: .*chunked"):
        attnbench.attention(q, q, q, Pattern(2), impl="nope")


@pytest.mark.parametrize(
    "shapes, dtypes, match",
    [
        (((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4)), None, "k, v both .batch, kv_heads, seq, head_dim."),
        (((1, 6, 8, 4), (1, 4, 8, 4), (1, 4, 8, 4)), None, "kv_heads dividing heads"),  # 4 does not divide 6
        (((1, 2, 8, 4), (1, 4, 8, 4), (1, 4, 8, 4)), None, "kv_heads dividing heads"),  # more kv heads than q
        (((1, 4, 8, 4), (2, 2, 8, 4), (2, 2, 8, 4)), None, "kv_heads dividing heads"),  # batch differs
        (((1, 4, 8, 4), (1, 2, 8, 4), (1, 2, 8, 8)), None, "kv_heads dividing heads"),  # k and v differ
        (((2, 8, 4), (2, 8, 4), (2, 8, 4)), None, "expected 4 dims"),
        (None, (torch.float32, torch.float64, torch.float32), "same dtype"),
        (None, (torch.int64, torch.int64, torch.int64), "floating dtype"),
    ],
)
def test_bad_inputs(shapes, dtypes, match):
    shapes = shapes or ((1, 2, 8, 4),) * 3
    dtypes = dtypes or (torch.float32,) * 3
    q, k, v = (torch.zeros(s, dtype=d) for s, d in zip(shapes, dtypes))
    with pytest.raises(ValueError, match=match):
        attnbench.attention(q, k, v, Pattern(2))


def test_mismatched_devices():
    q = torch.zeros(1, 1, 4, 8)
    k = torch.zeros(1, 1, 4, 8, device="meta")
    with pytest.raises(ValueError, match="same device"):
        attnbench.attention(q, k, q, Pattern(2))


def test_pattern_checked_against_input():
    q = torch.zeros(1, 3, 10, 8)
    with pytest.raises(ValueError, match="3 entries but the input has heads=3|heads=3"):
        attnbench.attention(q, q, q, Pattern(2, dilation=(1, 2)))
    with pytest.raises(ValueError, match="0 <= g < seq_len=10"):
        attnbench.attention(q, q, q, Pattern(2, global_tokens=(10,)))
    with pytest.raises(ValueError, match="expected attnbench.Pattern"):
        attnbench.attention(q, q, q, {"window": 2})


def test_entry_point_plugins_load(monkeypatch):
    """Other packages add implementations through the 'attnbench.impls' group."""
    import importlib.metadata as md

    class EP:
        name = "plugin"

        def load(self):
            @attnbench.register("from_plugin")
            def fn(q, k, v, pattern, scale):
                return q

    monkeypatch.setattr(md, "entry_points", lambda group=None: [EP()] if group == "attnbench.impls" else [])
    monkeypatch.setattr(reg, "_LOADED", False)
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    assert "from_plugin" in attnbench.list_impls() and "chunked" in attnbench.list_impls()


def test_a_feature_a_device_refuses_is_refused_there_only(throwaway):
    """unsupported_on: declared data, refused by not_supported_reasons before any call."""
    throwaway("no_cpu_backward", unsupported_on={"cpu": {"backward": "inference only here"}})
    im = attnbench.get_impl("no_cpu_backward")
    cpu = im.not_supported_reasons(Pattern(4), device="cpu", dtype=torch.float32, backward=True)
    assert cpu == ["feature 'backward' not supported on cpu: inference only here"]
    assert not im.not_supported_reasons(Pattern(4), device="cpu", dtype=torch.float32)
    assert not im.not_supported_reasons(Pattern(4), device="cuda", dtype=torch.float32, backward=True)
    with pytest.raises(ValueError, match="unknown feature"):
        attnbench.register("bad_limit", unsupported_on={"cpu": {"training": "no"}})


def test_describe_shows_each_implementations_caveats(throwaway):
    """From the declared data: a feature a device refuses, Triton's interpreter on the CPU."""
    throwaway("limited", unsupported_on={"cpu": {"backward": "inference only here"}})
    throwaway("interpreted", interpreted_on_cpu=True)
    rows = {r["name"]: r for r in attnbench.describe()}
    assert rows["limited"]["caveats"] == ["cpu: no backward: inference only here"]
    assert "Triton's interpreter (TRITON_INTERPRET=1)" in rows["interpreted"]["caveats"][0]
    assert rows["chunked"]["caveats"] == []
    assert any("inference-only" in c for c in rows["flex"]["caveats"])
    assert any("interpreter" in c for c in rows["triton"]["caveats"])


def test_the_describe_command_never_hides_the_describe_function():
    """Importing the command's module leaves attnbench.describe the function (a submodule
    named describe would replace it), and the command prints the table with the caveats."""
    code = (
        "import attnbench, attnbench.catalog, attnbench.__main__\n"
        "from attnbench import registry\n"
        "assert attnbench.describe is registry.describe, attnbench.describe\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('attnbench.describe') is None\n"
        "print(attnbench.catalog.table())\n"
    )
    out = run_fresh(code)
    assert out.splitlines()[0].split()[:2] == ["name", "available"]
    assert "cpu: no backward: FlexAttention's compiled CPU path is inference-only" in out
