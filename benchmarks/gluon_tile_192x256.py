"""A 192 x 256 output tile in Gluon for Hopper, dense ``C = A @ B.T`` (bf16): the candidate the v19 counters ask for.

    source benchmarks/device_triton.sh use && python benchmarks/gluon_tile_192x256.py    # on the GPU, Triton 3.9
    python benchmarks/gluon_tile_192x256.py --compile-only                                # here, no GPU

Why (benchmarks/KERNELS_NOTES.md, v19): the row products run prmc's 128 x 256 tile, whose k-step of 64 brings
48 KB from L2 for 4.2 MFLOP (85 FLOP per byte); ncu shows them fed at 7.2-8.4 TB/s with the tensor pipes 70-84%
busy, bound by how fast L2 feeds the SMs. A 192 x 256 tile brings 56 KB for 6.3 MFLOP (112 FLOP per byte). Its
accumulator (192 x 256 fp32) needs three warpgroups of 64 rows, 128 registers each; Triton takes only powers of two
for ``num_warps``, so the second and third warpgroups are worker partitions of ``gl.warp_specialize``, which run
wgmma on Triton 3.9 (a 1-warp producer partition as well would make 16 warps, 128 registers each, and ptxas refuses
the accumulator: the default partition issues the loads instead, 12 warps at 168 registers).

The kernel: one program per SM walks its tiles; each k-step's A (three 64 x 64 boxes: TMA boxes and shared buffers
take powers of two) and B (256 x 64) land in a ring of 3 stages. Every consumer waits for a stage, runs its 64 rows
against the shared B, and releases the stage before (``empty`` counts three arrivals); the default partition then
loads the step two ahead into it. Each consumer stores its 64 x 256 rows in two 64 x 128 halves through its own
buffer (3 stages x 56 KB + 3 x 16 KB: 216 KB of shared memory).

Checked against fp32 ``A @ B.T`` (relative error); timed against prmc's Gluon kernel (one group) and cuBLAS.
``--compile-only`` compiles for sm_90a here, as the kernel tests do, and prints the cubin's resource usage.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BM, BN, BK, SUB = 192, 256, 64, 64  # tile, k-step, rows per consumer warpgroup
# Stages, a module constant: a constexpr passed to a partition through warp_specialize arrives as a runtime value.
STAGES = gl.constexpr(3)


@gluon.jit
def _issue(a_desc, b_desc, a_bufs, b_bufs, ready, empty, j, total_steps, kt, num_n):
    """Load step j of this program's (tile, k-step) sequence into stage j % STAGES once all three consumers have
    released the step before that used it."""
    if j < total_steps:
        t = gl.program_id(0) + (j // kt) * gl.num_programs(0)
        off_m = (t // num_n) * 192
        off_n = (t % num_n) * 256
        k = (j % kt) * 64
        s = j % STAGES
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), 3 * a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        for r in gl.static_range(3):
            tma.async_load(a_desc, [off_m + 64 * r, k], ready.index(s), a_bufs.index(s * 3 + r))
        tma.async_load(b_desc, [off_n, k], ready.index(s), b_bufs.index(s))


@gluon.jit
def _consumer(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt,
              WHICH: gl.constexpr):  # fmt: skip
    """Rows 64 * WHICH .. + 64 of every tile of this program; WHICH 0 (the default partition) also loads."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    total_steps = gl.cdiv(num_tiles - pid, programs) * kt
    if WHICH == 0:
        for j in gl.static_range(STAGES - 1):
            _issue(a_desc, b_desc, a_bufs, b_bufs, ready, empty, j, total_steps, kt, num_n)
    step = 0
    for t in range(pid, num_tiles, programs):
        acc = gl.zeros((64, 256), dtype=gl.float32, layout=acc_layout)
        prev = 0
        for k in range(kt):
            s = step % STAGES
            mbarrier.wait(ready.index(s), (step // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s * 3 + WHICH), b_bufs.index(s).permute((1, 0)), acc, use_acc=k > 0,
                                is_async=True)  # fmt: skip
            acc = warpgroup_mma_wait(1, (acc,))
            mbarrier.arrive(empty.index(prev), count=1, pred=k > 0)  # the step before is done with its stage
            if WHICH == 0:
                _issue(a_desc, b_desc, a_bufs, b_bufs, ready, empty, step + STAGES - 1, total_steps, kt, num_n)
            prev = s
            step += 1
        acc = warpgroup_mma_wait(0, (acc,))
        mbarrier.arrive(empty.index(prev), count=1)
        off_m = (t // num_n) * 192 + 64 * WHICH
        off_n = (t % num_n) * 256
        lo, hi = acc.to(gl.bfloat16).reshape([64, 2, 128]).permute((0, 2, 1)).split()
        c = c_bufs.index(WHICH)
        tma.store_wait(0)
        c.store(lo)
        fence_async_shared()
        tma.async_store(c_desc, [off_m, off_n], c)
        tma.store_wait(0)
        c.store(hi)
        fence_async_shared()
        tma.async_store(c_desc, [off_m, off_n + 128], c)
    tma.store_wait(0)


@gluon.jit
def _consumer0(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt):
    _consumer(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt, 0)


@gluon.jit
def _consumer1(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt):
    _consumer(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt, 1)


@gluon.jit
def _consumer2(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt):
    _consumer(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, num_tiles, num_n, kt, 2)


@gluon.jit
def tile_192x256_kernel(a_desc, b_desc, c_desc, M, N, K, REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * 3, 64, 64], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 256, 64], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(gl.bfloat16, [3, 64, 128], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=3)
    num_n = gl.cdiv(N, 256)
    args = (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, gl.cdiv(M, 192) * num_n, num_n, gl.cdiv(K, 64))
    gl.warp_specialize([(_consumer0, args), (_consumer1, args), (_consumer2, args)], [4, 4], [REGS, REGS])


def tile_192x256(a: torch.Tensor, b: torch.Tensor, programs: int, regs: int = 168) -> torch.Tensor:
    """``a @ b.T`` (a [M, K], b [N, K], bf16; M a multiple of 192, N of 256, K of 64)."""
    (m, k), n = a.shape, b.shape[0]
    assert m % BM == 0 and n % BN == 0 and k % BK == 0, "whole tiles only"
    c = torch.empty(m, n, device=a.device, dtype=torch.bfloat16)

    def descriptor(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))

    tile_192x256_kernel[(programs,)](
        descriptor(a, [SUB, BK]), descriptor(b, [BN, BK]), descriptor(c, [SUB, 128]), m, n, k, REGS=regs,
        num_warps=4, maxnreg=regs,
    )  # fmt: skip
    return c


