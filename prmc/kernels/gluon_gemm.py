"""Row-grouped GEMM in Gluon for Hopper: ``C[r] = A[r] @ B[e(r)]``, pipelined across tiles.

The story
---------
The layer's per-row products (down forward, down grad_h, gate_up grad_x: the "store" epilogue of
:mod:`prmc.kernels.grouped_gemm`; and the gated gate_up forward) run one kernel. Triton pipelines the k-loop of
one tile at a time: each tile starts with its pipeline empty and ends with the tensor cores idle while the
accumulator is stored. At the fine-grained layers' sizes a tile is only 12-32 k-steps (K = 768-2048), so those
bubbles are a large share.

Gluon (``triton.experimental.gluon``) writes the pipeline by hand. Each program (one per multiprocessor) walks
its tiles of all groups; the TMA loads run STAGES-2 k-steps ahead of the ``wgmma``, and the last k-steps of a
tile issue the *next* tile's first loads, so that they are in flight during this tile's epilogue. The inner
k-loop has no branches (the next tile's coordinates are worked out once per tile: per-k-step bookkeeping cost
10-18% in a flat loop over all k-steps). A tile that lies within its group leaves through a TMA store whose wait
is deferred to the next tile's epilogue; a tile reaching past its group's end stores with a masked store (a TMA
store would write the next group's rows).

Gated (SwiGLU and friends, the weight's gate rows first, then its up rows): a tile is 128 columns of the gate
half and the same 128 of the up half, loaded into the two halves of one B buffer, so one 128 x 256 ``wgmma``
covers both (two 128 x 128 accumulators ran no faster than the Triton kernel: 255 registers, and A read from
shared memory twice). Each thread holds column j of both halves, so the epilogue splits the accumulator without
moving data and writes preact (both halves, rounded to the output dtype) and ``h = act(gate) * up``.

Gathered rows (``a_rows``: the routed rows of the gate_up forward and of the down grad_h, ``x[rows]`` and
``grad_out[rows]``): TMA has no row gather on Hopper, so every thread copies its share of a k-step's A tile, 16
bytes per copy, by cp.async from the rows that ``a_rows`` names (looked up once per tile). The copies of the next
k-step go out before this one's are waited for, as the TMA loads do; the CTA meets twice per k-step, once so that
no copy overwrites a stage the other warpgroup's wgmma still reads, once so that both warpgroups' wgmma see every
thread's copies. No gathered copy of A is written, nor read back.

Measured against the Triton kernel on the same operands (H200, bf16, 8192 tokens, benchmarks/KERNELS_NOTES.md
v10-v11): the store products 4-9% faster on the fine-grained layers, level on Mixtral's; the gated forward 1-2%
faster on the fine-grained layers, 2-7% on Mixtral's. Gathering (v14, results/gluon_gather_probe_v14.log): the
gated forward 2-4% slower than on gather_rows' copy, which is 0.05-0.07 ms less than the copy takes on the
fine-grained layers (not on Mixtral's: triton_moe.MAX_GATHERED_COLUMNS); grad_h 4-6% faster than on the copy, the
copy aside.

Where it runs (``weight_operand``): CUDA sm90 (``wgmma`` is sm90a's), bf16/fp16, A and C (and h) read and
written through TMA (gathered: A's rows 16-byte aligned, K whole k-steps), and B laid out so that a 2-D view
``[E * N, K]`` (K contiguous) or ``[E * K, N]`` (N contiguous) never lets a tile reach into the next expert's
matrix (nor a gate tile into the up half): N a multiple of the 256-wide tile (of 128 per half when gated) in the
first case, K a multiple of the 64-deep step in the second (and, gated, each half a multiple of 128). Elsewhere
the Triton kernel runs. One tile shape per epilogue (128 x 256 x 64, 3 stages, 8 warps: the fastest of the five
measured on all six store products), so no autotuning.

Rows at and past ``offsets[-1]`` belong to no expert; a last pass of the same launch zeroes them (the reference
leaves them zero).
"""

from __future__ import annotations

import torch
import triton

from prmc.kernels._triton_common import INTERPRET, activation, capability, num_programs, swizzle, tma_reads

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon: the Triton kernel runs everywhere
    gluon = None

BLOCK_M, BLOCK_K, STAGES, NUM_WARPS, GROUP = 128, 64, 3, 8, 8
# Output columns per tile: 256, or 128 of each half when gated (the accumulator is 256 wide either way).
BLOCK_N = {False: 256, True: 128}


