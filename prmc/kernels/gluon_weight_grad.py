"""K-grouped weight gradient in Gluon for Hopper: ``out[e] = L[g_e].T @ R[g_e]``, pipelined across tiles.

The story
---------
Both weight gradients of the layer reduce over each expert's rows g_e (:mod:`prmc.kernels.weight_grad` has the
table). The output has a fixed size, [E, P, Q], so the tiles need no scheduler of their own: each program (one
per multiprocessor) takes every ``programs``-th tile of the expert-major order, skipping the tiles of experts
nobody chose (a last pass writes their zeros). What varies is each tile's k-loop: the expert's row count over
64, only 8 k-steps at Qwen3-30B-A3B's 512 rows per expert, so the bubbles between tiles (the pipeline refilling,
the accumulator leaving) weigh as much as in the row products. As in :mod:`prmc.kernels.gluon_gemm`, the last
k-step of a tile issues the next tile's first loads, which are in flight during this tile's epilogue, and the
output leaves by a TMA store waited for one tile later. Where the next tile is (its expert's rows: two loads, and a
loop over empty experts) is known before a tile starts: each expert's bounds are loaded a tile before they are
read.

A group's last k-step reads rows of the next group (TMA stops only at the tensor's edge). The k-step's L tile
goes from shared memory into registers, where those rows are set to zero before the ``wgmma``: the next
group's R rows then add nothing. (Finite ones: a non-finite value there, which already makes its own expert's
gradient non-finite, would reach this expert's too.) Every other k-step reads both operands from shared memory,
L transposed on the fly (``wgmma`` takes a 16-bit A operand in either order).

Gathered (``left_rows``: the down gradient's L is ``grad_out[rows]``), every thread copies its share of each k-step's
L tile, 16 bytes per copy, by cp.async from the rows that ``left_rows`` names, looked up two k-steps ahead; the CTA
meets twice per k-step (before a stage is overwritten, and once the copies into it have landed). Only L, the 128-column tile, is gathered: the 256-column R tile gathered ran
17-26% slower than TMA on a copy (v14). So a gathered right operand (``right_rows``: the gate_up gradient's
``x[rows]``) makes the tiles run over the transposed product (below), where it is L. Measured (v14-v15,
results/gluon_gather_probe_v14.log, gluon_weight_grad_gather_v15.log): 8-11% slower than on gather_rows' copy, the
down gradient at I = 768-1024 and the gate_up one at F = 1536-2048 0.01-0.05 ms less than the copy takes; wider,
more (triton_moe.MAX_WEIGHT_GRAD_GATHERED_COLUMNS).

Where Q is no whole number of 256-wide tiles but the transposed product's dimensions are whole tiles
(DeepSeek-V2-Lite's down gradient: Q = I = 1408, 5.5 tiles, P = H = 2048), the tiles run over ``out[e].T =
R[g_e].T @ L[g_e]`` and leave transposed, so that no tile computes empty columns; so do they where the right
operand is gathered.

Measured against CUTLASS's K-grouped ``torch._grouped_mm`` on the same operands (H200, bf16, 8192 tokens,
benchmarks/results/gluon_weight_grad_probe_v12.log, KERNELS_NOTES.md v12): 2-8% faster on both weight gradients
of the fine-grained layers (Qwen3-30B-A3B 0.408 / 0.821 ms vs 0.429 / 0.883), 9% on Mixtral's gate_up (5.98 vs
6.58; cuBLAS per expert 6.09), level on Mixtral's down; transposed, a down gradient of I = 1408 0.741 vs 0.862
(DeepSeek-V2-Lite's in the layer: 0.502 vs 0.560).

Where it runs (``takes``): CUDA sm90, bf16/fp16, L [M, P] and R [M, Q] (one of them gathered from [T, P] or
[T, Q]) with TMA-aligned rows, P a multiple of the 128-row tile (a tile never reaches into the next expert's
matrix; transposed, Q of it and P of 256; the left operand gathered, never transposed; the right one, always), Q
rows of 16-byte multiples. Elsewhere CUTLASS or the Triton kernel runs
(:func:`prmc.kernels.triton_moe._weight_grad`).
"""