def compile_only() -> None:
    """Compile for sm_90a on a machine without a GPU (``prmc.kernels.check.compile_for_hopper``) and print the
    cubin's resource usage (Triton's bundled cuobjdump)."""
    from prmc.kernels.check import compile_for_hopper

    signature = dict(a_desc=("bf16", [SUB, BK]), b_desc=("bf16", [BN, BK]), c_desc=("bf16", [SUB, 128]), M="i32",
                     N="i32", K="i32")  # fmt: skip
    kernel = compile_for_hopper(tile_192x256_kernel, signature, dict(REGS=168), num_warps=4, maxnreg=168)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    print(f"compiled for sm_90a: {kernel.metadata.shared} B shared;", usage.strip().splitlines()[-1].strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile-only", action="store_true", help="compile here for sm_90a (no GPU needed)")
    parser.add_argument("--shapes", default="9216,2048,2048;67584,2048,768;67584,768,2048", help="M,N,K;...")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # prmc, from a checkout
    if args.compile_only:
        compile_only()
        return
    from prmc.kernels import gluon_gemm

    torch.manual_seed(0)
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    print(f"{'M x N x K':18s} {'192x256 TFLOP/s':>16s} {'rel err':>8s} {'prmc 128x256':>13s} {'cuBLAS':>7s}")
    for shape in args.shapes.split(";"):
        m, n, k = (int(v) for v in shape.split(","))
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        ref = a.float() @ b.float().t()
        err = ((tile_192x256(a, b, programs).float() - ref).norm() / ref.norm()).item()
        offsets = torch.tensor([m], device="cuda", dtype=torch.int32)  # prmc's kernel: one group of all rows
        c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        weight = gluon_gemm.weight_operand(a, b.unsqueeze(0).transpose(1, 2), c)
        rates = [
            2 * m * n * k / triton.testing.do_bench(run, warmup=100, rep=300) / 1e9
            for run in (
                lambda: tile_192x256(a, b, programs), lambda: gluon_gemm.grouped_gemm(a, offsets, weight, c),
                lambda: a @ b.t(),
            )
        ]  # fmt: skip
        print(f"{m}x{n}x{k:<8d} {rates[0]:16.0f} {err:8.1e} {rates[1]:13.0f} {rates[2]:7.0f}")


if __name__ == "__main__":
    main()
