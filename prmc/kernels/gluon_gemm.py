"""Row-grouped GEMM in Gluon for Hopper: ``C[r] = A[r] @ B[e(r)]``, warp-specialized, pipelined across tiles.

The story
---------
The layer's per-row products (down forward, down grad_h, gate_up grad_x: the "store" epilogue of
:mod:`prmc.kernels.grouped_gemm`; and the gated gate_up forward) run one kernel. Hardware counters (v19) put these
products at the rate L2 feeds the multiprocessors: a 128 x 256 tile brings 48 KB per 64-deep k-step for 4.2 MFLOP.
A 192 x 256 tile brings 56 KB for 6.3 MFLOP (112 FLOP per byte against 85). Its fp32 accumulator takes three
warpgroups of 64 rows (128 registers per thread each); Triton's ``num_warps`` is a power of two, so the three are the
partitions of ``gl.warp_specialize``: the default one and two 4-warp workers, 168 registers each (the register file
split three ways).

Each program (one per multiprocessor) walks its tiles of all groups. A k-step's A (three 64 x 64 TMA boxes, one per
warpgroup) and B (256 x 64) land in one of three stages behind ``ready`` / ``empty`` mbarriers: every warpgroup waits
for ``ready``, runs its 64 rows against the shared B tile, and releases the stage of the step before (``empty``
counts three arrivals). Warpgroup 0 also issues the loads, two k-steps ahead of its wgmma and across tiles, so the
next tile's first loads are in flight during a tile's epilogue. The inner k-loop has no branches (the next tile's
coordinates are worked out once per tile). Each warpgroup stores its 64 rows in 64 x 128 pieces through its own
buffer: by TMA where they lie within the group, by a masked store where they reach past its end (a TMA store would
write the next group's rows).

Gated (SwiGLU and friends, the weight's gate rows first, then its up rows): a tile is 128 columns of the gate half
and the same 128 of the up half, loaded into the two halves of one B buffer, so one 64 x 256 ``wgmma`` per
warpgroup covers both. Each thread holds column j of both halves, so the epilogue splits the accumulator without
moving data and writes preact (both halves, rounded to the output dtype) and ``h = act(gate) * up``.

Gathered rows (``a_rows``: the routed rows of the gate_up forward and of the down grad_h, ``x[rows]`` and
``grad_out[rows]``): TMA has no row gather on Hopper, so each warpgroup copies its own 64 rows of a k-step's A tile
(only it reads them), 16 bytes per copy, by cp.async from the rows that ``a_rows`` names (looked up once per tile);
the copies run two k-steps ahead as the TMA loads do, and the warpgroup meets (a 128-thread barrier) once its copies
have landed and once before it overwrites a stage. No gathered copy of A is written, nor read back. Rows past their
group's end (a group's last tile) are zero-filled by masked copies that read nothing. Until v35 they read the source's
first row instead (every such row the same few L2 lines, likely queued behind each other): masking them made the two
gathered products 4% and 12% faster on DeepSeek-V2-Lite, 3% and 7% on OLMoE, level and 3% on Qwen3 (H100, bitwise
equal outputs; results/gather_mask_v35.log).

Combined (``Combine``: the down forward and grad_x, whose rows go back to token order): instead of being stored,
each 64 x 128 piece, times its rows' routing weights (down forward), is read back from the warpgroup's buffer 16
bytes per thread and added into its tokens' rows of the [T, N] output by ``red.global.add.v8`` reductions, which L2
carries out. The [M, N] rows are neither written nor read back by a combine pass; the additions run in the output's
dtype, in no fixed order. Measured (H100, bf16, 8192 tokens, v33; results/combine_in_epilogue_v33.log): the ten
products of the five layers 0.93-0.996x the time of the store + ``combine_rows``, the layer steps 0.99-1.005x. ncu:
the epilogue's extra instructions, not L2, are what the reductions cost, so each tile's tokens and routing weights
are loaded before its k-loop, and rows of another group are zeroed and added rather than masked (a masked reduction
costs a branch each).

Measured against the 128 x 256 kernel it replaced (H200, bf16, 8192 tokens, Triton 3.6; benchmarks/KERNELS_NOTES.md
v20, results/gluon_ab_v20.log; bitwise-equal outputs): Qwen3's four products 7-8% faster; DeepSeek-V2-Lite's 3.5%
and Mixtral's 1.7% faster in sum; OLMoE level (~1024 rows per expert leave its last 192-row tile a third full); the
skewed Qwen3 1% slower. Dense, the tile ran 11-15% faster than the 128 x 256 one and 3-7% faster than cuBLAS on the
layers' shapes (results/gluon_tile_192x256_v20.log).

Claimed tiles (``CLAIM``, where one expert's weight fits in half the L2: the fine-grained layers): a group's last
row tile holds fewer than 192 rows, and a warpgroup whose 64 rows all lie past the group's end runs no wgmma (the
same waits, copies and releases, so the stage barriers still count three). Its tile then finishes early, so a program
does not run a fixed share of the tiles (``pid + i * programs``) but claims its next one from a counter while it runs
one (warpgroup 1, by an atomic add, handed to the other two through shared memory): the tiles start in the order of
their numbers, and those that share an operand block still run side by side and find it in L2. The skip alone (fixed
shares) lost up to 8%: the programs holding the faster last tiles ran ahead of their neighbours, and A and B were read
from HBM 53-57% more (v37); on OLMoE and Qwen3 (6 and 3 row tiles per group, 132 programs) the same 22 or 44 programs
hold every last tile in every wave. The claim alone cost 1-3% while warpgroup 0, the loader, made it and waited for
its atomic (v38). Both together
(H100, three A/B runs, results/ab_claim_v38.log, ab_claim2_v38.log, ab_rot_v38.log; bitwise-equal stored outputs):
the four row products in sum 0.966-0.970x the time on OLMoE, 0.985-0.989x on DeepSeek-V2-Lite, 0.990-0.996x on Qwen3,
0.981-0.992x on the skewed Qwen3, but 1.018-1.046x on Mixtral (whose experts' 117-235 MB stream through L2 in step
only while every tile runs its full k-loop at the same pace), which keeps fixed shares and every wgmma.
Warpgroup 1 claims since v41: OLMoE's four row products 0.979, 0.995, 0.998 and 0.991x the time of warpgroup 0's claim
(1.2% in sum), DeepSeek-V2-Lite's level (0.991-1.003x), stored outputs bitwise equal, combined ones within noise
(H200, one A/B of 6 rounds, results/ab_v41_short.log, where this kernel is gg_dynskip_wg1: the same machine code but
for a few registers renamed in the down forward, results/sass_v41.log); on an H100 (v42, results/ab_v42.log) the
four in sum 0.981x (Qwen3), 0.985x (skewed Qwen3) and 0.983x (OLMoE) the time of warpgroup 0's claim.

Where it runs (``weight_operand``): CUDA sm90 (``wgmma`` is sm90a's), bf16/fp16, A and C (and h) read and
written through TMA (gathered: A's rows 16-byte aligned, K whole k-steps), at least two k-steps, and B laid out so
that a 2-D view ``[E * N, K]`` (K contiguous) or ``[E * K, N]`` (N contiguous) never lets a tile reach into the next
expert's matrix (nor a gate tile into the up half): N a multiple of the 256-wide tile (of 128 per half when gated)
in the first case, K a multiple of the 64-deep step in the second (and, gated, each half a multiple of 128).
Elsewhere the Triton kernel runs. One tile shape, so no autotuning.

Rows at and past ``offsets[-1]`` belong to no expert; the default warpgroup zeroes them after the tiles (the
reference leaves them zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from prmc.kernels._triton_common import (
    INTERPRET,
    LAUNCH_OPTIONS,
    activation,
    capability,
    num_programs,
    swizzle,
    tma_reads,
)

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

# A tile is three warpgroups of SUB_M rows (192); it leaves in SUB_M x PIECE pieces. REGISTERS: each warpgroup's
# registers per thread (the register file split three ways).
SUB_M, BLOCK_K, STAGES, GROUP, PIECE, REGISTERS = 64, 64, 3, 8, 128, 168
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
    if triton.cdiv(k, BLOCK_K) < STAGES - 1 or c.shape[1] != n or not (tma_reads(a) and tma_reads(c)):
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
    # The warpgroup that claims each program's next tile (``CLAIM``: ``_claim_tile``); not warpgroup 0, which issues
    # the loads and would wait for the atomic's round trip (v41).
    CLAIMING_WARPGROUP = gl.constexpr(1)

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
    def _row_starts(rows_ptr, first, limit, stride, COUNT: gl.constexpr, GATHER: gl.constexpr, layout: gl.constexpr,
                    ZERO_PAST: gl.constexpr = False):  # fmt: skip
        """Gathered, where the source rows of the gathered rows ``first .. first + COUNT`` start:
        ``rows[r] * stride``, in ``SliceLayout(1, layout)``; rows at and past ``limit`` (the row kernel: their group's
        end; the weight gradient: M) read the source's first row, which no output takes, or with ``ZERO_PAST`` get -8,
        which ``_copy_rows`` fills with zeros without reading (a 16-byte-aligned address all the same). Else nothing
        (0). The launchers guarantee 16-byte rows (TMA's alignment), which cp.async needs to copy 16 bytes at a time.
        (The row kernel passes ZERO_PAST: every group's last tile has such rows. The weight gradient does not: only its
        last k-step has any, and masking its copies compiled to more registers and instructions in its k-loop, v35.)"""
        if GATHER:
            r = first + gl.arange(0, COUNT, layout=gl.SliceLayout(1, layout))
            starts = gl.load(rows_ptr + r, mask=r < limit, other=0).to(gl.int64) * stride
            if ZERO_PAST:
                starts = gl.where(r < limit, starts, -8)
            return gl.multiple_of(starts, 8)
        else:
            return 0

    @gluon.jit
    def _copy_rows(buf, src_ptr, starts, col, layout: gl.constexpr, ZERO_PAST: gl.constexpr = False):
        """cp.async of the source rows at ``starts`` (``_row_starts``), columns ``col ..`` (as many as ``buf`` has),
        into ``buf``: each thread copies its 16-byte pieces of ``layout``; TMA has no row gather on Hopper. Visible to
        the wgmma once every copying thread has waited for its copies and they have met (``fence_async_shared``
        before). ``ZERO_PAST``: rows whose start is negative (``_row_starts``) are zero-filled, reading nothing."""
        cols = col + gl.arange(0, buf.shape[1], layout=gl.SliceLayout(0, layout))
        if ZERO_PAST:
            _async_load(buf, src_ptr + starts[:, None] + cols[None, :], mask=(starts >= 0)[:, None])
        else:
            _async_load(buf, src_ptr + starts[:, None] + cols[None, :])

    @gluon.jit
    def _free(GATHER: gl.constexpr):
        """Gathered: the copying threads meet before a k-step's copies, so that every warp is done with the wgmma that
        last read the stage they overwrite (the weight gradient: the CTA, whose two warpgroups both read each thread's
        copies; the row kernel: one warpgroup, its partition's barrier)."""
        if GATHER:
            _cta_barrier()

    @gluon.jit
    def _landed(GATHER: gl.constexpr, AHEAD: gl.constexpr):
        """Gathered: every thread's copies of the step about to be consumed have landed (those of the ``AHEAD`` steps
        loaded after it may be in flight) and the copying threads have met, so the wgmma that reads them sees them."""
        if GATHER:
            async_copy.wait_group(AHEAD)
            fence_async_shared()
            _cta_barrier()

    @gluon.jit
    def _store_masked(c_ptr, stride_cm, tile, off_m, off_n, row_end, N, BM: gl.constexpr, BN: gl.constexpr,
                      layout: gl.constexpr):  # fmt: skip
        """``tile`` into rows ``off_m ..`` (those < ``row_end``) and columns ``off_n ..`` (those < N), in ``layout``."""
        tile = gl.convert_layout(tile, layout)
        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        mask = (rows < row_end)[:, None] & (cols < N)[None, :]
        gl.store(c_ptr + rows.to(gl.int64)[:, None] * stride_cm + cols[None, :], tile, mask=mask)

    @gluon.jit
    def _load_weight(b_desc, bar, buf, b_row, n, k, pred, K_CONTIG: gl.constexpr, BK: gl.constexpr):
        """B's tile at columns ``n`` of the product, k-step ``k``, from either storage order."""
        if K_CONTIG:
            _tma_load(b_desc, [b_row + n, k * BK], bar, buf, pred)
        else:
            _tma_load(b_desc, [b_row + k * BK, n], bar, buf, pred)

    @gluon.jit
    def _fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, produced, off_m, b_row, off_n, N, k, pred, a_ptr, a_index,
              WHICH: gl.constexpr, K_CONTIG: gl.constexpr, GATED: gl.constexpr, GATHER: gl.constexpr,
              copy_layout: gl.constexpr):  # fmt: skip
        """Step ``produced``'s tiles (k-step ``k`` of the tile at ``off_m``, ``off_n``) into stage
        ``produced % STAGES``. The loading warpgroup (``WHICH`` 0) waits until all three have released the stage,
        then loads B (gated: the gate tile and its up tile, N columns further on, into the two halves of the B
        buffer, so one wgmma covers both) and, unless gathered, A's three 64-row boxes by TMA. Gathered, each
        warpgroup copies its own 64 rows by cp.async (``a_index``: ``_row_starts``; one commit group per step): only
        it reads them."""
        SUB_M: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        STAGES: gl.constexpr = ready.shape[0]
        CONSUMERS: gl.constexpr = a_bufs.shape[0] // STAGES
        s = produced % STAGES
        if GATHER:
            _copy_rows(a_bufs.index(s * CONSUMERS + WHICH), a_ptr, a_index, k * BK, copy_layout, True)
            async_copy.commit_group()
        if WHICH == 0:
            bar = ready.index(s)
            mbarrier.wait(empty.index(s), ((produced // STAGES) & 1) ^ 1, pred=pred)
            if GATHER:
                mbarrier.expect(bar, b_desc.block_type.nbytes * (1 + GATED), pred=pred)
            else:
                mbarrier.expect(bar, CONSUMERS * a_desc.block_type.nbytes + b_desc.block_type.nbytes * (1 + GATED),
                                pred=pred)  # fmt: skip
                for r in gl.static_range(CONSUMERS):
                    _tma_load(a_desc, [off_m + SUB_M * r, k * BK], bar, a_bufs.index(s * CONSUMERS + r), pred)
            if GATED:
                BN: gl.constexpr = b_desc.block_type.shape[0 if K_CONTIG else 1]
                dim: gl.constexpr = 0 if K_CONTIG else 1
                _load_weight(b_desc, bar, b_bufs.index(s).slice(0, BN, dim), b_row, off_n, k, pred, K_CONTIG, BK)
                _load_weight(b_desc, bar, b_bufs.index(s).slice(BN, BN, dim), b_row, N + off_n, k, pred, K_CONTIG, BK)
            else:
                _load_weight(b_desc, bar, b_bufs.index(s), b_row, off_n, k, pred, K_CONTIG, BK)

    @gluon.jit
    def _consume(a_bufs, b_bufs, ready, empty, acc, consumed, use_acc, WHICH: gl.constexpr, K_CONTIG: gl.constexpr,
                 GATHER: gl.constexpr, DRAIN: gl.constexpr, ACTIVE: gl.constexpr = True):  # fmt: skip
        """This warpgroup's wgmma of step ``consumed`` (none unless ``ACTIVE``) once its tiles have landed (gathered:
        its own copies too, and the warpgroup has met so every thread's are seen); returns with at most that wgmma in
        flight (none when ``DRAIN``), having released the stage of the step before (``use_acc``: one was in this tile)
        and met again (gathered) so that the copies about to overwrite that stage come after every warp's wgmma read
        it.

        NOTE: a tile's last step drains (``DRAIN``) right after its wgmma, not in the epilogue. Waited for later, with
        the next tile's loads issued in between, ptxas (Triton 3.6's, fp16 gated) hoisted the epilogue's first reads
        of the accumulator above the wait, reading it while the wgmma still wrote it (wrong results); right after the
        wgmma there is nowhere to hoist them to. tests/test_kernels.py scans the variants' SASS for such reads."""
        STAGES: gl.constexpr = ready.shape[0]
        CONSUMERS: gl.constexpr = a_bufs.shape[0] // STAGES
        s = consumed % STAGES
        _landed(GATHER, STAGES - 2)  # (the next step's copies may be in flight)
        mbarrier.wait(ready.index(s), (consumed // STAGES) & 1)
        if ACTIVE:
            b_tile = b_bufs.index(s).permute((1, 0)) if K_CONTIG else b_bufs.index(s)
            acc = warpgroup_mma(a_bufs.index(s * CONSUMERS + WHICH), b_tile, acc, use_acc=use_acc, is_async=True)
            if DRAIN:
                acc = warpgroup_mma_wait(0, (acc,))
            else:
                acc = warpgroup_mma_wait(1, (acc,))
        mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES), count=1, pred=use_acc)
        _free(GATHER)
        return acc

    @gluon.jit
    def _store_piece(desc, buf, piece, row, col, row_end, col_end, ptr, stride, full, store_layout: gl.constexpr):
        """A 64 x 128 piece of an output at (``row``, ``col``) through this warpgroup's buffer: by TMA when its rows
        lie within the group (``full``), else by a masked store of rows < ``row_end`` and columns < ``col_end`` (a
        TMA store would write the next group's rows), read back from the buffer in ``store_layout``."""
        tma.store_wait(pendings=0)  # the buffer's last TMA store has left
        buf.store(piece)
        if full:
            fence_async_shared()
            _tma_store(desc, [row, col], buf)
        else:
            _store_masked(ptr, stride, buf.load(store_layout), row, col, row_end, col_end, piece.shape[0],
                          piece.shape[1], store_layout)  # fmt: skip

    @gluon.jit
    def _row_weights(scale_ptr, row, row_end, M, COUNT: gl.constexpr, SCALED: gl.constexpr, layout: gl.constexpr):
        """What rows ``row .. row + COUNT`` are added to their tokens times (fp32, ``SliceLayout(1, layout)``): their
        routing weights (``SCALED``) or 1; 0 at and past ``row_end``, rows of another group."""
        r = row + gl.arange(0, COUNT, layout=gl.SliceLayout(1, layout))
        if SCALED:
            weight = gl.load(scale_ptr + gl.minimum(r, M - 1)).to(gl.float32)
        else:
            weight = gl.full([COUNT], 1.0, gl.float32, layout=gl.SliceLayout(1, layout))
        return gl.where(r < row_end, weight, 0.0)

    @gluon.jit
    def _row_tokens(tokens_ptr, row, M, COUNT: gl.constexpr, layout: gl.constexpr):
        """The tokens of rows ``row .. row + COUNT`` (rows past M: row M - 1's), in ``SliceLayout(1, layout)``."""
        return gl.load(tokens_ptr + gl.minimum(row + gl.arange(0, COUNT, layout=gl.SliceLayout(1, layout)), M - 1))

    @gluon.jit
    def _add_piece(buf, piece, col, out_ptr, stride_om, token, layout: gl.constexpr):
        """A 64 x 128 piece's rows added into their tokens' rows of the output (``token``: ``_row_tokens``), read back
        from this warpgroup's buffer in ``layout``: 16-byte reductions (``red.global.add.v8``) that L2 carries out, so
        no routed row is stored nor read back. Unmasked (a reduction under a mask costs a branch): rows of another
        group come zeroed (``_row_weights``) and add nothing to the token they name."""
        buf.store(piece)
        piece = buf.load(layout)
        cols = col + gl.arange(0, piece.shape[1], layout=gl.SliceLayout(0, layout))
        start = gl.multiple_of(token.to(gl.int64) * stride_om, 8)
        gl.atomic_add(out_ptr + start[:, None] + cols[None, :], piece, sem="relaxed")

    @gluon.jit
    def _tile_steps(a_desc, b_desc, a_bufs, b_bufs, ready, empty, acc, produced, consumed, kt, off_m, b_row, pid_n, N,
                    K, a_ptr, a_index, a_rows_ptr, stride_am, e, first, row_begin, row_end, group_tiles, offsets_ptr, E,
                    num_n, n_t, next_bufs, next_ready, next_free, i, total, WHICH: gl.constexpr,
                    K_CONTIG: gl.constexpr, GATED: gl.constexpr, GATHER: gl.constexpr, ACTIVE: gl.constexpr,
                    BLOCK_M: gl.constexpr, GROUP: gl.constexpr, store_layout: gl.constexpr):  # fmt: skip
        """``CLAIM``'s k-steps of a tile (its first is step ``consumed``), the last one drained, each loading the step
        LEAD ahead: the tile's own, then those of the next tile (``n_t``: warpgroup 1's claim; the others read it here),
        whose tile number and walk state it returns with the accumulator. Not ``ACTIVE`` (this warpgroup's rows all lie
        past the group's end): the same waits, copies and releases without the wgmma.

        (The fixed shares keep their own k-loop, with step counters carried through it: with this one, step numbers
        from a per-tile base, Mixtral's 224- and 448-step tiles ran 6-7% slower, v38 (d).)"""
        SUB_M: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = b_desc.block_type.shape[0 if K_CONTIG else 1]
        LEAD: gl.constexpr = ready.shape[0] - 1
        for k in range(kt - LEAD):
            acc = _consume(a_bufs, b_bufs, ready, empty, acc, consumed + k, k > 0, WHICH, K_CONTIG, GATHER, False,
                           ACTIVE)  # fmt: skip
            _fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, produced + k, off_m, b_row, pid_n * BN, N, k + LEAD,
                  True, a_ptr, a_index, WHICH, K_CONTIG, GATED, GATHER, store_layout)  # fmt: skip
        # The next tile's first loads go out under this tile's last k-steps and its epilogue.
        if WHICH != CLAIMING_WARPGROUP:
            n_t = _claimed_tile(next_bufs, next_ready, next_free, i)
        more = n_t < total
        n_e, n_first, n_row_begin, n_row_end, n_group_tiles, n_off_m, n_pid_n, n_b_row = _locate(
            n_t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, N, K, num_n, BLOCK_M, GROUP,
            K_CONTIG, GATED,
        )  # fmt: skip
        a_index = _row_starts(a_rows_ptr, n_off_m + SUB_M * WHICH, n_row_end, stride_am, SUB_M, GATHER, store_layout,
                              True)  # fmt: skip
        for j in gl.static_range(LEAD):
            acc = _consume(a_bufs, b_bufs, ready, empty, acc, consumed + kt - LEAD + j, kt - LEAD + j > 0, WHICH,
                           K_CONTIG, GATHER, j == LEAD - 1, ACTIVE)  # fmt: skip
            _fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, produced + kt - LEAD + j, n_off_m, n_b_row,
                  n_pid_n * BN, N, j, more, a_ptr, a_index, WHICH, K_CONTIG, GATED, GATHER, store_layout)  # fmt: skip
        return acc, n_t, n_e, n_first, n_row_begin, n_row_end, n_group_tiles, n_off_m, n_pid_n, n_b_row, a_index

    @gluon.jit
    def _claim_tile(next_tile_ptr, programs, next_bufs, next_ready, next_free, i):
        """Warpgroup 1, at the start of a program's ``i``-th tile: the tile it runs next, taken from the launch's
        counter (its first tiles are the programs' ids, so the counter starts at ``programs``), and handed to the
        other two warpgroups through slot ``i % 2`` of ``next_bufs`` behind ``next_ready`` (``next_free``: both have
        read the slot's last tile).

        Taken, not computed: tiles start in the order of their numbers however long each program's tiles took, so the
        tiles that read one operand block (neighbours in that order) still run at about the same time and find it in
        L2 when a group's last tiles run faster than whole ones (``CLAIM``'s wgmma skip). With a fixed share per program
        (tile ``pid + i * programs``) the programs holding those tiles run ahead, the others read A and B from HBM
        again (v37 (c)), and on the fine-grained layers the same tiles fall to the same programs in every wave (132
        programs, 6 or 3 row tiles per group). NOTE: warpgroup 1 waits here for the atomic's round trip to L2; not
        warpgroup 0, which issues the loads (v41)."""
        slot = i % 2
        mbarrier.wait(next_free.index(slot), ((i // 2) & 1) ^ 1)
        n_t = gl.atomic_add(next_tile_ptr, 1, sem="relaxed") + programs
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        next_bufs.index(slot).store(gl.full([1], n_t, gl.int32, layout))
        _cta_barrier()  # (every thread's store before the arrive)
        mbarrier.arrive(next_ready.index(slot), count=1)
        return n_t

    @gluon.jit
    def _claimed_tile(next_bufs, next_ready, next_free, i):
        """Warpgroups 0 and 2, at the end of their ``i``-th tile: the tile warpgroup 1 claimed next
        (``_claim_tile``)."""
        slot = i % 2
        mbarrier.wait(next_ready.index(slot), (i // 2) & 1)
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        n_t = gl.max(next_bufs.index(slot).load(layout), axis=0)
        _cta_barrier()  # (every thread's read before the arrive)
        mbarrier.arrive(next_free.index(slot), count=1)
        return n_t

    @gluon.jit
    def _tile_start(off_m, row_end, scale_ptr, tokens_ptr, M, SUB_M: gl.constexpr, WIDTH: gl.constexpr,
                    WHICH: gl.constexpr, COMBINE: gl.constexpr, SCALED: gl.constexpr, acc_layout: gl.constexpr,
                    store_layout: gl.constexpr):  # fmt: skip
        """Warpgroup ``WHICH``'s zeroed accumulator (SUB_M x WIDTH) for the tile at ``off_m``, its first row, and
        (``COMBINE``) its rows' weights and tokens, looked up before the k-loop so that the epilogue does not wait for
        them."""
        # (a fresh accumulator per tile: one carried from the last would stay live through the epilogue)
        acc = gl.zeros((SUB_M, WIDTH), dtype=gl.float32, layout=acc_layout)
        row = off_m + SUB_M * WHICH
        weights = 0
        tokens = 0
        if COMBINE:
            weights = _row_weights(scale_ptr, row, row_end, M, SUB_M, SCALED, acc_layout)
            tokens = _row_tokens(tokens_ptr, row, M, SUB_M, store_layout)
        return acc, row, weights, tokens

    @gluon.jit
    def _epilogue(acc, weights, tokens, row, row_end, off_n, buf, c_desc, h_desc, c_ptr, stride_cm, h_ptr, stride_hm, N,
                  GATED: gl.constexpr, ACTIVATION: gl.constexpr, COMBINE: gl.constexpr, SCALED: gl.constexpr,
                  store_layout: gl.constexpr):  # fmt: skip
        """A warpgroup's 64 rows of a tile (``acc``, the tile's columns from ``off_n``) into the outputs: stored (by TMA
        within the group, masked past its end), gated (preact and h), or added into their tokens' rows (``COMBINE``:
        ``weights`` and ``tokens`` from ``_row_weights`` and ``_row_tokens``)."""
        SUB_M: gl.constexpr = acc.shape[0]
        BN: gl.constexpr = acc.shape[1] // (1 + GATED)
        dtype: gl.constexpr = c_desc.dtype
        full = row + SUB_M <= row_end
        # The accumulator's halves (gated: the gate and up tiles; else 128 columns each): each thread holds
        # column j of both, so the split moves no data.
        if SCALED or (COMBINE and not full):  # (routing weights before rounding; another group's rows zeroed)
            acc = acc * weights[:, None]
        lo, hi = acc.reshape([SUB_M, 2, BN * (1 + GATED) // 2]).permute((0, 2, 1)).split()
        lo = lo.to(dtype)
        hi = hi.to(dtype)
        if GATED:
            # preact rounded to the output dtype, and h from the rounded values (as the reference does)
            h = (activation(lo.to(gl.float32), ACTIVATION) * hi.to(gl.float32)).to(dtype)
            _store_piece(c_desc, buf, lo, row, off_n, row_end, N, c_ptr, stride_cm, full, store_layout)
            _store_piece(c_desc, buf, hi, row, N + off_n, row_end, 2 * N, c_ptr, stride_cm, full, store_layout)
            _store_piece(h_desc, buf, h, row, off_n, row_end, N, h_ptr, stride_hm, full, store_layout)
        elif COMBINE:
            _add_piece(buf, lo, off_n, c_ptr, stride_cm, tokens, store_layout)
            _add_piece(buf, hi, off_n + BN // 2, c_ptr, stride_cm, tokens, store_layout)
        else:
            _store_piece(c_desc, buf, lo, row, off_n, row_end, N, c_ptr, stride_cm, full, store_layout)
            _store_piece(c_desc, buf, hi, row, off_n + BN // 2, row_end, N, c_ptr, stride_cm, full, store_layout)

    @gluon.jit
    def _partition(args, WHICH: gl.constexpr, K_CONTIG: gl.constexpr, GATED: gl.constexpr, ACTIVATION: gl.constexpr,
                   GATHER: gl.constexpr, COMBINE: gl.constexpr, SCALED: gl.constexpr, CLAIM: gl.constexpr,
                   GROUP: gl.constexpr):  # fmt: skip
        """Warpgroup ``WHICH`` of the three: rows ``64 * WHICH ..`` of every tile of this program; warpgroup 0 also
        issues the TMA loads, STAGES - 1 steps ahead of its wgmma, through every tile's epilogue. A program's tiles:
        ``pid + i * programs``, or (``CLAIM``) the next claimed while it runs one (``_claim_tile``), with a
        warpgroup's wgmma skipped where its rows all lie past the group's end."""
        (a_desc, b_desc, c_desc, h_desc, a_ptr, stride_am, a_rows_ptr, c_ptr, stride_cm, h_ptr, stride_hm,
         tokens_ptr, scale_ptr, offsets_ptr, M, N, K, E, total, a_bufs, b_bufs, c_bufs, ready, empty, next_tile_ptr,
         next_bufs, next_ready, next_free) = args  # fmt: skip
        SUB_M: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0 if K_CONTIG else 1]  # (gated: of each half)
        STAGES: gl.constexpr = ready.shape[0]
        BLOCK_M: gl.constexpr = SUB_M * c_bufs.shape[0]
        LEAD: gl.constexpr = STAGES - 1  # steps loaded ahead of the wgmma
        WIDTH: gl.constexpr = BN * (1 + GATED)  # (the accumulator's columns)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, WIDTH, 16])  # fmt: skip
        # (also the gathered A tile's: 8 elements, one 16-byte copy, per thread along its row of 64)
        store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        num_n = gl.cdiv(N, BN)
        kt = gl.cdiv(K, BK)
        pid = gl.program_id(0)
        programs = gl.num_programs(0)
        my_tiles = gl.cdiv(total - pid, programs)
        buf = c_bufs.index(WHICH)

        t = pid
        e = 0
        first = 0
        row_begin = 0
        row_end = gl.load(offsets_ptr)
        group_tiles = gl.cdiv(row_end, BLOCK_M) * num_n
        e, first, row_begin, row_end, group_tiles, off_m, pid_n, b_row = _locate(
            t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, N, K, num_n, BLOCK_M, GROUP, K_CONTIG, GATED
        )
        a_index = _row_starts(a_rows_ptr, off_m + SUB_M * WHICH, row_end, stride_am, SUB_M, GATHER, store_layout, True)
        produced = 0
        consumed = 0
        if CLAIM:
            any_tile = t < total
        else:
            any_tile = my_tiles > 0
        for j in gl.static_range(LEAD):
            _fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, produced, off_m, b_row, pid_n * BN, N, j, any_tile,
                  a_ptr, a_index, WHICH, K_CONTIG, GATED, GATHER, store_layout)  # fmt: skip
            produced += 1

        if CLAIM:
            i = 0
            while t < total:
                if WHICH == CLAIMING_WARPGROUP:  # (read by the other two at this tile's end)
                    n_t = _claim_tile(next_tile_ptr, programs, next_bufs, next_ready, next_free, i)
                else:
                    n_t = t  # (the claimed one is read in _tile_steps)
                acc, row, weights, tokens = _tile_start(off_m, row_end, scale_ptr, tokens_ptr, M, SUB_M, WIDTH, WHICH,
                                                        COMBINE, SCALED, acc_layout, store_layout)  # fmt: skip
                steps = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, acc, produced, consumed, kt, off_m, b_row, pid_n,
                         N, K, a_ptr, a_index, a_rows_ptr, stride_am, e, first, row_begin, row_end, group_tiles,
                         offsets_ptr, E, num_n, n_t, next_bufs, next_ready, next_free, i, total)  # fmt: skip
                # Warpgroup 0's rows start every tile; the others run no wgmma where their rows all lie past the end.
                if WHICH == 0:
                    walk = _tile_steps(*steps, WHICH, K_CONTIG, GATED, GATHER, True, BLOCK_M, GROUP, store_layout)
                elif row < row_end:
                    walk = _tile_steps(*steps, WHICH, K_CONTIG, GATED, GATHER, True, BLOCK_M, GROUP, store_layout)
                else:
                    walk = _tile_steps(*steps, WHICH, K_CONTIG, GATED, GATHER, False, BLOCK_M, GROUP, store_layout)
                acc, n_t, n_e, n_first, n_row_begin, n_row_end, n_group_tiles, n_off_m, n_pid_n, n_b_row, a_index = walk
                produced += kt
                consumed += kt
                mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES), count=1)  # (the last step drained)
                _epilogue(acc, weights, tokens, row, row_end, pid_n * BN, buf, c_desc, h_desc, c_ptr, stride_cm, h_ptr,
                          stride_hm, N, GATED, ACTIVATION, COMBINE, SCALED, store_layout)  # fmt: skip
                t, e, first, row_begin, row_end, group_tiles = n_t, n_e, n_first, n_row_begin, n_row_end, n_group_tiles
                off_m, pid_n, b_row = n_off_m, n_pid_n, n_b_row
                i += 1
        else:
            for i in range(my_tiles):
                acc, row, weights, tokens = _tile_start(off_m, row_end, scale_ptr, tokens_ptr, M, SUB_M, WIDTH, WHICH,
                                                        COMBINE, SCALED, acc_layout, store_layout)  # fmt: skip
                for k in range(kt - LEAD):
                    acc = _consume(a_bufs, b_bufs, ready, empty, acc, consumed, k > 0, WHICH, K_CONTIG, GATHER, False)
                    _fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, produced, off_m, b_row, pid_n * BN, N, k + LEAD,
                          True, a_ptr, a_index, WHICH, K_CONTIG, GATED, GATHER, store_layout)  # fmt: skip
                    produced += 1
                    consumed += 1
                # The next tile's first loads go out under this tile's last k-steps and its epilogue.
                n_t = t + programs
                n_e, n_first, n_row_begin, n_row_end, n_group_tiles, n_off_m, n_pid_n, n_b_row = _locate(
                    n_t, e, first, row_begin, row_end, group_tiles, offsets_ptr, E, N, K, num_n, BLOCK_M, GROUP,
                    K_CONTIG, GATED,
                )  # fmt: skip
                a_index = _row_starts(a_rows_ptr, n_off_m + SUB_M * WHICH, n_row_end, stride_am, SUB_M, GATHER,
                                      store_layout, True)  # fmt: skip
                for j in gl.static_range(LEAD):
                    acc = _consume(a_bufs, b_bufs, ready, empty, acc, consumed, kt - LEAD + j > 0, WHICH, K_CONTIG,
                                   GATHER, j == LEAD - 1)  # fmt: skip
                    _fill(a_desc, b_desc, a_bufs, b_bufs, ready, empty, produced, n_off_m, n_b_row, n_pid_n * BN, N, j,
                          i + 1 < my_tiles, a_ptr, a_index, WHICH, K_CONTIG, GATED, GATHER, store_layout)  # fmt: skip
                    produced += 1
                    consumed += 1
                mbarrier.arrive(empty.index((consumed + STAGES - 1) % STAGES), count=1)  # (the last step drained)

                _epilogue(acc, weights, tokens, row, row_end, pid_n * BN, buf, c_desc, h_desc, c_ptr, stride_cm, h_ptr,
                          stride_hm, N, GATED, ACTIVATION, COMBINE, SCALED, store_layout)  # fmt: skip
                t, e, first, row_begin, row_end, group_tiles = n_t, n_e, n_first, n_row_begin, n_row_end, n_group_tiles
                off_m, pid_n, b_row = n_off_m, n_pid_n, n_b_row
        tma.store_wait(pendings=0)
        if GATHER:
            async_copy.wait_group(0)  # (the last tile's lookahead copies, of no tile)

    @gluon.jit
    def _zero_rows(ptr, stride, first, M, N, BN: gl.constexpr):
        """Zeros into rows ``first .. M`` of an [M, N] output, this program's share of its 64 x BN blocks."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        zeros = gl.zeros((64, BN), dtype=ptr.dtype.element_ty, layout=layout)
        num_n = gl.cdiv(N, BN)
        for blk in range(gl.program_id(0), gl.cdiv(M - first, 64) * num_n, gl.num_programs(0)):
            _store_masked(ptr, stride, zeros, first + (blk // num_n) * 64, (blk % num_n) * BN, M, N, 64, BN, layout)

    @gluon.jit
    def grouped_gemm_kernel(a_desc, b_desc, c_desc, h_desc, a_ptr, stride_am, a_rows_ptr, c_ptr, stride_cm, h_ptr,
                            stride_hm, tokens_ptr, scale_ptr, offsets_ptr, M, N, K, E, next_tile_ptr,
                            K_CONTIG: gl.constexpr, GATED: gl.constexpr, ACTIVATION: gl.constexpr, GATHER: gl.constexpr,
                            COMBINE: gl.constexpr, SCALED: gl.constexpr, CLAIM: gl.constexpr, STAGES: gl.constexpr,
                            GROUP: gl.constexpr, REGISTERS: gl.constexpr):  # fmt: skip
        CONSUMERS: gl.constexpr = 3  # warpgroups, each 64 rows of the tile: the default partition and two workers
        SUB_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = CONSUMERS * SUB_M
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0 if K_CONTIG else 1]
        dtype: gl.constexpr = a_desc.dtype
        num_n = gl.cdiv(N, BN)
        total = 0  # tiles of all groups
        prev = 0
        for g in range(E):
            end = gl.load(offsets_ptr + g)
            total += gl.cdiv(end - prev, BLOCK_M) * num_n
            prev = end

        a_bufs = gl.allocate_shared_memory(dtype, [STAGES * CONSUMERS] + a_desc.block_type.shape, a_desc.layout)
        if K_CONTIG:
            b_block: gl.constexpr = [BN * (1 + GATED), BK]
        else:
            b_block: gl.constexpr = [BK, BN * (1 + GATED)]
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_block, b_desc.layout)
        c_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        if CLAIM:  # (the claimed tiles' hand-over from warpgroup 1 to the others: _claim_tile)
            next_bufs = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
            next_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            next_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(next_ready.index(i), count=1)
                mbarrier.init(next_free.index(i), count=CONSUMERS - 1)
        else:
            next_bufs, next_ready, next_free = ready, ready, ready  # (unused)
        args = (a_desc, b_desc, c_desc, h_desc, a_ptr, stride_am, a_rows_ptr, c_ptr, stride_cm, h_ptr, stride_hm,
                tokens_ptr, scale_ptr, offsets_ptr, M, N, K, E, total, a_bufs, b_bufs, c_bufs, ready, empty,
                next_tile_ptr, next_bufs, next_ready, next_free)  # fmt: skip
        # (constexprs passed inline: one held in a tuple reaches a worker partition as a runtime value)
        gl.warp_specialize(
            [
                (_partition, (args, 0, K_CONTIG, GATED, ACTIVATION, GATHER, COMBINE, SCALED, CLAIM, GROUP)),
                (_partition, (args, 1, K_CONTIG, GATED, ACTIVATION, GATHER, COMBINE, SCALED, CLAIM, GROUP)),
                (_partition, (args, 2, K_CONTIG, GATED, ACTIVATION, GATHER, COMBINE, SCALED, CLAIM, GROUP)),
            ],
            [4, 4],
            [REGISTERS, REGISTERS],
        )
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
        if CLAIM:
            for i in gl.static_range(2):
                mbarrier.invalidate(next_ready.index(i))
                mbarrier.invalidate(next_free.index(i))

        # Rows routed to no expert: zeros (preact's both halves and h when gated), by the default warpgroup; combined,
        # they add nothing.
        if not COMBINE:
            routed = gl.load(offsets_ptr + E - 1)
            _zero_rows(c_ptr, stride_cm, routed, M, N * (1 + GATED), c_desc.block_type.shape[1])
            if GATED:
                _zero_rows(h_ptr, stride_hm, routed, M, N, c_desc.block_type.shape[1])


@dataclass
class Combine:
    """The product's rows added into their tokens' rows of the output instead of stored: routed row r goes to row
    ``tokens[r]`` times ``scale[r]`` (both [M], routed-row order; no scale: 1)."""

    tokens: torch.Tensor  # int32 or int64
    scale: torch.Tensor | None = None


def grouped_gemm(
    a: torch.Tensor,
    offsets: torch.Tensor,
    weight: tuple[torch.Tensor, bool],
    c: torch.Tensor,
    h: torch.Tensor | None = None,
    activation: str = "silu",
    a_rows: torch.Tensor | None = None,
    combine: Combine | None = None,
) -> None:
    """``c[r] = a[a_rows[r]] @ b[e(r)]`` (``a[r]`` without ``a_rows``) over the groups of ``offsets`` (int32 group
    ends), rows past ``offsets[-1]`` zeroed; ``weight`` = ``weight_operand(a, b, c, h, a_rows)``, c [M, N'], written
    in place. ``h`` given: the gated product, ``h = act(gate) * up`` from c's two halves (each rounded to c's dtype
    first). ``combine`` given (the store product, ``a`` not gathered): c [T, N'] is the tokens' output, and each
    routed row is added into its token's row (rounded to c's dtype, then added by the L2 in c's dtype: the order of
    the additions varies from run to run); rows past ``offsets[-1]`` add nothing."""
    assert combine is None or a_rows is None, "a combined product reads A through TMA"
    k, n = a.shape[1], c.shape[1]
    m = a.shape[0] if combine is not None else c.shape[0]
    if m == 0 or n == 0:
        return
    view, k_contig = weight
    gated = h is not None
    block_n = BLOCK_N[gated]
    dtype = gl.bfloat16 if a.dtype == torch.bfloat16 else gl.float16
    b_block = [block_n, BLOCK_K] if k_contig else [BLOCK_K, block_n]

    def descriptor(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    c_desc = descriptor(c, [SUB_M, PIECE])
    programs = num_programs(a.device)
    scale = combine.scale if combine is not None else None
    # Claimed tiles and the idle warpgroups' wgmma skipped (CLAIM, the story above) where one expert's weight fits in
    # half the L2: the fine-grained layers' 3-12 MB, not Mixtral's 117-235 MB.
    claim = k * n * a.element_size() <= torch.cuda.get_device_properties(a.device).L2_cache_size // 2
    # Gathered, A's descriptor only gives the kernel its tile's type and shared layout.
    grouped_gemm_kernel[(programs,)](
        descriptor(a, [SUB_M, BLOCK_K]), descriptor(view, b_block), c_desc,
        descriptor(h, [SUB_M, PIECE]) if gated else c_desc, a, a.stride(0),
        a_rows if a_rows is not None else offsets, c, c.stride(0), h if gated else c, h.stride(0) if gated else 0,
        combine.tokens if combine is not None else offsets, scale if scale is not None else c, offsets, m,
        n // 2 if gated else n, k, offsets.shape[0],
        torch.zeros(1, device=a.device, dtype=torch.int32) if claim else offsets,  # (the claims' counter)
        K_CONTIG=k_contig, GATED=gated, ACTIVATION=activation, GATHER=a_rows is not None, COMBINE=combine is not None,
        SCALED=scale is not None, CLAIM=claim, STAGES=STAGES, GROUP=GROUP, REGISTERS=REGISTERS, num_warps=4,
        maxnreg=REGISTERS, **LAUNCH_OPTIONS,
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
