"""The fused Triton implementation beyond the shared correctness cases: the custom op
eager and under torch.compile, last_config, the kernel loader, the
interpreter's small blocks (with and without a key mask), and the compiled (CUDA) path
without a GPU: every kernel is compiled for sm90, with and without a key mask, and the
CUDA launch code is run against recording stand-ins.

On the CPU the kernels run in Triton's interpreter, so sizes stay small."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, assert_grads_ok, assert_output_ok, rand_dout, rand_key_mask, rand_qkv
from fresh_python import run_fresh

import attnbench
from attnbench import Pattern
from attnbench.reference import with_key_mask

triton = pytest.importorskip("triton")
import attnbench.impls.triton_fused as tf  # noqa: E402
import triton.language as tl  # noqa: E402


def test_import_needs_no_triton():
    """The registry imports every impls module: this one must not import triton."""
    code = "import attnbench, attnbench.impls.triton_fused\nprint(attnbench.get_impl('triton').unavailable_reason())\n"
    assert "needs the 'triton' package" in run_fresh(code, blocked=("triton",))


def test_kernel_copies_coexist():
    interp, compiled = tf.kernels(True), tf.kernels(False)
    assert interp.INTERPRETED and not compiled.INTERPRETED
    assert interp is not compiled and tf.kernels(True) is interp


@pytest.mark.parametrize("key_mask", [False, True], ids=["all-keys", "key-mask"])
def test_custom_op_torch_compile_and_last_config(key_mask):
    B = 3 if key_mask else 1  # rand_key_mask: a sample of each kind
    q, k, v = rand_qkv(B, 2, 40, 16, torch.float32, requires_grad=True)
    p = Pattern(6, 2, True, (3,))
    km = rand_key_mask(B, 40) if key_mask else None

    fn = attnbench.get_impl("triton").fn  # the registry's own checks stay outside the graph

    def f(q, k, v, km):
        kw = {} if km is None else {"key_mask": km}  # as the registry calls it
        return fn(q, k, v, p, 0.25, **kw) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, km)
    cfg = tf.last_config()
    assert cfg["BLOCK_D"] == 16 and "backward" not in cfg and cfg["interpreted"] == (DEVICE == "cpu")
    if DEVICE == "cpu":
        assert cfg["BLOCK_M"] == cfg["BLOCK_N"] == tf.INTERPRETER_BLOCK
    else:  # n = 40: the fixed config, not the autotuner
        assert not cfg["autotuned"] and cfg["num_warps"] and cfg["BLOCK_M"] >= 16
    assert_output_ok(out / 2, q, k, v, p, "compiled op", scale=0.25, key_mask=km)
    assert_grads_ok(lambda *x: compiled(*x, km) / 2, q, k, v, p, "compiled op", scale=0.25, key_mask=km)
    assert tf.last_config()["backward"]["kv"]["BLOCK_N"] >= 16


@pytest.mark.parametrize("key_mask", [False, True], ids=["all-keys", "key-mask"])
def test_custom_op_opcheck(key_mask):
    q, k, v = rand_qkv(2, 2, 20, 16, torch.float32, requires_grad=True)
    args = (q, k[:, :1], v[:, :1], 2, 1, [1, 2], False, [0], 0.25)  # one key/value head, window (2, 1)
    if key_mask:
        args += (rand_key_mask(2, 20, seed=5),)
    torch.library.opcheck(torch.ops.attnbench.triton_longformer_fwd.default, args, test_utils=("test_schema",
                          "test_autograd_registration", "test_faketensor"))  # fmt: skip


def test_op_eager_autograd_matches_reference():
    """The custom op called directly, eager: batch 2, per-head dilation, head_dim 24
    (padded to 32), the last token global; outputs and gradients through its
    registered backward."""
    q, k, v = rand_qkv(2, 2, 37, 24, torch.float32, requires_grad=True)
    p = Pattern(8, (1, 3), False, (36,))
    out, lse = torch.ops.attnbench.triton_longformer_fwd(q, k, v, 4, 4, [1, 3], False, [36], 24**-0.5)
    assert not lse.requires_grad and lse.shape == (2, 2, 37, 2)  # each row's (max, 1 / sum)
    assert_output_ok(out, q, k, v, p, "eager op", scale=24**-0.5)
    op = torch.ops.attnbench.triton_longformer_fwd
    assert_grads_ok(lambda *x: op(*x, 4, 4, [1, 3], False, [36], 24**-0.5)[0], q, k, v, p, "eager op",
                    scale=24**-0.5)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreter_small_blocks(monkeypatch, dtype):
    """Blocks of 16 at n=100: many row blocks, classes of several blocks, the inner
    (unmasked) window stage, global keys in and out of windows."""
    monkeypatch.setattr(tf.kernels(True), "INTERPRETER_BLOCK", 16)
    q, k, v = rand_qkv(1, 3, 100, 16, dtype, seed=3)
    p = Pattern(64, (1, 2, 3), False, (0, 31, 99))
    assert_output_ok(attnbench.attention(q, k, v, p, impl="triton"), q, k, v, p, "blocks of 16")
    triton = lambda *x: attnbench.attention(*x, p, impl="triton")  # noqa: E731
    assert_grads_ok(triton, q, k, v, p, "blocks of 16", dout=rand_dout(q, seed=4))


def _key_mask_case(causal: bool) -> tuple[Pattern, torch.Tensor]:
    """2 query heads at dilations (1, 2) on one key/value head (read at two dilations:
    two dK/dV launches that add up), n = 64, global tokens (0, 30, 63), and a key mask
    of 3 samples: global token 30 and a few keys masked; then left padding over global
    token 0 and holes; then, causal, no key at all, else every global token masked, a
    hole wider than any window and right padding."""
    n = 64
    glob = (0, 30, 63)
    if causal:
        p = Pattern(7, (1, 2), True, glob)  # rows 0..6 of sample 1: only masked keys before them
    else:
        p = Pattern((5, 3), (1, 2), False, glob)
    km = torch.ones(3, n, dtype=torch.bool)
    km[0, [30, 40, 41, 42, 43]] = False
    km[1] = rand_key_mask(3, n, seed=7)[2].cpu()  # left padding (0..5) and holes (6 among them)
    if causal:
        km[2] = False
    else:
        km[2, list(glob)] = False
        km[2, 20:48] = False  # 28 tokens: rows 31..41 see no key at either dilation
        km[2, 56:] = False
    return p, km.to(DEVICE)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "lr5-3"])
def test_interpreter_key_mask_small_blocks(monkeypatch, causal):
    """A key mask in blocks of 16 (:func:`_key_mask_case`): outputs and gradients
    against the reference, and exactly 0 where the reference is (rows left without
    keys, their dq; masked keys' dk, dv), through the dK/dV kernels' read-add-write
    paths (global keys, several dilation groups per key/value head) and their skipped
    blocks (no key present)."""
    monkeypatch.setattr(tf.kernels(True), "INTERPRETER_BLOCK", 16)
    p, km = _key_mask_case(causal)
    (B, n), H = km.shape, 2
    q, k, v = rand_qkv(B, H, n, 16, torch.float32, seed=11, kv_heads=1)
    empty = ~with_key_mask(p.mask(n, heads=H).to(km.device), km).any(-1)  # (B, H, n) rows without keys
    assert empty.any() and empty[:, :, list(p.global_tokens)].any() == causal  # the case has what it says
    what = f"key mask {p.describe()}"
    out = attnbench.attention(q, k, v, p, impl="triton", key_mask=km)
    assert_output_ok(out, q, k, v, p, what, key_mask=km)
    assert not out[empty].any(), f"{what}: rows without keys are not 0"

    grads = {}

    def triton(q, k, v):
        for name, t in zip("qkv", (q, k, v)):
            t.register_hook(lambda g, name=name: grads.__setitem__(name, g))
        return attnbench.attention(q, k, v, p, impl="triton", key_mask=km)

    assert_grads_ok(triton, q, k, v, p, what, dout=rand_dout(q, seed=12), key_mask=km)
    assert not grads["q"][empty].any(), f"{what}: dq of rows without keys is not 0"
    for name in "kv":
        assert not grads[name].transpose(1, 2)[~km].any(), f"{what}: d{name} of masked keys is not 0"


@pytest.mark.parametrize("window, dilation", [((50, 0), 1), ((24, 24), 1), ((5, 60), 2), ((0, 0), 1), ((70, 0), 3)])
def test_kernels_visit_only_blocks_the_window_meets(monkeypatch, window, dilation):
    """Block skipping, from the kernels' own loops: every block of partners a program
    walks (keys in the forward and dQ, queries in dK/dV) meets the window of the rows
    it owns, none is walked twice, and together they hold every partner. The partners
    a block needs come from the pattern's mask, not from the kernels' bounds. A causal
    (50, 0) window is Mistral's (4095, 0) scaled down: near the start of the sequence
    most of its reach lies before the first key."""
    kern = tf.kernels(True)
    bs = 16
    monkeypatch.setattr(kern, "INTERPRETER_BLOCK", bs)
    n = 150
    p = Pattern(window, dilation, causal=window[1] == 0 and window[0] > 0)
    mask = p.mask(n)  # (n, n): no global tokens, so exactly the window
    walked: dict[str, dict[tuple, list]] = {}
    for name in ("_fwd_body", "_dq_body", "_dkdv_body"):
        body = getattr(kern, name)

        def record(accs, res, ptrs, spos, s_ok, ok, *rest, _name=name, _body=body):
            pid = tuple(int(tl.program_id(a).handle.data.reshape(-1)[0]) for a in (0, 1))
            walked.setdefault(_name, {}).setdefault(pid, []).append(spos.handle.data.reshape(-1).tolist())
            return _body(accs, res, ptrs, spos, s_ok, ok, *rest)

        monkeypatch.setattr(kern, name, record)
    q, k, v = rand_qkv(1, 1, n, 16, torch.float32, requires_grad=True)
    out = attnbench.attention(q, k, v, p, impl="triton")
    out.backward(torch.ones_like(out))
    d = dilation
    m_longest = -(-n // d)
    nb = -(-m_longest // bs)  # blocks per class: programs (r, block) in axis 0
    for name, programs in walked.items():
        for (pid, _), blocks in programs.items():
            r, o0 = pid // nb, (pid % nb) * bs
            owned = [pos for pos in range(r + d * o0, min(n, r + d * (o0 + bs)), d)]
            # partners the owned rows need: keys of owned queries, or queries of owned keys
            rel = mask[owned] if name != "_dkdv_body" else mask[:, owned].T  # (owned, n)
            need = set(rel.any(0).nonzero().flatten().tolist())
            got = [{x for x in blk if 0 <= x < n and (x - r) % d == 0} for blk in blocks]
            where = f"{name} {p.describe()} program {pid} (class {r}, rows from {o0})"
            assert all(g & need for g in got), f"{where}: walks a block outside the window: {blocks}"
            assert len({min(g) for g in got}) == len(got), f"{where}: walks a block twice"
            assert set().union(*got) >= need, f"{where}: misses partners {sorted(need - set().union(*got))}"
    assert set(walked) == {"_fwd_body", "_dq_body", "_dkdv_body"}


def test_check_reasons():
    im = attnbench.get_impl("triton")
    q = torch.zeros(1, 1, 4, 300)
    reasons = im.not_supported_reasons(Pattern(2), device="cpu", dtype=torch.float32, q=q)
    assert any("head_dim=300" in r for r in reasons)
    q, k, v = rand_qkv(1, 1, 9, 8, torch.float32)  # head_dim 8: padded to 16
    assert_output_ok(attnbench.attention(q, k, v, Pattern(2), impl="triton"), q, k, v, Pattern(2), "head_dim 8")


# ---------------------------------------------------------------------------- compiled path, no GPU
class _Recorder:
    """Stands in for a JITFunction or Autotuner: binds each launch to the kernel's
    signature (a missing or unknown argument raises) and evaluates its grid."""

    def __init__(self, fn, tuned: bool):
        self.fn, self.tuned, self.launches = fn, tuned, []
        self.best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for o in ("num_warps", "num_stages"):
                kwargs.pop(o, None)
            if self.tuned:
                assert "BLOCK_M" not in kwargs and "BLOCK_N" not in kwargs
                kwargs.update(self.best_config.kwargs)
            bound = inspect.signature(self.fn.fn).bind(*args, **kwargs).arguments
            g = grid(bound) if callable(grid) else grid
            self.launches.append((self.fn.fn.__name__, g, bound))

        return launch


@pytest.mark.parametrize("key_mask", [False, True], ids=["all-keys", "key-mask"])
@pytest.mark.parametrize("n", [300, 5000])  # fixed configs; autotuned kernels (n >= AUTOTUNE_MIN_SEQ)
def test_cuda_launch_code_binds(monkeypatch, n, key_mask):
    kern = tf.kernels(False)
    recorders = {}
    for name in dir(kern):
        obj = getattr(kern, name)
        if isinstance(obj, triton.runtime.Autotuner):
            recorders[name] = _Recorder(obj.fn, tuned=True)
        elif isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
            recorders[name] = _Recorder(obj, tuned=False)
    for name, rec in recorders.items():
        monkeypatch.setattr(kern, name, rec)
    B, H, KVH, D = 2, 4, 2, 40
    q = torch.zeros(B, H, n, D, dtype=torch.bfloat16)
    k, v = (torch.zeros(B, KVH, n, D, dtype=torch.bfloat16) for _ in range(2))
    km = torch.rand(B, n, generator=torch.Generator().manual_seed(0)) > 0.2 if key_mask else None
    out, lse = kern.forward(q, k, v, (1, 1, 2, 3), 16, 0, True, (0, 7, n - 1), 0.1, km)
    dq, dk, dv = kern.backward(out, q, k, v, out, lse, (1, 1, 2, 3), 16, 0, True, (0, 7, n - 1), 0.1, km)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape
    launches = [x for r in recorders.values() for x in r.launches]
    names = {x[0] for x in launches}
    assert names == {
        "_fwd_window_kernel", "_fwd_global_rows_kernel", "_bwd_delta_kernel", "_bwd_kv_window_kernel",
        "_bwd_q_window_kernel", "_bwd_kv_global_keys_kernel", "_bwd_q_global_rows_kernel",
    }  # fmt: skip
    for name, grid, args in launches:
        if name != "_bwd_delta_kernel":  # the key mask's own bytes as int8 flags, or None
            flags = args["KEY_OK"]
            assert flags is None if km is None else flags.dtype == torch.int8 and torch.equal(flags.bool(), km)
            assert km is None or flags.data_ptr() == km.data_ptr(), f"{name}: the key mask was copied"
        if name in ("_fwd_window_kernel", "_bwd_q_window_kernel", "_bwd_kv_window_kernel"):
            d, own = args["d"], args["BLOCK_N" if name == "_bwd_kv_window_kernel" else "BLOCK_M"]
            n_cls = -(-n // d)  # longest residue class
            assert grid == (d * -(-n_cls // own), B * args["HG"])
            assert args["BLOCK_D"] == 64 and args["HEAD_DIM"] == 40 and args["Q"].dtype == torch.bfloat16
            assert (args["H"], args["KVH"]) == (H, KVH)
        if name == "_bwd_kv_window_kernel":  # programs per key/value head, its query heads in QHEADS
            assert args["HG"] == len(args["HEADS"]) == len(args["QCNT"]) and args["GQ"] == H // KVH
            # heads (0, 1) read kv head 0 at dilation 1; heads 2 (d=2) and 3 (d=3) kv head 1, one launch each
            assert args["accumulate"] == 1 and args["DK"].dtype == torch.float32
        if name == "_bwd_kv_global_keys_kernel":
            assert grid[1] == B * KVH
    cfg = kern.LAST_CONFIG
    assert cfg["autotuned"] == (n >= tf.AUTOTUNE_MIN_SEQ)
    if cfg["autotuned"]:
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"]) == (64, 32, 3)


@pytest.mark.parametrize("accumulate", [1, 0])
def test_autotuning_leaves_accumulated_gradients_alone(monkeypatch, accumulate):
    """The dK/dV kernel adds to DK, DV when a key/value head's query heads span several
    dilation groups; the autotuner runs every config many times on those buffers before
    the launch that counts. Its real tuner, with the kernel replaced by one that adds 1
    and a benchmark that calls it 3 times per config: only the counted launch stays."""
    kern = tf.kernels(False)
    tuner = kern._bwd_kv_window_tuned
    names = tuner.fn.arg_names
    calls = []

    class AddOne:  # stands in for the compiled kernel: what accumulate does to DK, DV
        arg_names = names

        def run(self, *args, **kwargs):
            a = dict(zip(names, args))
            calls.append(kwargs["BLOCK_M"])
            for t in (a["DK"], a["DV"]):
                t.copy_(t + 1 if a["accumulate"] else torch.ones_like(t))

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(tuner, "fn", AddOne())
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setitem(tuner.__dict__, "do_bench", bench)
    dk, dv = torch.full((4,), 5.0), torch.full((4,), 5.0)
    args = {a: 0 for a in names if a not in ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "BLOCK_G", "DOT_PREC")}
    args.update(Q=torch.empty(0, dtype=torch.bfloat16), DK=dk, DV=dv, accumulate=accumulate, d=1, n_tune=8192)
    tuner.run(*args.values(), grid=(1,), HEAD_DIM=64, BLOCK_D=64, BLOCK_G=16, DOT_PREC="tf32")
    assert len(calls) > 3 * 2, "the tuner did not benchmark several configs"
    want = 6.0 if accumulate else 1.0
    assert dk.tolist() == dv.tolist() == [want] * 4, f"after tuning: dk {dk.tolist()}, dv {dv.tolist()}"


_ALL_KERNELS = ("_fwd_window_kernel", "_fwd_global_rows_kernel", "_bwd_delta_kernel", "_bwd_kv_window_kernel",
                "_bwd_kv_global_keys_kernel", "_bwd_q_window_kernel", "_bwd_q_global_rows_kernel")  # fmt: skip
_WINDOW_KERNELS = {"fwd": "_fwd_window_kernel", "kv": "_bwd_kv_window_kernel", "q": "_bwd_q_window_kernel"}


def _compile_sm90(name: str, dtype: str, head_dim: int, bm: int = 64, bn: int = 32, warps: int = 4, stages: int = 2,
                  bg: int = 16, key_mask: bool = False):  # fmt: skip
    """One kernel through Triton's whole CUDA pipeline for sm90, no GPU needed
    (tf.compile_ahead: pointers marked aligned as the launcher marks them)."""
    try:
        return tf.compile_ahead(name, dtype, head_dim, bm, bn, warps, stages, arch=90, block_g=bg, key_mask=key_mask)
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"no CUDA backend in this triton: {e}")
    except OSError as e:  # pragma: no cover - the toolchain, not the kernels
        pytest.skip(f"CUDA toolchain of this triton cannot run here: {e}")


def test_kernels_compile_for_sm90():
    """Every kernel compiles (catches what the interpreter lets through: typing,
    constexpr use), without a key mask and, all but delta's, with one; and the window
    kernels move their q, k, v tiles in 16-byte copies (a 2-byte load per element would
    cost several times the memory traffic and would show in no CPU test). head_dim 40
    is padded to 64, so the masks along it count. A key mask's flags are one more
    pointer parameter; without one, KEY_OK is a constexpr None and no parameter."""
    kern = tf.kernels(False)
    for name in _ALL_KERNELS:
        pointers = []
        for key_mask in (False, True) if "KEY_OK" in getattr(kern, name).arg_names else (False,):
            what = f"{name}{' with a key mask' if key_mask else ''}"
            compiled = _compile_sm90(name, "bf16", 40, key_mask=key_mask)
            assert compiled.asm.get("cubin"), what
            ptx = compiled.asm["ptx"]
            pointers.append(len(re.findall(r"\.param \.u64 \.ptr", ptx)))
            if name in _WINDOW_KERNELS.values():
                narrow = re.findall(r"ld\.global(?:\.\w+)*\.[bu]16\b|cp\.async\.\w+\.shared\.global[^;]*, 0x2,", ptx)
                assert not narrow, f"{what}: 2-byte global loads in the bf16 kernel: {narrow[:3]}"
                assert re.search(r"cp\.async\.cg\.shared\.global[^;]*, 0x10,", ptx), f"{what}: no 16-byte tile copies"
        assert len(pointers) == (1 if name == "_bwd_delta_kernel" else 2), name
        assert pointers[1:] in ([], [pointers[0] + 1]), f"{name}: pointer parameters without, with a mask: {pointers}"


#: each sm90 compile costs seconds: of the sweeps below the quick tier compiles the
#: untuned configs at head_dim 64 in bf16 and the two configs on either side of the
#: limit; the full tier (``make test-full``) all of them
_SWEEP = pytest.mark.full


@pytest.mark.parametrize(
    "dtype, head_dim", [("bf16", 64)] + [pytest.param(d, h, marks=_SWEEP) for d, h in
                                          [("bf16", 16), ("bf16", 256), ("fp32", 16), ("fp32", 64), ("fp32", 256)]]
)  # fmt: skip
def test_untuned_configs_fit_sm90(dtype, head_dim):
    """Short sequences, and autotuning when no tuned config fits, use _fixed(): those
    must compile and fit an H100's shared memory at every head_dim, or the call fails."""
    kern = tf.kernels(False)
    esize = 2 if dtype == "bf16" else 4
    for kind, name in _WINDOW_KERNELS.items():
        bm, bn, warps, stages = kern._fixed(tf.block_d(head_dim), esize, kind)
        compiled = _compile_sm90(name, dtype, head_dim, bm, bn, warps, stages)
        used = compiled.metadata.shared
        assert used <= kern.SMEM_LIMIT, f"{name} {dtype} head_dim {head_dim} {(bm, bn, warps, stages)}: {used} B shared"


# configs on both sides of the sm90 limit: (kind, dtype, head_dim, BLOCK_M, BLOCK_N, warps, stages, BLOCK_G)
_SMEM_QUICK = [
    ("fwd", "bf16", 256, 64, 64, 4, 3, 16),  # 224 KiB: fits, barely
    ("fwd", "bf16", 256, 128, 64, 8, 3, 16),  # 256 KiB: does not
]
_SMEM_SAMPLES = [
    ("q", "bf16", 256, 64, 64, 4, 2, 16),
    ("q", "bf16", 256, 128, 64, 8, 2, 16),
    ("kv", "bf16", 256, 32, 64, 4, 3, 16),
    ("fwd", "fp32", 64, 64, 64, 4, 2, 16),  # fp32: resident tiles twice (tf32x3)
    ("fwd", "bf16", 64, 128, 128, 8, 2, 16),
    # 33 or more global tokens: a global block of 64 streams more rows than the window
    # block of 32 (the dQ config that overflowed: 262,656 B)
    ("q", "fp32", 128, 64, 32, 4, 3, 64),
    ("q", "bf16", 64, 64, 32, 4, 3, 64),
    ("fwd", "bf16", 128, 64, 32, 4, 3, 64),
]


@pytest.mark.parametrize(
    "sample", _SMEM_QUICK + [pytest.param(s, marks=_SWEEP) for s in _SMEM_SAMPLES], ids=lambda s: "-".join(map(str, s))
)
def test_smem_estimate_bounds_the_compiler(sample):
    """The autotuner's pruning trusts smem_bytes(): it must not be below what the
    compiler allocates, and must agree with it on which side of the limit a config is."""
    kind, dtype, head_dim, bm, bn, warps, stages, bg = sample
    kern = tf.kernels(False)
    est = kern.smem_bytes(kind, bm, bn, stages, tf.block_d(head_dim), 2 if dtype == "bf16" else 4, bg)
    real = _compile_sm90(_WINDOW_KERNELS[kind], dtype, head_dim, bm, bn, warps, stages, bg).metadata.shared
    assert est >= real, f"estimate {est} B < compiled {real} B"
    assert (est <= kern.SMEM_LIMIT) == (real <= kern.SMEM_LIMIT), f"estimate {est} B, compiled {real} B"


@_SWEEP
@pytest.mark.parametrize("kind", ["q", "kv"])
def test_configs_kept_with_many_global_tokens_fit_sm90(kind):
    """fp32, head_dim 128, a global block of 64 (33 or more global tokens), backward:
    every config the pruning keeps compiles within an H100's shared memory (the forward
    at a global block of 64 is among the estimate's samples above)."""
    kern = tf.kernels(False)
    rows = {"fwd": kern.FWD_CONFIGS, "q": kern.BWD_Q_CONFIGS, "kv": kern.BWD_KV_CONFIGS}[kind]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": b}, num_warps=w, num_stages=s) for m, b, w, s in rows]
    kept = kern._prune(configs, {"Q": torch.empty(0)}, kind=kind, BLOCK_D=128, BLOCK_G=64)
    assert kept
    for c in kept:
        bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        used = _compile_sm90(_WINDOW_KERNELS[kind], "fp32", 128, bm, bn, w, s, bg=64).metadata.shared
        assert used <= kern.SMEM_LIMIT, f"{kind} {(bm, bn, w, s)}: {used} B shared"


@pytest.mark.parametrize("esize", [2, 4])
def test_prune_always_leaves_a_config_that_fits(esize):
    """Every head_dim the implementation accepts keeps at least one tuned config, or
    falls back to the untuned one; nothing that the estimate says overflows survives."""
    kern = tf.kernels(False)
    q = torch.empty(0, dtype=torch.bfloat16 if esize == 2 else torch.float32)
    for kind, rows in (("fwd", kern.FWD_CONFIGS), ("kv", kern.BWD_KV_CONFIGS), ("q", kern.BWD_Q_CONFIGS)):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": b}, num_warps=w, num_stages=s) for m, b, w, s in rows]
        for head_dim in (16, 24, 40, 64, 96, 128, 200, 256):
            bd = tf.block_d(head_dim)
            kept = kern._prune(configs, {"Q": q}, kind=kind, BLOCK_D=bd)
            assert kept, (kind, head_dim)
            for c in kept:
                bm, bn, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
                assert kern.smem_bytes(kind, bm, bn, s, bd, esize) <= kern.SMEM_LIMIT, (kind, head_dim, c)
    # fp32 at head_dim 256: no tuned forward config fits; the untuned one is used
    fwd = [triton.Config({"BLOCK_M": m, "BLOCK_N": b}, num_warps=w, num_stages=s) for m, b, w, s in kern.FWD_CONFIGS]
    kept = kern._prune(fwd, {"Q": torch.empty(0)}, kind="fwd", BLOCK_D=256)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == [
        kern._fixed(256, 4, "fwd")
    ]


def test_no_interpret_leak():
    """Loading the interpreted copy sets TRITON_INTERPRET only while it is imported."""
    before = os.environ.get("TRITON_INTERPRET")
    tf.kernels(True)
    tf.kernels(False)
    assert os.environ.get("TRITON_INTERPRET") == before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_autotuned_kernels_match_reference(dtype):
    """n >= AUTOTUNE_MIN_SEQ takes the autotuned kernels, which the correctness cases
    (n <= 1000) never reach: one such case forward and backward, with global tokens
    (every kernel launches), head_dim 128 in bf16 (64 in fp32), two query heads at
    dilations 2 and 1 on one key/value head (the dK/dV kernel's tuned launches add up),
    and in bf16 a key mask (left padding and holes)."""
    if DEVICE != "cuda":
        pytest.skip("the autotuned kernels run only on CUDA; in the interpreter n = 4096 would take minutes")
    n, D = tf.AUTOTUNE_MIN_SEQ, 128 if dtype == torch.bfloat16 else 64
    p = Pattern(512, (2, 1), False, (0, n // 2 - 1, n - 1))
    q, k, v = rand_qkv(1, 2, n, D, dtype, kv_heads=1)
    km = rand_key_mask(3, n)[2:] if dtype == torch.bfloat16 else None  # the kind with every gap
    what = f"triton autotuned n={n}{' key mask' if km is not None else ''}"
    out = attnbench.attention(q, k, v, p, impl="triton", key_mask=km)
    assert tf.last_config()["autotuned"]
    assert_output_ok(out, q, k, v, p, what, key_mask=km)
    assert_grads_ok(lambda *x: attnbench.attention(*x, p, impl="triton", key_mask=km), q, k, v, p, what,
                    key_mask=km)  # fmt: skip


def test_resources_script_reports_each_config():
    """scripts/triton_resources.py: one row per window kernel, shared memory and fit."""
    pytest.importorskip("triton.backends.nvidia", reason="no CUDA backend in this triton")
    script = Path(__file__).resolve().parent.parent / "scripts" / "triton_resources.py"
    cmd = [sys.executable, str(script), "--head-dims", "64", "--dtypes", "bf16", "--configs", "fixed"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("bf16")]
    assert [row[2] for row in rows] == ["fwd", "kv", "q"], r.stdout
    assert all("yes" in row for row in rows), r.stdout
