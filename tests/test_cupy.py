"""The ``cupy`` implementation (raw CUDA banded kernels, impls/_banded.cu).

Without a GPU the kernels still get checked: ``_banded.cu`` is compiled as host C++
(with ``BANDED_HOST_EMULATION``) into a small shared library in which every thread
block runs as 256 std::threads sharing the ``__shared__`` arrays and
``__syncthreads`` is a ``std::barrier``. That runs the kernels' own index arithmetic,
guards and staging on the CPU, through the same Python code path (``banded_attention``)
that CuPy drives on a GPU. Those tests skip when no C++20 compiler is found. Where nvcc
is installed, the device build is compiled for sm90 too (no spills, shared memory in
bounds). The GPU tests run where the suite runs on CUDA (``ATTNBENCH_TEST_DEVICE=cuda``,
as gpu_check runs it) and the implementation is available; elsewhere they skip, saying why.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest
import torch
from attnbench.impls import cupy_banded as cb
from conftest import DEVICE, assert_grads_ok, assert_output_ok, impl_or_skip

import attnbench
from attnbench import Pattern

# ---------------------------------------------------------------- host emulation

PRELUDE = r"""
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
static std::barrier<>* g_bar = nullptr;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __syncthreads() g_bar->arrive_and_wait()
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
#define BANDED_HOST_EMULATION
"""

LAUNCH = r"""
float half_bits_to_float(unsigned short b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
unsigned short float_to_half_bits(float v) {
    _Float16 h = (_Float16)v;
    unsigned short b;
    std::memcpy(&b, &h, 2);
    return b;
}
// 256 threads walk the grid block by block; the barrier after each block keeps the
// blocks apart, since the "shared" arrays are statics reused by the next block.
template <class F> static void launch(int gx, int gy, int gz, F f) {
    std::barrier<> bar(256);
    g_bar = &bar;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < 256; ++t)
        ts.emplace_back([=, &bar] {
            threadIdx = {t % 16, t / 16, 0};
            for (int z = 0; z < gz; ++z)
                for (int y = 0; y < gy; ++y)
                    for (int x = 0; x < gx; ++x) {
                        blockIdx = {(unsigned)x, (unsigned)y, (unsigned)z};
                        f();
                        bar.arrive_and_wait();
                    }
        });
    for (auto& th : ts) th.join();
}
"""

QK_WRAPPER = r"""
extern "C" void {sym}(int gx, int gy, int gz, const void* a, const void* x, float* s, const int* dil,
                      const unsigned char* skip, int H, int n, int D, int W, int off, int ld,
                      float alpha, float fill) {{
    launch(gx, gy, gz, [=] {{ {name}((const {t}*)a, (const {t}*)x, s, dil, skip, H, n, D, W, off, ld, alpha, fill); }});
}}
"""

MV_WRAPPER = r"""
extern "C" void {sym}(int gx, int gy, int gz, const float* p, const void* x, void* out, const int* dil,
                      int H, int n, int D, int W, int off, int ld, float alpha) {{
    launch(gx, gy, gz, [=] {{ {name}(p, (const {t}*)x, ({o}*)out, dil, H, n, D, W, off, ld, alpha); }});
}}
"""


def _symbol(name: str) -> str:
    return "emu_" + re.sub(r"\W+", "_", name).strip("_")


def _emulation_source() -> str:
    parts = [PRELUDE, cb.SOURCE.read_text(), LAUNCH]
    for name in cb.name_expressions():
        kind, t, o = re.fullmatch(r"(\w+)<(\w+)(?:, (\w+))?>", name).groups()
        tmpl = QK_WRAPPER if kind == "band_qk" else MV_WRAPPER
        parts.append(tmpl.format(sym=_symbol(name), name=name, t=t, o=o))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def emu_launch(tmp_path_factory):
    """A launcher (see ``cupy_banded.Launcher``) running the kernels on CPU tensors."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or clang++) for the host emulation of the CUDA kernels")
    d = tmp_path_factory.mktemp("banded_emu")
    flags = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread"]
    probe = d / "probe.cpp"
    probe.write_text(PRELUDE + "_Float16 h; void f() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    if subprocess.run([*flags, "-o", str(d / "probe.so"), str(probe)], capture_output=True).returncode:
        pytest.skip(f"{cxx} lacks C++20 <barrier> or _Float16, needed by the host emulation")
    src = d / "emu.cpp"
    src.write_text(_emulation_source())
    lib_path = d / "emu.so"
    r = subprocess.run([*flags, "-o", str(lib_path), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, f"_banded.cu does not compile as host C++:\n{r.stderr[-4000:]}"
    lib = ctypes.CDLL(str(lib_path))
    conv = {"p": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float}
    known = set(cb.name_expressions())

    def launch(name, grid, args, device):
        assert name in known, f"{name} is launched but not in name_expressions(): it would not be compiled"
        assert device.type == "cpu"
        getattr(lib, _symbol(name))(*(ctypes.c_int(g) for g in grid), *(conv[k](v) for k, v in args))

    return launch


def _keys(n, d, W, off):
    i = torch.arange(n).view(-1, 1)
    c = torch.arange(W).view(1, -1)
    j = i + d * (c - off)
    return j, (j >= 0) & (j < n)


KERNEL_CASES = [
    # B, H, n, D, w, causal, per-head dilations
    (2, 2, 37, 16, 6, False, (1, 2)),
    (1, 2, 130, 70, 64, False, (1, 3)),  # two head-dim tiles, two column tiles, D % 32 != 0
    (1, 2, 90, 33, 70, True, (2, 5)),  # W = 71 > 64, n not divisible by d
    (1, 1, 7, 5, 4, False, (9,)),  # d > n: classes without tokens
    (1, 1, 5, 3, 8, False, (1,)),  # band wider than the sequence
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"n{c[2]}-D{c[3]}-w{c[4]}-{'c' if c[5] else 'nc'}-d{c[6]}")
def test_kernels_match_their_definition(emu_launch, case, dtype):
    """band_qk, band_av, band_tv against the formulas, band_tv as the scatter (transpose)
    of band_av; garbage at band entries without a key must be ignored."""
    B, H, n, D, w, causal, dils = case
    W, off = w + 1, (w if causal else w // 2)
    G = 3  # extra columns after the band (the global-key columns' room)
    torch.manual_seed(0)
    a, x = torch.randn(B, H, n, D).to(dtype), torch.randn(B, H, n, D).to(dtype)
    skip = (torch.rand(n) < 0.2).to(torch.uint8)
    band = cb.Band(dils=dils, dil_t=torch.tensor(dils, dtype=torch.int32), skip=skip, off=off, width=W)

    s = torch.full((B, H, n, W + G), 123.0)
    cb.band_qk(emu_launch, a, x, s, band, 0.7, float("-inf"), skip=True)
    assert (s[..., W:] == 123.0).all(), "band_qk wrote past the band"
    p = torch.randn(B, H, n, W + G)  # random everywhere, also where there is no key
    out_av = torch.empty(B, H, n, D, dtype=dtype)
    out_av32 = torch.empty(B, H, n, D)
    out_tv = torch.empty(B, H, n, D, dtype=dtype)
    cb.band_mv(emu_launch, "band_av", p, x, out_av, band, 1.3)
    cb.band_mv(emu_launch, "band_av", p, x, out_av32, band, 1.3)
    cb.band_mv(emu_launch, "band_tv", p, x, out_tv, band, 1.3)

    for h, d in enumerate(dils):
        j, ok = _keys(n, d, W, off)
        jc = j.clamp(0, n - 1)
        xs = x[:, h].double()[:, jc]  # (B, n, W, D): the key of every band entry
        want_s = 0.7 * torch.einsum("bnd,bnwd->bnw", a[:, h].double(), xs)
        ok_s = ok & ~skip.bool()[jc]
        got_s = s[:, h, :, :W].double()
        assert torch.equal(torch.isinf(got_s), ~ok_s.expand_as(got_s)), "band_qk: -inf exactly where no key"
        torch.testing.assert_close(got_s[:, ok_s], want_s[:, ok_s], rtol=1e-5, atol=1e-5)

        pv = p[:, h, :, :W].double() * ok  # entries without a key count as zero
        want_av = 1.3 * torch.einsum("bnw,bnwd->bnd", pv, xs)
        want_tv = torch.zeros(B, n, D, dtype=torch.float64)
        ii, cc = ok.nonzero(as_tuple=True)  # scatter each entry onto its key: the transpose
        want_tv.index_add_(1, j[ii, cc], pv[:, ii, cc].unsqueeze(-1) * x[:, h].double()[:, ii])
        want_tv *= 1.3
        rtol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(out_av32[:, h].double(), want_av, rtol=1e-5, atol=1e-4)
        for got, want in ((out_av[:, h], want_av), (out_tv[:, h], want_tv)):
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * (1 + want.abs().max().item()))


def _check_against_reference(attend, pattern: Pattern, n: int, dtype: torch.dtype, D: int, device: str) -> None:
    """Forward and backward of ``attend(q, k, v, scale)`` (B=2, H=4) against the float64
    reference under the verification policy (attnbench.verify): out, dq, dk and dv."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, go = (torch.randn(2, 4, n, D, device=device, generator=g).to(dtype) for _ in range(4))
    scale = D**-0.5
    what = f"cupy {pattern.describe()} n={n} {dtype}"
    assert_output_ok(attend(q, k, v, scale), q, k, v, pattern, what, scale)
    assert_grads_ok(lambda a, b, c: attend(a, b, c, scale), q, k, v, pattern, what, scale, dout=go)


ATTN_CASES = [
    (Pattern(window=6, dilation=(1, 1, 2, 3)), 41),
    (Pattern(window=8, global_tokens=(0, 20, 40)), 41),
    (Pattern(window=6, causal=True, dilation=(1, 2, 1, 3), global_tokens=(0, 17, 32)), 33),
    (Pattern(window=70, dilation=2, global_tokens=(5,)), 90),  # W > 64
    (Pattern(window=0, global_tokens=(0,)), 9),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern,n", ATTN_CASES, ids=lambda x: x.describe() if isinstance(x, Pattern) else f"n{x}")
def test_emulated_attention_forward_backward(emu_launch, pattern, n, dtype):
    """The whole autograd path (band softmax with global columns, dense global rows,
    backward through the transposed kernels) against the float64 reference, within
    the verification policy's tolerance."""
    attend = lambda a, b, c, scale: cb.banded_attention(a, b, c, pattern, scale, emu_launch)  # noqa: E731
    _check_against_reference(attend, pattern, n, dtype, 24, "cpu")


# ---------------------------------------------------------------- device code, no GPU needed


def test_cuda_source_compiles_for_sm90(tmp_path):
    """The device build of _banded.cu through nvcc and ptxas for sm90, every
    instantiation the module launches: it compiles as CUDA C++14 (NVRTC's dialect
    here), spills no registers, and its static shared memory stays within the 48 KiB
    a kernel may declare without opting in. The host emulation above checks what the
    kernels compute; this checks what only the CUDA toolchain sees."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH: the sm90 device build of _banded.cu is checked where the CUDA toolkit is")
    names = cb.name_expressions()
    src = tmp_path / "banded.cu"
    # taking each instantiation's address makes nvcc compile it, as NVRTC's name expressions do
    src.write_text(
        cb.SOURCE.read_text() + "\nvoid* const instances[] = {" + ", ".join(f"(void*)&{n}" for n in names) + "};\n"
    )
    opts = [o.replace("--std=", "-std=") for o in cb.COMPILE_OPTIONS]
    cmd = [nvcc, "-arch=sm_90", "-cubin", *opts, "-Xptxas", "-v", "-o", str(tmp_path / "b.cubin"), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-4000:]}"
    reports = r.stderr.split("Compiling entry function ")[1:]  # one per kernel, in ptxas' words
    assert len(reports) == len(names), f"{len(reports)} kernels in ptxas' report, {len(names)} launched:\n{r.stderr}"
    for rep in reports:
        name = rep.split("'")[1]
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", rep)]
        smem = re.search(r"(\d+) bytes smem", rep)
        assert spills and not any(spills), f"{name} spills registers:\n{rep}"
        assert smem and int(smem.group(1)) <= 48 * 1024, f"{name}: static shared memory over 48 KiB:\n{rep}"


# ---------------------------------------------------------------- registry, no GPU needed


def test_registered_and_described():
    row = {r["name"]: r for r in attnbench.describe()}["cupy"]
    # every feature but key masks: the band kernels skip one set of keys for every sample
    assert row["features"] == ",".join(f for f in attnbench.FEATURES if f != "key_mask")
    assert row["dtypes"] == "fp32,fp16,bf16" and row["devices"] == "cuda"
    why = attnbench.get_impl("cupy").unavailable_reason()
    assert row["available"] == (why is None)
    if why is not None:
        assert why.startswith("needs CuPy and a CUDA device") and row["reason"] == why


def test_cpu_call_lists_every_reason():
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    with pytest.raises(attnbench.UnsupportedError) as e:
        attnbench.attention(q, q, q, Pattern(window=4), impl="cupy")
    reasons = e.value.reasons
    assert any("device 'cpu' not supported" in r for r in reasons)
    assert any("dtype fp64 not supported" in r for r in reasons)
    why = attnbench.get_impl("cupy").unavailable_reason()
    assert (why in reasons) if why else True


def test_memory_estimate_grows_with_window_and_backward():
    mem = attnbench.get_impl("cupy").memory
    small = mem(1, 12, 4096, 64, 2, Pattern(window=64), False)
    big = mem(1, 12, 4096, 64, 2, Pattern(window=512), False)
    assert 0 < small < big < mem(1, 12, 4096, 64, 2, Pattern(window=512), True)
    assert big >= 2 * 4 * 12 * 4096 * 513  # two float32 bands


# ---------------------------------------------------------------- on a CUDA device


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(
    "pattern,n",
    [
        (Pattern(window=32), 257),
        (Pattern(window=16, dilation=3), 97),
        (Pattern(window=32, dilation=(1, 1, 2, 3)), 257),
        (Pattern(window=32, causal=True, dilation=(1, 1, 2, 3), global_tokens=(0, 128, 256)), 257),
        (Pattern(window=256, dilation=2, global_tokens=(3,)), 1000),
    ],
    ids=lambda x: x.describe() if isinstance(x, Pattern) else f"n{x}",
)
def test_gpu_matches_reference(pattern, n, dtype):
    impl_or_skip("cupy")
    attend = lambda a, b, c, scale: attnbench.attention(a, b, c, pattern, impl="cupy", scale=scale)  # noqa: E731
    _check_against_reference(attend, pattern, n, dtype, 64, DEVICE)