def weight_operand(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, h: torch.Tensor | None = None, a_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool] | None:
    """Whether this kernel runs ``c = a[a_rows] @ b[e]`` per group (a [M, K], or [T, K] gathered by ``a_rows`` [M];
    b [E, K, N'] any view; c [M, N']): the 2-D view of b's storage it reads and whether K is contiguous in it, or
    None where it does not run. ``h`` [M, N'/2] given: the gated product (gate half then up half of N'),
    ``h = act(gate) * up`` written too."""
    if gluon is None or INTERPRET or not a.is_cuda or capability(a.device) != (9, 0):
        return None
    if not (a.dtype == b.dtype == c.dtype and a.dtype in (torch.bfloat16, torch.float16)):
        return None
    e, k, n = b.shape
    if k < (STAGES - 2) * BLOCK_K or c.shape[1] != n or not (tma_reads(a) and tma_reads(c)):
        return None  # (the prologue's loads must fit in one tile's k-steps)
    if a_rows is not None and not (
        a_rows.shape == (c.shape[0],) and a_rows.dtype in (torch.int32, torch.int64) and a_rows.stride(0) == 1
        and a_rows.device == a.device and k % BLOCK_K == 0
    ):  # (gathered rows are copied in whole k-steps: no masked columns)
        return None  # fmt: skip
    gated = h is not None
    if gated and not (h.dtype == c.dtype and h.shape == (c.shape[0], n // 2) and n % 2 == 0 and tma_reads(h)):
        return None
    # A tile must never reach into the next expert's matrix (nor a gate tile into the up half): the columns
    # whole tiles where K is contiguous, K whole steps where N is; gated, each half's columns whole tiles.
    whole_n = (n // 2 if gated else n) % BLOCK_N[gated] == 0
    if b.stride(1) == 1 and b.stride(0) == n * b.stride(2) and whole_n:  # [E, N, K] storage
        view, k_contig = b.as_strided((e * n, k), (b.stride(2), 1)), True
    elif b.stride(2) == 1 and b.stride(0) == k * b.stride(1) and k % BLOCK_K == 0 and (whole_n or not gated):
        view, k_contig = b.as_strided((e * k, n), (b.stride(1), 1)), False  # [E, K, N] storage
    else:
        return None
    return (view, k_contig) if tma_reads(view) else None


if gluon is not None:
    # Triton 3.9 renamed the TMA and cp.async copies; 3.6 (torch 2.11) has only the old names.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

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
    def _locate(t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, N, K, num_n, BM: gl.constexpr,
                GROUP: gl.constexpr, K_CONTIG: gl.constexpr, GATED: gl.constexpr):  # fmt: skip
        """The group walk moved on to tile t (``_advance``), with t's first row, column block and first row of its
        expert's matrix in B's 2-D view."""
        e, first, row_begin, row_end, group_tiles = _advance(
            t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, BM, num_n
        )
        off_m, pid_n = _tile_origin(t, first, row_begin, row_end, num_n, BM, GROUP)
        b_row = e * (1 + GATED) * N if K_CONTIG else e * K
        return e, first, row_begin, row_end, group_tiles, off_m, pid_n, b_row

    @gluon.jit
    def _load_weight(b_desc, bar, buf, b_row, n, k, pred, K_CONTIG: gl.constexpr, BK: gl.constexpr):
        """B's tile at columns ``n`` of the product, k-step ``k``, from either storage order."""
        if K_CONTIG:
            _tma_load(b_desc, [b_row + n, k * BK], bar, buf, pred)
        else:
            _tma_load(b_desc, [b_row + k * BK, n], bar, buf, pred)

    @gluon.jit
    def _row_starts(rows_ptr, first, M, stride, COUNT: gl.constexpr, GATHER: gl.constexpr, layout: gl.constexpr):
        """Gathered, where the source rows of the gathered rows ``first .. first + COUNT`` start: ``rows[r] * stride``
        (rows past M read the source's first row: no output takes them), in ``SliceLayout(1, layout)``, the rows of
        the tile ``_copy_rows`` copies; else nothing (0). The launchers guarantee 16-byte rows (TMA's alignment),
        which cp.async needs to copy 16 bytes at a time."""
        if GATHER:
            r = first + gl.arange(0, COUNT, layout=gl.SliceLayout(1, layout))
            return gl.multiple_of(gl.load(rows_ptr + r, mask=r < M, other=0).to(gl.int64) * stride, 8)
        else:
            return 0

    @gluon.jit
    def _copy_rows(buf, src_ptr, starts, col, layout: gl.constexpr):
        """cp.async of the source rows at ``starts`` (``_row_starts``), columns ``col ..`` (as many as ``buf`` has),
        into ``buf``: each thread copies its 16-byte pieces of ``layout``; TMA has no row gather on Hopper. Visible to
        the wgmma once every thread has waited for its copies and the CTA has met (``fence_async_shared`` before)."""
        cols = col + gl.arange(0, buf.shape[1], layout=gl.SliceLayout(0, layout))
        _async_load(buf, src_ptr + starts[:, None] + cols[None, :])

    @gluon.jit
    def _free(GATHER: gl.constexpr):
        """Gathered: the CTA meets before a k-step's copies, so that both warpgroups are done with the wgmma that last
        read the stage they overwrite (each thread's copies cover parts of the tile that both warpgroups read)."""
        if GATHER:
            _cta_barrier()

    @gluon.jit
    def _landed(GATHER: gl.constexpr, AHEAD: gl.constexpr):
        """Gathered: every thread's copies of the step about to be consumed have landed (those of the ``AHEAD`` steps
        loaded after it may be in flight) and the CTA has met, so both warpgroups' wgmma see them."""
        if GATHER:
            async_copy.wait_group(AHEAD)
            fence_async_shared()
            _cta_barrier()

    @gluon.jit
    def _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, off_n, N, k, pred, a_ptr, a_index,
              STAGES: gl.constexpr, K_CONTIG: gl.constexpr, GATED: gl.constexpr, BK: gl.constexpr,
              GATHER: gl.constexpr, gather_layout: gl.constexpr):  # fmt: skip
        """k-step ``k``'s tiles into stage ``produced % STAGES``: A's and B's; gated, B's gate tile and its up tile
        (N columns further on) into the two halves of the stage's B buffer, so that one wgmma covers both.
        Gathered (``GATHER``), A's rows by cp.async (``a_index``: ``_row_starts``; one commit group per k-step)."""
        s = produced % STAGES
        if GATHER:
            _copy_rows(a_bufs.index(s), a_ptr, a_index, k * BK, gather_layout)
            async_copy.commit_group()
            mbarrier.expect(bars.index(s), b_desc.block_type.nbytes * (1 + GATED), pred=pred)
        else:
            mbarrier.expect(bars.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes * (1 + GATED), pred=pred)
            _tma_load(a_desc, [off_m, k * BK], bars.index(s), a_bufs.index(s), pred)
        if GATED:
            BN: gl.constexpr = b_desc.block_type.shape[0 if K_CONTIG else 1]
            dim: gl.constexpr = 0 if K_CONTIG else 1
            _load_weight(b_desc, bars.index(s), b_bufs.index(s).slice(0, BN, dim), b_row, off_n, k, pred, K_CONTIG, BK)
            _load_weight(b_desc, bars.index(s), b_bufs.index(s).slice(BN, BN, dim), b_row, N + off_n, k, pred,
                         K_CONTIG, BK)  # fmt: skip
        else:
            _load_weight(b_desc, bars.index(s), b_bufs.index(s), b_row, off_n, k, pred, K_CONTIG, BK)

    @gluon.jit
    def _step(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, off_n, N, k, pred, a_ptr, a_index, acc,
              consumed, use_acc, STAGES: gl.constexpr, K_CONTIG: gl.constexpr, GATED: gl.constexpr,
              BK: gl.constexpr, GATHER: gl.constexpr, gather_layout: gl.constexpr):  # fmt: skip
        """Load k-step ``k`` (of the tile at ``off_m``, ``off_n``) and run the wgmma of the step ``consumed``.
        Gathered, the CTA meets before the copies and once the consumed step's have landed (``_free``, ``_landed``);
        the copies of step ``k`` stay in flight meanwhile, as a TMA load would."""
        _free(GATHER)
        _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, off_n, N, k, pred, a_ptr, a_index, STAGES,
              K_CONTIG, GATED, BK, GATHER, gather_layout)  # fmt: skip
        _landed(GATHER, STAGES - 2)  # (the loads run STAGES - 2 steps ahead)
        return _mma(a_bufs, b_bufs, bars, acc, consumed, use_acc, STAGES, K_CONTIG)

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
    def _store_masked_outputs(c_ptr, stride_cm, h_ptr, stride_hm, out, up, h, off_m, off_n, row_end, N,
                              GATED: gl.constexpr, layout: gl.constexpr):  # fmt: skip
        """A tile's outputs with a masked store each: c's tile ``out``; gated, ``out`` and ``up`` are c's gate and up
        halves (N columns apart) and ``h`` is h's tile."""
        BM: gl.constexpr = out.shape[0]
        BN: gl.constexpr = out.shape[1]
        _store_masked(c_ptr, stride_cm, out, off_m, off_n, row_end, N, BM, BN, layout)
        if GATED:
            _store_masked(c_ptr + N, stride_cm, up, off_m, off_n, row_end, N, BM, BN, layout)
            _store_masked(h_ptr, stride_hm, h, off_m, off_n, row_end, N, BM, BN, layout)

    @gluon.jit
    def _tma_store_tile(desc, c_smem, tile, off_m, off_n):
        """An output tile that lies within its group, by TMA through ``c_smem`` (free: the caller waited)."""
        c_smem.store(tile)
        fence_async_shared()
        _tma_store(desc, [off_m, off_n], c_smem)

    @gluon.jit
    def grouped_gemm_kernel(a_desc, b_desc, c_desc, h_desc, a_ptr, stride_am, a_rows_ptr, c_ptr, stride_cm, h_ptr,
                            stride_hm, offsets_ptr, M, N, K, E, K_CONTIG: gl.constexpr, GATED: gl.constexpr,
                            ACTIVATION: gl.constexpr, GATHER: gl.constexpr, STAGES: gl.constexpr, GROUP: gl.constexpr,
                            num_warps: gl.constexpr):  # fmt: skip
        BM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        LEAD: gl.constexpr = STAGES - 2  # loads in flight ahead of the wgmma
        dtype: gl.constexpr = a_desc.dtype
        ACC_N: gl.constexpr = BN * (1 + GATED)  # gated: the gate tile's columns, then the up tile's
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, ACC_N, 16]
        )
        # (also the gathered A tile's: 8 elements, one 16-byte copy, per thread along its row of 64)
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
        if K_CONTIG:
            b_block: gl.constexpr = [ACC_N, BK]
        else:
            b_block: gl.constexpr = [BK, ACC_N]
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_block, b_desc.layout)
        # Gated: two output buffers, gate and up leave together, then h.
        c_smem = gl.allocate_shared_memory(dtype, [1 + GATED] + c_desc.block_type.shape, c_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        t = pid
        e = 0
        first = 0
        row_begin = 0
        row_end = gl.load(offsets_ptr)
        group_tiles = gl.cdiv(row_end, BM) * num_n
        e, first, row_begin, row_end, group_tiles, off_m, pid_n, b_row = _locate(
            t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, N, K, num_n, BM, GROUP, K_CONTIG, GATED
        )
        a_index = _row_starts(a_rows_ptr, off_m, M, stride_am, BM, GATHER, store_layout)
        produced = 0
        consumed = 0
        for j in gl.static_range(LEAD):
            _load(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, pid_n * BN, N, j, my_tiles > 0, a_ptr,
                  a_index, STAGES, K_CONTIG, GATED, BK, GATHER, store_layout)  # fmt: skip
            produced += 1

        acc = gl.zeros((BM, ACC_N), dtype=gl.float32, layout=acc_layout)
        for i in range(my_tiles):
            for k in range(kt - LEAD):
                acc = _step(a_desc, b_desc, bars, a_bufs, b_bufs, produced, off_m, b_row, pid_n * BN, N, k + LEAD,
                            True, a_ptr, a_index, acc, consumed, k > 0, STAGES, K_CONTIG, GATED, BK, GATHER,
                            store_layout)  # fmt: skip
                produced += 1
                consumed += 1
            # The next tile's first loads go out under this tile's last k-steps and its epilogue.
            n_t = t + programs
            n_e, n_first, n_row_begin, n_row_end, n_group_tiles, n_off_m, n_pid_n, n_b_row = _locate(
                n_t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, N, K, num_n, BM, GROUP, K_CONTIG, GATED
            )
            a_index = _row_starts(a_rows_ptr, n_off_m, M, stride_am, BM, GATHER, store_layout)
            for j in gl.static_range(LEAD):
                acc = _step(a_desc, b_desc, bars, a_bufs, b_bufs, produced, n_off_m, n_b_row, n_pid_n * BN, N, j,
                            i + 1 < my_tiles, a_ptr, a_index, acc, consumed, kt - LEAD + j > 0, STAGES, K_CONTIG, GATED,
                            BK, GATHER, store_layout)  # fmt: skip
                produced += 1
                consumed += 1
            off_n = pid_n * BN
            full = off_m + BM <= row_end
            if full:
                tma.store_wait(pendings=0)  # the previous tile's stores have left c_smem
            acc = warpgroup_mma_wait(0, (acc,))
            if GATED:
                # preact rounded to the output dtype, and h from the rounded values (as the reference does). Each
                # thread holds column j of both halves: the split moves no data.
                gate, up = acc.reshape([BM, 2, BN]).permute((0, 2, 1)).split()
                gate = gate.to(dtype)
                up = up.to(dtype)
                h = (activation(gate.to(gl.float32), ACTIVATION) * up.to(gl.float32)).to(dtype)
                if full:
                    _tma_store_tile(c_desc, c_smem.index(0), gate, off_m, off_n)
                    _tma_store_tile(c_desc, c_smem.index(1), up, off_m, N + off_n)
                    tma.store_wait(pendings=1)  # the gate tile has left its buffer
                    _tma_store_tile(h_desc, c_smem.index(0), h, off_m, off_n)
                else:
                    _store_masked_outputs(c_ptr, stride_cm, h_ptr, stride_hm, gate, up, h, off_m, off_n, row_end, N,
                                          GATED, store_layout)  # fmt: skip
            else:
                out = acc.to(dtype)
                if full:
                    _tma_store_tile(c_desc, c_smem.index(0), out, off_m, off_n)
                else:
                    _store_masked_outputs(c_ptr, stride_cm, h_ptr, stride_hm, out, out, out, off_m, off_n, row_end, N,
                                          GATED, store_layout)  # fmt: skip
            t, e, first, row_begin, row_end, group_tiles = n_t, n_e, n_first, n_row_begin, n_row_end, n_group_tiles
            off_m, pid_n, b_row = n_off_m, n_pid_n, n_b_row
        tma.store_wait(pendings=0)
        if GATHER:
            async_copy.wait_group(0)  # (the last tile's lookahead copies, of no tile)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        # Rows routed to no expert: zeros (preact's both halves and h when gated).
        routed = gl.load(offsets_ptr + E - 1)
        zeros = gl.zeros((BM, BN), dtype=dtype, layout=store_layout)
        for blk in range(pid, gl.cdiv(M - routed, BM) * num_n, programs):
            off_m = routed + (blk // num_n) * BM
            off_n = (blk % num_n) * BN
            _store_masked_outputs(c_ptr, stride_cm, h_ptr, stride_hm, zeros, zeros, zeros, off_m, off_n, M, N, GATED,
                                  store_layout)  # fmt: skip


def grouped_gemm(
    a: torch.Tensor,
    offsets: torch.Tensor,
    weight: tuple[torch.Tensor, bool],
    c: torch.Tensor,
    h: torch.Tensor | None = None,
    activation: str = "silu",
    a_rows: torch.Tensor | None = None,
) -> None:
    """``c[r] = a[a_rows[r]] @ b[e(r)]`` (``a[r]`` without ``a_rows``) over the groups of ``offsets`` (int32 group
    ends), rows past ``offsets[-1]`` zeroed; ``weight`` = ``weight_operand(a, b, c, h, a_rows)``, c [M, N'], written
    in place. ``h`` given: the gated product, ``h = act(gate) * up`` from c's two halves (each rounded to c's dtype
    first)."""
    m, k, n = c.shape[0], a.shape[1], c.shape[1]
    if m == 0 or n == 0:
        return
    view, k_contig = weight
    gated = h is not None
    block_n = BLOCK_N[gated]
    dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    b_block = [block_n, BLOCK_K] if k_contig else [BLOCK_K, block_n]

    def descriptor(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    c_desc = descriptor(c, [BLOCK_M, block_n])
    programs = num_programs(a.device)
    # Gathered, A's descriptor only gives the kernel its tile's type and shared layout.
    grouped_gemm_kernel[(programs,)](
        descriptor(a, [BLOCK_M, BLOCK_K]), descriptor(view, b_block), c_desc,
        descriptor(h, [BLOCK_M, block_n]) if gated else c_desc, a, a.stride(0),
        a_rows if a_rows is not None else offsets, c, c.stride(0), h if gated else c, h.stride(0) if gated else 0,
        offsets, m, n // 2 if gated else n, k, offsets.shape[0], K_CONTIG=k_contig, GATED=gated,
        ACTIVATION=activation, GATHER=a_rows is not None, STAGES=STAGES, GROUP=GROUP, num_warps=NUM_WARPS,
    )  # fmt: skip


if __name__ == "__main__":
    # Check + benchmark against the Triton kernel and CUTLASS on the fine-grained layer's down projection, and
    # against the Triton kernel on its gated gate_up forward (CUTLASS has no activation epilogue); the gate_up
    # forward and the down grad_h gathering their rows by cp.async against the same kernel on gather_rows' copy
    # (the copy's time is printed apart: the layer saves it).
    from prmc.kernels import grouped_gemm as triton_gemm
    from prmc.kernels import reference
    from prmc.kernels.check import random_routing, rel_err
    from prmc.kernels.gather_rows import gather_rows

    tokens, hidden, inter, experts, top_k = 8192, 2048, 768, 128, 8
    order, _, offsets = random_routing(tokens, experts, top_k, "cuda")
    rows = order // top_k
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    x_rows = x[rows]
    w_gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    h_ref, preact_ref = reference.expert_gate_up(x, order, top_k, offsets, w_gate_up, "silu", True)
    w_down = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
    b = w_down.transpose(1, 2)
    ref = torch._grouped_mm(h_ref, b, offs=offsets)
    grad_out = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    grad_out_rows = gather_rows(grad_out, rows)
    grad_h_ref = torch._grouped_mm(grad_out_rows, w_down, offs=offsets)
    weight = weight_operand(h_ref, b, ref)
    h, preact = torch.empty_like(h_ref), torch.empty_like(preact_ref)
    gate_up_b = w_gate_up.transpose(1, 2)
    gate_up_weight = weight_operand(x_rows, gate_up_b, preact, h)
    gathered_weight = weight_operand(x, gate_up_b, preact, h, rows)
    grad_h_weight = weight_operand(grad_out_rows, w_down, grad_h_ref)
    grad_h_gathered = weight_operand(grad_out, w_down, grad_h_ref, None, rows)
    assert None not in (weight, gate_up_weight, gathered_weight, grad_h_weight, grad_h_gathered)
    runs = {
        "down fwd gluon": lambda c: grouped_gemm(h_ref, offsets, weight, c),
        "down fwd triton": lambda c: triton_gemm.grouped_gemm("store", h_ref, offsets, b, c, n=hidden),
        "down fwd cutlass": lambda c: c.copy_(torch._grouped_mm(h_ref, b, offs=offsets)),
        "gate_up fwd gluon": lambda c: grouped_gemm(x_rows, offsets, gate_up_weight, c, h),
        "gate_up fwd gluon gathered": lambda c: grouped_gemm(x, offsets, gathered_weight, c, h, "silu", rows),
        "gate_up fwd triton": lambda c: triton_gemm.grouped_gemm("gate_up", x_rows, offsets, gate_up_b, c, n=inter, h=h, gated=True),
        "grad_h gluon on the copy": lambda c: grouped_gemm(grad_out_rows, offsets, grad_h_weight, c),
        "grad_h gluon gathered": lambda c: grouped_gemm(grad_out, offsets, grad_h_gathered, c, None, "silu", rows),
    }  # fmt: skip
    for name, run in runs.items():
        gate_up = name.startswith("gate_up")
        expected = preact_ref if gate_up else grad_h_ref if name.startswith("grad_h") else ref
        c = torch.full_like(expected, float("nan"))
        h.fill_(float("nan"))
        run(c)
        errors = f"preact {rel_err(c, preact_ref):.1e} h {rel_err(h, h_ref):.1e}" if gate_up else f"{rel_err(c, expected):.1e}"
        ms = triton.testing.do_bench(lambda: run(c), warmup=200, rep=300)
        tflops = 2 * h.shape[0] * inter * hidden * (2 if gate_up else 1) / ms / 1e9
        print(f"{name:28s} {ms:.3f} ms {tflops:.0f} TFLOP/s  rel err {errors}")
    ms = triton.testing.do_bench(lambda: gather_rows(grad_out, rows), warmup=200, rep=300)
    print(f"{'gather_rows (the copy)':28s} {ms:.3f} ms")
