"""Row-grouped GEMM in Gluon for Hopper: ``C[r] = A[r] @ B[e(r)]``, pipelined across tiles.

The story
---------
The layer's per-row products without an activation epilogue (down forward, down grad_h, gate_up grad_x) are
:mod:`prmc.kernels.grouped_gemm`'s "store" epilogue. Triton pipelines the k-loop of one tile at a time: each
tile starts with its pipeline empty and ends with the tensor cores idle while the accumulator is stored. At the
fine-grained layers' sizes a tile is only 12-32 k-steps (K = 768-2048), so those bubbles are a large share.

Gluon (``triton.experimental.gluon``) writes the pipeline by hand. Each program (one per multiprocessor) walks
its tiles of all groups; the TMA loads run STAGES-2 k-steps ahead of the ``wgmma``, and the last k-steps of a
tile issue the *next* tile's first loads, so that they are in flight during this tile's epilogue. The inner
k-loop has no branches (the next tile's coordinates are worked out once per tile: per-k-step bookkeeping cost
10-18% in a flat loop over all k-steps). A tile that lies within its group leaves through a TMA store whose wait
is deferred to the next tile's epilogue; a tile reaching past its group's end stores with a masked store (a TMA
store would write the next group's rows).

Measured against the Triton kernel on the same operands (H200, bf16, 8192 tokens, benchmarks/KERNELS_NOTES.md
v10): 4-9% faster on the fine-grained products, level on Mixtral's.

Where it runs (``weight_operand``): CUDA sm90 (``wgmma`` is sm90a's), bf16/fp16, A and C read and written through TMA
(not gathered), and B laid out so that a 2-D view ``[E * N, K]`` (K contiguous) or ``[E * K, N]`` (N contiguous)
never lets a tile reach into the next expert's matrix: N a multiple of the 256-wide tile in the first case, K a
multiple of the 64-deep step in the second. Elsewhere the Triton kernel runs. One tile shape for every product
(128 x 256 x 64, 3 stages, 8 warps: the fastest of the five measured on all six products), so no autotuning.

Rows at and past ``offsets[-1]`` belong to no expert; a last pass of the same launch zeroes them (the reference
leaves them zero).
"""

from __future__ import annotations

import torch
import triton

from prmc.kernels._triton_common import INTERPRET, capability, num_programs, swizzle, tma_reads

try:
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
except ImportError:  # a Triton without Gluon: the Triton kernel runs everywhere
    gluon = None

BLOCK_M, BLOCK_N, BLOCK_K, STAGES, NUM_WARPS, GROUP = 128, 256, 64, 3, 8, 8