from __future__ import annotations

import torch

from prmc.kernels._triton_common import INTERPRET, LAUNCH_OPTIONS, capability, num_programs, swizzle, tma_reads
from prmc.kernels.gluon_gemm import gl, gluon

if gluon is not None:
    from prmc.kernels.gluon_gemm import (
        TensorDescriptor,
        _copy_rows,
        _free,
        _landed,
        _row_starts,
        _store_masked,
        _tma_load,
        _tma_store,
        async_copy,
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

# A 128 x 256 output tile over 64-row k-steps, 3 stages (four do not fit beside the output buffer in shared memory).
BLOCK_P, BLOCK_Q, BLOCK_K, STAGES, NUM_WARPS, GROUP = 128, 256, 64, 3, 8, 8


def _transposable(p: int, q: int) -> bool:
    """Whether the tiles can run over ``out[e].T`` ([Q, P]): Q of 128-row tiles, P of 256-wide ones."""
    return q % BLOCK_P == 0 and p % BLOCK_Q == 0


def _transposed(p: int, q: int) -> bool:
    """Whether the tiles of an ungathered gradient run over ``out[e].T``: where Q is no whole number of 256-wide
    tiles (their last one would compute empty columns: 9% of them at DeepSeek-V2-Lite's Q = I = 1408) but both are
    of the transposed tile."""
    return q % BLOCK_Q != 0 and _transposable(p, q)


def fits(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this kernel computes an [E, P, Q] = ``shape`` gradient of this dtype on this device, given operands
    it reads (``takes``)."""
    if gluon is None or INTERPRET or device.type != "cuda" or capability(device) != (9, 0):
        return False
    # (transposed tiles need P of 256, so P of 128 either way; the output is allocated contiguous: TMA writes it
    # where its rows are 16-byte multiples)
    return dtype in (torch.bfloat16, torch.float16) and shape[1] % BLOCK_P == 0 and shape[2] * dtype.itemsize % 16 == 0


def takes(
    left: torch.Tensor,
    right: torch.Tensor,
    shape: torch.Size,
    left_rows: torch.Tensor | None = None,
    right_rows: torch.Tensor | None = None,
) -> bool:
    """Whether this kernel computes the [E, P, Q] = ``shape`` gradient from ``left[left_rows]`` [M, P] and
    ``right[right_rows]`` [M, Q] (an operand itself without rows; at most one gathered): ``fits``, one dtype, rows of
    both TMA-aligned with unit column stride. The gathered operand must be the kernel's L, the 128-column tile (the
    256 columns of R's ran 17-26% slower by cp.async, v14): ``left`` over untransposed tiles (``_transposed`` false),
    ``right`` over transposed ones (Q of 128-row tiles, P of 256-wide ones)."""
    if left_rows is not None and right_rows is not None:
        return False
    rows = left_rows if left_rows is not None else right_rows
    if rows is not None:
        src = left if left_rows is not None else right
        gathered_l = not _transposed(*shape[1:]) if left_rows is not None else _transposable(*shape[1:])
        if not gathered_l or not (
            rows.dim() == 1 and rows.stride(0) == 1 and rows.dtype in (torch.int32, torch.int64)
            and rows.device == src.device
        ):  # fmt: skip
            return False
    m_left = left_rows.shape[0] if left_rows is not None else left.shape[0]
    m_right = right_rows.shape[0] if right_rows is not None else right.shape[0]
    return (
        fits(shape, left.dtype, left.device)
        and left.dtype == right.dtype
        and m_left == m_right > 0
        and (left.shape[1], right.shape[1]) == tuple(shape[1:])
        and all(t.stride(1) == 1 and tma_reads(t) for t in (left, right))
    )


if gluon is not None:

    @gluon.jit
    def _expert_rows(t, tiles_per_expert, offsets_ptr, E):
        """Tile t's expert and its rows [begin, end) (past the last tile: the last expert's)."""
        e = gl.minimum(t // tiles_per_expert, E - 1)
        begin = gl.load(offsets_ptr + gl.maximum(e - 1, 0), mask=e > 0, other=0)
        return e, begin, gl.load(offsets_ptr + e)

    @gluon.jit
    def _tile_origin(t, tiles_per_expert, num_q, BP: gl.constexpr, BQ: gl.constexpr, GROUP: gl.constexpr):
        """Tile t's first output row and column within its expert's gradient."""
        pid_p, pid_q = swizzle(t % tiles_per_expert, tiles_per_expert // num_q, num_q, GROUP)
        return pid_p * BP, pid_q * BQ

    @gluon.jit
    def _next_tile(t, e, begin, end, programs, total, tiles_per_expert, num_q, offsets_ptr, E, BP: gl.constexpr,
                   BQ: gl.constexpr, GROUP: gl.constexpr):  # fmt: skip
        """This program's first tile from t on whose expert has rows (``total`` past the last), given tile t's expert
        and rows (``_expert_rows``): the tile, its expert, first output row and column, and the expert's rows
        [begin, end)."""
        while (t < total) & (begin == end):
            t += programs
            e, begin, end = _expert_rows(t, tiles_per_expert, offsets_ptr, E)
        t = gl.minimum(t, total)
        off_p, off_q = _tile_origin(t, tiles_per_expert, num_q, BP, BQ, GROUP)
        return t, e, off_p, off_q, begin, end

    @gluon.jit
    def _load(l_desc, r_desc, bars, l_bufs, r_bufs, produced, row, off_p, off_q, pred, l_ptr, l_index,
              STAGES: gl.constexpr, GATHER: gl.constexpr, l_layout: gl.constexpr):  # fmt: skip
        """The L and R tiles of the k-step at ``row`` into stage ``produced % STAGES``. Gathered (``GATHER``), L's
        rows by cp.async from the source rows at ``l_index`` (``_row_starts``; one commit group per k-step)."""
        s = produced % STAGES
        if GATHER:
            _copy_rows(l_bufs.index(s), l_ptr, l_index, off_p, l_layout)
            async_copy.commit_group()
            mbarrier.expect(bars.index(s), r_desc.block_type.nbytes, pred=pred)
        else:
            mbarrier.expect(bars.index(s), l_desc.block_type.nbytes + r_desc.block_type.nbytes, pred=pred)
            _tma_load(l_desc, [row, off_p], bars.index(s), l_bufs.index(s), pred)
        _tma_load(r_desc, [row, off_q], bars.index(s), r_bufs.index(s), pred)

    @gluon.jit
    def _mma(l_bufs, r_bufs, bars, acc, consumed, use_acc, STAGES: gl.constexpr):
        """One k-step once its tiles have landed; returns with at most this step's wgmma in flight."""
        s = consumed % STAGES
        mbarrier.wait(bars.index(s), (consumed // STAGES) & 1)
        acc = warpgroup_mma(l_bufs.index(s).permute((1, 0)), r_bufs.index(s), acc, use_acc=use_acc, is_async=True)
        return warpgroup_mma_wait(1, (acc,))

    @gluon.jit
    def _mma_last(l_bufs, r_bufs, bars, acc, consumed, use_acc, rows_left, STAGES: gl.constexpr):
        """A tile's last k-step: L through registers, its rows at and past ``rows_left`` (the next group's) zeroed."""
        s = consumed % STAGES
        mbarrier.wait(bars.index(s), (consumed // STAGES) & 1)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
        a = l_bufs.index(s).permute((1, 0)).load(a_layout)
        BK: gl.constexpr = a.shape[1]
        k = gl.arange(0, BK, layout=gl.SliceLayout(0, a_layout))
        a = gl.where((k < rows_left)[None, :], a, gl.zeros_like(a))
        acc = warpgroup_mma(a, r_bufs.index(s), acc, use_acc=use_acc, is_async=True)
        return warpgroup_mma_wait(1, (acc,))

    @gluon.jit
    def _out_origin(e, off_p, off_q, P, Q, E, TRANSPOSED: gl.constexpr):
        """Where a tile's output goes in the [E * rows, cols] view of out: its first row and column, and the view's
        rows and columns (transposed: out[e] is [Q, P])."""
        if TRANSPOSED:
            return e * Q + off_q, off_p, E * Q, P
        else:
            return e * P + off_p, off_q, E * P, Q

    @gluon.jit
    def weight_grad_kernel(l_desc, r_desc, o_desc, o_ptr, offsets_ptr, l_ptr, stride_l, rows_ptr, M, P, Q, E,
                           TRANSPOSED: gl.constexpr, GATHER: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
                           num_warps: gl.constexpr):  # fmt: skip
        BP: gl.constexpr = l_desc.block_type.shape[1]
        BQ: gl.constexpr = r_desc.block_type.shape[1]
        BK: gl.constexpr = l_desc.block_type.shape[0]
        gl.static_assert(STAGES == 3, "one k-step ahead: the loop below is written for three stages")
        dtype: gl.constexpr = l_desc.dtype
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BQ, 16]
        )
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        # A gathered L tile: a 16-byte copy (8 elements) per thread along a row, 16 threads across the row.
        l_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BP, BP // 8], [num_warps, 1], [1, 0])

        num_q = gl.cdiv(Q, BQ)
        tiles_per_expert = (P // BP) * num_q
        total = E * tiles_per_expert
        pid = gl.program_id(0)
        programs = gl.num_programs(0)

        l_bufs = gl.allocate_shared_memory(dtype, [STAGES] + l_desc.block_type.shape, l_desc.layout)
        r_bufs = gl.allocate_shared_memory(dtype, [STAGES] + r_desc.block_type.shape, r_desc.layout)
        o_smem = gl.allocate_shared_memory(dtype, o_desc.block_type.shape, o_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        e, begin, end = _expert_rows(pid, tiles_per_expert, offsets_ptr, E)
        t, e, off_p, off_q, begin, end = _next_tile(pid, e, begin, end, programs, total, tiles_per_expert, num_q,
                                                    offsets_ptr, E, BP, BQ, GROUP)  # fmt: skip
        # The next tile is known before a tile starts, and the one after it is looked up a tile ahead (c_e, c_begin,
        # c_end: its expert's rows, loaded here and first read a tile later, in _next_tile's loop condition). Looked
        # up at a tile's start, that condition waited for the loads from L2 with no wgmma in flight (the last tile
        # drained): 2-3% of Qwen3-30B-A3B's weight gradients, in two runs (benchmarks/KERNELS_NOTES.md v24).
        c_e, c_begin, c_end = _expert_rows(t + programs, tiles_per_expert, offsets_ptr, E)
        n_t, n_e, n_off_p, n_off_q, n_begin, n_end = _next_tile(t + programs, c_e, c_begin, c_end, programs, total,
                                                                tiles_per_expert, num_q, offsets_ptr, E, BP, BQ,
                                                                GROUP)  # fmt: skip
        c_t = n_t + programs
        c_e, c_begin, c_end = _expert_rows(c_t, tiles_per_expert, offsets_ptr, E)
        # Gathered, each k-step's source rows are looked up two loads ahead: l_index holds the next load's, l_after
        # the one after it. Looked up one load ahead, a lookup outlasted the k-step meant to hide it (ncu, H200: 18%
        # of the warps' stall samples at its first use); two ahead ran 0-3% faster (benchmarks/KERNELS_NOTES.md v19).
        l_index = _row_starts(rows_ptr, begin, M, stride_l, BK, GATHER, l_layout)
        _load(l_desc, r_desc, bars, l_bufs, r_bufs, 0, begin, off_p, off_q, t < total, l_ptr, l_index, STAGES, GATHER,
              l_layout)  # fmt: skip
        l_index = _row_starts(rows_ptr, begin + BK, M, stride_l, BK, GATHER, l_layout)
        l_after = _row_starts(rows_ptr, begin + 2 * BK, M, stride_l, BK, GATHER, l_layout)
        produced = 1
        consumed = 0
        acc = gl.zeros((BP, BQ), dtype=gl.float32, layout=acc_layout)
        while t < total:
            kt = gl.cdiv(end - begin, BK)
            # The next tile's first k-step's source rows are looked up before this tile's k-loop, whose k-steps hide
            # the lookup's latency (looked up after it, it held up the tile's last wgmma).
            n_index = _row_starts(rows_ptr, n_begin, M, stride_l, BK, GATHER, l_layout)
            for k in range(kt - 1):
                _free(GATHER)
                _load(l_desc, r_desc, bars, l_bufs, r_bufs, produced, begin + (k + 1) * BK, off_p, off_q, True, l_ptr,
                      l_index, STAGES, GATHER, l_layout)  # fmt: skip
                l_index = l_after
                l_after = _row_starts(rows_ptr, begin + (k + 3) * BK, M, stride_l, BK, GATHER, l_layout)
                produced += 1
                _landed(GATHER, 1)
                acc = _mma(l_bufs, r_bufs, bars, acc, consumed, k > 0, STAGES)
                consumed += 1
            # The next tile's first loads go out under this tile's last k-step and its epilogue.
            _free(GATHER)
            _load(l_desc, r_desc, bars, l_bufs, r_bufs, produced, n_begin, n_off_p, n_off_q, n_t < total, l_ptr,
                  n_index, STAGES, GATHER, l_layout)  # fmt: skip
            l_index = _row_starts(rows_ptr, n_begin + BK, M, stride_l, BK, GATHER, l_layout)
            l_after = _row_starts(rows_ptr, n_begin + 2 * BK, M, stride_l, BK, GATHER, l_layout)
            produced += 1
            _landed(GATHER, 1)
            acc = _mma_last(l_bufs, r_bufs, bars, acc, consumed, kt > 1, end - begin - (kt - 1) * BK, STAGES)
            consumed += 1
            tma.store_wait(pendings=0)  # the previous tile's output has left o_smem
            acc = warpgroup_mma_wait(0, (acc,))
            out = acc.to(dtype)
            row, col, _, _ = _out_origin(e, off_p, off_q, P, Q, E, TRANSPOSED)
            o_smem.store(out.permute((1, 0)) if TRANSPOSED else out)
            fence_async_shared()
            _tma_store(o_desc, [row, col], o_smem)
            t, e, off_p, off_q, begin, end = n_t, n_e, n_off_p, n_off_q, n_begin, n_end
            n_t, n_e, n_off_p, n_off_q, n_begin, n_end = _next_tile(
                c_t, c_e, c_begin, c_end, programs, total, tiles_per_expert, num_q, offsets_ptr, E, BP, BQ, GROUP
            )
            c_t = n_t + programs
            c_e, c_begin, c_end = _expert_rows(c_t, tiles_per_expert, offsets_ptr, E)
        tma.store_wait(pendings=0)
        if GATHER:
            async_copy.wait_group(0)  # (the last tile's lookahead copies, of no tile)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        # Experts with no rows: zero gradients.
        OM: gl.constexpr = o_desc.block_type.shape[0]
        ON: gl.constexpr = o_desc.block_type.shape[1]
        zeros = gl.zeros((OM, ON), dtype=dtype, layout=store_layout)
        for t in range(pid, total, programs):
            e, begin, end = _expert_rows(t, tiles_per_expert, offsets_ptr, E)
            off_p, off_q = _tile_origin(t, tiles_per_expert, num_q, BP, BQ, GROUP)
            if begin == end:
                row, col, rows, cols = _out_origin(e, off_p, off_q, P, Q, E, TRANSPOSED)
                _store_masked(o_ptr, cols, zeros, row, col, rows, cols, OM, ON, store_layout)


def k_grouped_mm(
    left: torch.Tensor,
    right: torch.Tensor,
    offsets: torch.Tensor,
    left_rows: torch.Tensor | None = None,
    right_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e] = left[left_rows][g_e].T @ right[right_rows][g_e]`` (an operand itself without rows) over the groups
    of ``offsets`` (int32 group ends; rows past ``offsets[-1]`` enter no expert): [M, P] and [M, Q] -> [E, P, Q],
    where ``takes`` says."""
    experts, p, q = offsets.shape[0], left.shape[1], right.shape[1]
    out = left.new_empty(experts, p, q)
    dtype = gl.bfloat16 if left.dtype == torch.bfloat16 else gl.float16

    def descriptor(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    # The gathered operand is the kernel's L (takes): right's over the transposed tiles, left's over the others.
    transposed = right_rows is not None or (left_rows is None and _transposed(p, q))
    if transposed:  # the tiles run over out[e].T = right[g_e].T @ left[g_e]
        left, right, p, q, left_rows = right, left, q, p, right_rows
    o_block = [BLOCK_Q, BLOCK_P] if transposed else [BLOCK_P, BLOCK_Q]
    # A gathered L's descriptor only gives the kernel its tile's type and shared layout.
    weight_grad_kernel[(num_programs(left.device),)](
        descriptor(left, [BLOCK_K, BLOCK_P]), descriptor(right, [BLOCK_K, BLOCK_Q]),
        descriptor(out.view(-1, out.shape[2]), o_block), out, offsets, left, left.stride(0),
        left_rows if left_rows is not None else offsets, right.shape[0], p, q, experts, TRANSPOSED=transposed,
        GATHER=left_rows is not None, STAGES=STAGES, GROUP=GROUP, num_warps=NUM_WARPS, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


if __name__ == "__main__":
    # Check against float64 (random routing; hot experts with empty ones and unrouted rows) and benchmark against
    # CUTLASS on both weight gradients of the fine-grained layer, and on a down gradient of I = 1408. The routed
    # operand (a token-order matrix's rows: grad_out's in the down gradient, x's in the gate_up one) is also gathered
    # by cp.async where ``takes`` says, against gather_rows' copy + the kernel reading it.
    import triton

    from prmc.kernels import cutlass
    from prmc.kernels.check import random_routing, rel_err
    from prmc.kernels.gather_rows import gather_rows

    tokens, hidden, inter, experts, top_k = 8192, 2048, 768, 128, 8
    for routing in [dict(), dict(hot=4, unrouted=777)]:
        order, _, offsets = random_routing(tokens, experts, top_k, "cuda", **routing)
        m, ends, rows = order.shape[0], [0, *offsets.tolist()], order // top_k
        # (the third: DeepSeek-V2-Lite's I, whose tiles run over the transposed product)
        for name, p, q, routed in [
            ("down", hidden, inter, "left"), ("gate_up", 2 * inter, hidden, "right"),
            ("down I=1408", hidden, 1408, "left"),
        ]:  # fmt: skip
            src = torch.randn(tokens, p if routed == "left" else q, device="cuda", dtype=torch.bfloat16)
            left = src[rows] if routed == "left" else torch.randn(m, p, device="cuda", dtype=torch.bfloat16)
            right = src[rows] if routed == "right" else torch.randn(m, q, device="cuda", dtype=torch.bfloat16)
            ref = torch.stack([left[s:t].double().t() @ right[s:t].double() for s, t in zip(ends, ends[1:])])
            runs = {"gluon": k_grouped_mm, "cutlass": cutlass.k_grouped_mm}
            gathered = (src, right, rows, None) if routed == "left" else (left, src, None, rows)
            if takes(*gathered[:2], ref.shape, *gathered[2:]):
                runs["gathered"] = lambda left, right, offsets: k_grouped_mm(*gathered[:2], offsets, *gathered[2:])
            for kernel, launch in runs.items():
                ms = triton.testing.do_bench(lambda: launch(left, right, offsets), warmup=200, rep=300)
                out = launch(left, right, offsets)
                worst = max(
                    rel_err(out[e], ref[e]) if t > s else float(out[e].abs().max())
                    for e, (s, t) in enumerate(zip(ends, ends[1:]))
                )  # fmt: skip
                print(f"{name} grad_w {routing} {kernel:8s} {ms:.3f} ms {2 * m * p * q / ms / 1e9:.0f} TFLOP/s  "
                      f"worst expert's rel err (an empty one's largest value) {worst:.1e}")  # fmt: skip
            ms = triton.testing.do_bench(lambda: gather_rows(src, rows), warmup=200, rep=300)
            print(f"{name} grad_w {routing} the copy the gathered run saves (gather_rows) {ms:.3f} ms")
