"""What Triton's CUDA compiler makes of the window kernels' block configurations,
without a GPU: shared memory (against the sm90 limit and the autotuner's estimate),
registers and stack per thread (from cuobjdump, where Triton ships it), per
head_dim, dtype and configuration.

    python scripts/triton_resources.py [--head-dims 64,128] [--dtypes bf16,fp32]
                                       [--configs fixed|tuned|all] [--arch 90]

"fixed" are the configurations used without autotuning (short sequences, and the
autotuner's fallback), "tuned" those the autotuner tries. A configuration over the
shared-memory limit fails at launch; a nonzero stack usually means spilled
registers. Compiling takes about 1 s per configuration in bf16, several in fp32.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attnbench.impls import triton_fused as tf  # noqa: E402

KERNELS = {"fwd": "_fwd_window_kernel", "kv": "_bwd_kv_window_kernel", "q": "_bwd_q_window_kernel"}


def _resources(cubin: bytes) -> str:
    """REG / STACK of a cubin from cuobjdump -res-usage ('' where it is absent)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    found = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return f"{found.get('REG', '?'):>4s} {found.get('STACK', '?'):>6s}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default 64,128)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp16, fp32 (default bf16,fp32)")
    ap.add_argument("--configs", choices=("fixed", "tuned", "all"), default="all")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100, H200)")
    a = ap.parse_args(argv)
    kern = tf.kernels(False)
    tuned = {"fwd": kern.FWD_CONFIGS, "kv": kern.BWD_KV_CONFIGS, "q": kern.BWD_Q_CONFIGS}
    print(f"{'dtype':5s} {'D':>4s} {'kernel':4s} {'config (M, N, warps, stages)':29s} {'which':6s} "
          f"{'shared':>7s} {'estimate':>8s} {'fits':4s} {'REG':>4s} {'STACK':>6s}")  # fmt: skip
    for dtype in a.dtypes.split(","):
        esize = 4 if dtype == "fp32" else 2
        for head_dim in (int(x) for x in a.head_dims.split(",")):
            bd = tf.block_d(head_dim)
            for kind, name in KERNELS.items():
                rows = []
                if a.configs in ("fixed", "all"):
                    rows.append((kern._fixed(bd, esize, kind), "fixed"))
                if a.configs in ("tuned", "all"):
                    rows += [(c, "tuned") for c in tuned[kind]]
                for (bm, bn, warps, stages), which in rows:
                    t0 = time.time()
                    head = f"{dtype:5s} {head_dim:4d} {kind:4s} {str((bm, bn, warps, stages)):29s} {which:6s}"
                    try:
                        c = tf.compile_ahead(name, dtype, head_dim, bm, bn, warps, stages, arch=a.arch)
                    except Exception as e:
                        print(f"{head} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                        continue
                    shared = c.metadata.shared
                    est = kern.smem_bytes(kind, bm, bn, stages, bd, esize)
                    fits = "yes" if shared <= kern.SMEM_LIMIT else "NO"
                    print(f"{head} {shared:7d} {est:8d} {fits:4s} {_resources(c.asm['cubin'])}"
                          f"   ({time.time() - t0:.1f} s)", flush=True)  # fmt: skip
    print(f"\nshared-memory limit {kern.SMEM_LIMIT} B (sm90); estimate: smem_bytes() in impls/_triton_kernels.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