def weight_operand(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """Whether this kernel runs ``c = a @ b[e]`` per group (a [M, K], b [E, K, N] any view, c [M, N]): the 2-D
    view of b's storage it reads and whether K is contiguous in it, or None where it does not run."""
    if gluon is None or INTERPRET or not a.is_cuda or capability(a.device) != (9, 0):
        return None
    if not (a.dtype == b.dtype == c.dtype and a.dtype in (torch.bfloat16, torch.float16)):
        return None
    e, k, n = b.shape
    if k < (STAGES - 2) * BLOCK_K or c.shape[1] != n or not (tma_reads(a) and tma_reads(c)):
        return None  # (the prologue's loads must fit in one tile's k-steps)
    # A tile must never reach into the next expert's matrix: N whole tiles where K is contiguous, K whole steps
    # where N is.
    if b.stride(1) == 1 and b.stride(0) == n * b.stride(2) and n % BLOCK_N == 0:  # [E, N, K] storage
        view, k_contig = b.as_strided((e * n, k), (b.stride(2), 1)), True
    elif b.stride(2) == 1 and b.stride(0) == k * b.stride(1) and k % BLOCK_K == 0:  # [E, K, N] storage
        view, k_contig = b.as_strided((e * k, n), (b.stride(1), 1)), False
    else:
        return None
    return (view, k_contig) if tma_reads(view) else None


if gluon is not None:
    # Triton 3.9 renamed the TMA copies; 3.6 (torch 2.11) has only the old names.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def _advance(t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, BM: gl.constexpr, num_n):
        """Move the group walk (group e, its first tile id and rows) forward to the group holding tile t
        (to E, past the last group, when t is past all tiles)."""
        while (t >= first + group_tiles) & (e < E):
            first += group_tiles
            e += 1
            row_begin = row_end
            row_end = gl.load(offsets_ptr + gl.minimum(e, E - 1))
            group_tiles = gl.cdiv(row_end - row_begin, BM) * num_n
        return e, first, row_begin, row_end, group_tiles

    @gluon.jit
    def _tile_origin(t, first, row_begin, row_end, num_n, BM: gl.constexpr, GROUP: gl.constexpr):
        """(first row, column block) of tile t, in the Triton kernels' tile order (``swizzle``). Past the last
        group (no rows; its loads are predicated off) any tile will do: the group's first."""
        num_m = gl.cdiv(row_end - row_begin, BM)
        pid_m, pid_n = swizzle(gl.where(num_m > 0, t - first, 0), gl.maximum(num_m, 1), num_n, GROUP)
        return row_begin + pid_m * BM, pid_n

    @gluon.jit
    def _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, off_n, k, pred,
              STAGES: gl.constexpr, K_CONTIG: gl.constexpr, BK: gl.constexpr):  # fmt: skip
        s = produced % STAGES
        mbarrier.expect(bars.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=pred)
        _tma_load(a_desc, [off_m, k * BK], bars.index(s), a_bufs.index(s), pred)
        if K_CONTIG:
            _tma_load(b_desc, [b_row + off_n, k * BK], bars.index(s), b_bufs.index(s), pred)
        else:
            _tma_load(b_desc, [b_row + k * BK, off_n], bars.index(s), b_bufs.index(s), pred)

    @gluon.jit
    def _mma(a_bufs, b_bufs, bars, acc, consumed, use_acc, STAGES: gl.constexpr, K_CONTIG: gl.constexpr):
        """One k-step once its tiles have landed; returns with at most this step's wgmma in flight, so the
        buffer of the step before is free for the next load."""
        s = consumed % STAGES
        mbarrier.wait(bars.index(s), (consumed // STAGES) & 1)
        b_tile = b_bufs.index(s).permute((1, 0)) if K_CONTIG else b_bufs.index(s)
        acc = warpgroup_mma(a_bufs.index(s), b_tile, acc, use_acc=use_acc, is_async=True)
        return warpgroup_mma_wait(1, (acc,))

    @gluon.jit
    def _store_masked(c_ptr, stride_cm, tile, off_m, off_n, row_end, N, BM: gl.constexpr, BN: gl.constexpr,
                      layout: gl.constexpr):  # fmt: skip
        tile = gl.convert_layout(tile, layout)
        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        mask = (rows < row_end)[:, None] & (cols < N)[None, :]
        gl.store(c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :], tile, mask=mask)

    @gluon.jit
    def grouped_gemm_kernel(a_desc, b_desc, c_desc, c_ptr, stride_cm, offsets_ptr, M, N, K, E,
                            K_CONTIG: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
                            num_warps: gl.constexpr):  # fmt: skip
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        LEAD: gl.constexpr = STAGES - 2  # loads in flight ahead of the wgmma
        dtype: gl.constexpr = a_desc.dtype
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BN, 16]
        )
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        num_n = gl.cdiv(N, BN)
        kt = gl.cdiv(K, BK)
        total = 0  # tiles of all groups
        prev = 0
        for g in range(E):
            end = gl.load(offsets_ptr + g)
            total += gl.cdiv(end - prev, BM) * num_n
            prev = end
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        my_tiles = gl.cdiv(total - pid, programs)

        a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_smem = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        t = pid
        e = 0
        first = 0
        row_begin = 0
        row_end = gl.load(offsets_ptr)
        group_tiles = gl.cdiv(row_end, BM) * num_n
        e, first, row_begin, row_end, group_tiles = _advance(
            t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, BM, num_n
        )
        off_m, pid_n = _tile_origin(t, first, row_begin, row_end, num_n, BM, GROUP)
        b_row = e * N if K_CONTIG else e * K
        produced = 0
        consumed = 0
        for j in gl.static_range(LEAD):
            _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, pid_n * BN, j, my_tiles > 0,
                  STAGES, K_CONTIG, BK)  # fmt: skip
            produced += 1

        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
        for i in range(my_tiles):
            for k in range(kt - LEAD):
                _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, pid_n * BN, k + LEAD, True,
                      STAGES, K_CONTIG, BK)  # fmt: skip
                produced += 1
                acc = _mma(a_bufs, b_bufs, bars, acc, consumed, k > 0, STAGES, K_CONTIG)
                consumed += 1
            # The next tile's first loads go out under this tile's last k-steps and its epilogue.
            n_t = t + programs
            n_e, n_first, n_row_begin, n_row_end, n_group_tiles = _advance(
                n_t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, BM, num_n
            )
            n_off_m, n_pid_n = _tile_origin(n_t, n_first, n_row_begin, n_row_end, num_n, BM, GROUP)
            n_b_row = n_e * N if K_CONTIG else n_e * K
            for j in gl.static_range(LEAD):
                _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, n_off_m, n_b_row, n_pid_n * BN, j,
                      i + 1 < my_tiles, STAGES, K_CONTIG, BK)  # fmt: skip
                produced += 1
                acc = _mma(a_bufs, b_bufs, bars, acc, consumed, kt - LEAD + j > 0, STAGES, K_CONTIG)
                consumed += 1
            acc = warpgroup_mma_wait(0, (acc,))
            out = acc.to(dtype)
            if off_m + BM <= row_end:
                tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                c_smem.store(out)
                fence_async_shared()
                _tma_store(c_desc, [off_m, pid_n * BN], c_smem)
            else:
                _store_masked(c_ptr, stride_cm, out, off_m, pid_n * BN, row_end, N, BM, BN, store_layout)
            t, e, first, row_begin, row_end, group_tiles = n_t, n_e, n_first, n_row_begin, n_row_end, n_group_tiles
            off_m, pid_n, b_row = n_off_m, n_pid_n, n_b_row
        tma.store_wait(pendings=0)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        # Rows routed to no expert: zeros.
        routed = gl.load(offsets_ptr + E - 1)
        zeros = gl.zeros((BM, BN), dtype=dtype, layout=store_layout)
        for blk in range(pid, gl.cdiv(M - routed, BM) * num_n, programs):
            _store_masked(c_ptr, stride_cm, zeros, routed + (blk // num_n) * BM, (blk % num_n) * BN, M, N, BM, BN,
                          store_layout)  # fmt: skip


def grouped_gemm(a: torch.Tensor, offsets: torch.Tensor, weight: tuple[torch.Tensor, bool], c: torch.Tensor) -> None:
    """``c[r] = a[r] @ b[e(r)]`` over the groups of ``offsets`` (int32 group ends), rows past ``offsets[-1]``
    zeroed; a [M, K], ``weight`` = ``weight_operand(a, b, c)``, c [M, N], written in place."""
    (m, k), n = a.shape, c.shape[1]
    if m == 0 or n == 0:
        return
    view, k_contig = weight
    dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    b_block = [BLOCK_N, BLOCK_K] if k_contig else [BLOCK_K, BLOCK_N]

    def descriptor(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    programs = num_programs(a.device)
    grouped_gemm_kernel[(programs,)](
        descriptor(a, [BLOCK_M, BLOCK_K]), descriptor(view, b_block), descriptor(c, [BLOCK_M, BLOCK_N]),
        c, c.stride(0), offsets, m, n, k, offsets.shape[0],
        K_CONTIG=k_contig, STAGES=STAGES, GROUP=GROUP, num_warps=NUM_WARPS,
    )  # fmt: skip


if __name__ == "__main__":
    # Check + benchmark against the Triton kernel and CUTLASS on the fine-grained down projection.
    from prmc.kernels import grouped_gemm as triton_gemm
    from prmc.kernels.check import random_routing, rel_err

    tokens, hidden, inter, experts, top_k = 8192, 2048, 768, 128, 8
    _, _, offsets = random_routing(tokens, experts, top_k, "cuda")
    h = torch.randn(tokens * top_k, inter, device="cuda", dtype=torch.bfloat16)
    w_down = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    b = w_down.transpose(1, 2)
    ref = torch._grouped_mm(h, b, offs=offsets)
    weight = weight_operand(h, b, ref)
    assert weight is not None
    runs = {
        "gluon": lambda c: grouped_gemm(h, offsets, weight, c),
        "triton": lambda c: triton_gemm.grouped_gemm("store", h, offsets, b, c, n=hidden),
        "cutlass": lambda c: c.copy_(torch._grouped_mm(h, b, offs=offsets)),
    }
    for name, run in runs.items():
        c = torch.full_like(ref, float("nan"))
        run(c)
        ms = triton.testing.do_bench(lambda: run(c), warmup=200, rep=300)
        tflops = 2 * h.shape[0] * inter * hidden / ms / 1e9
        print(f"down fwd {name:8s} {ms:.3f} ms {tflops:.0f} TFLOP/s  rel err {rel_err(c, ref):.1e}")
