"""Row-grouped GEMM: ``C[r] = A[src(r)] @ B[e(r)]`` over expert groups of rows, with MoE epilogues.

The story
---------
After routing, the M routed rows are sorted by expert, and ``offsets[e]`` is the end row of expert
``e``'s group (int32, cumulative, like ``torch._grouped_mm``). Each group multiplies its rows by its own
[K, N] matrix B[e]. Every expert GEMM of an MoE layer that produces per-row outputs is this one kernel:

=================  ==================  ===========================  ============================================
use                A rows              B[e]                          epilogue
=================  ==================  ===========================  ============================================
gate_up forward    x[rows]             W_gate_up[e].T  [H, F]        "gate_up":   preact, h = act(gate) * up
down forward       h                   W_down[e].T     [I, H]        "store":     C (combined by prmc.kernels.combine)
down backward      grad_out[rows]      W_down[e]       [H, I]        "store":     C (to prmc.kernels.mlp_grad_rows)
gate_up grad_x     d preact            W_gate_up[e]    [F, H]        "store":     C (combined likewise)
=================  ==================  ===========================  ============================================

Two ways to load the tiles. Where the GPU has TMA (Hopper on) and a tensor's base and strides are 16-byte
aligned, B, and A when it is not gathered, are read through TMA tensor descriptors: the copy engine
fetches whole tiles into shared memory, zero-fills past the tensor's ends (no masks), and the warps keep
their registers and issue slots for the products. B's descriptor is three-dimensional, [E, rows, columns]
in the weight's storage order, so a tile never reaches into the next expert. Each program makes its
descriptors on the device, with the block of the config being run (so the configs need no pre-hook, and
the autotuner keeps its pick on disk: ``_triton_common.AUTOTUNE``). Elsewhere the tiles are
pointer loads, and A may be gathered on load through an index vector (no permuted copy of the tokens).
Hopper's TMA has no row gather, so there a gathered A is either loaded by pointers or gathered by
:mod:`prmc.kernels.gather_rows` first and then read through TMA; the layer does the second (measured
faster: benchmarks/KERNELS_NOTES.md, v7). B is addressed through its strides either way, so the weight may
be any view (the transposes above are free).

Persistent tile scheduler: one program per multiprocessor walks the tile list of all groups, tile ids
``pid, pid + P, pid + 2P, ...``. The group sizes live on the device, so the list is never built: each
program walks the groups in order, counting the tiles of each (``cdiv(rows, BLOCK_M) * cdiv(N, BLOCK_N)``),
and works on its tiles while they fall inside the current group. No host sync, no padding of groups,
empty groups cost nothing, and a last partial tile per group is masked. Within a group the tiles go in
bands of GROUP row-blocks (see ``swizzle``), so the programs running at one time share B tiles in L2.

Rows at and past ``offsets[-1]`` belong to no expert. The epilogues treat them as one more group whose
tiles store zeros (the reference leaves them zero).

Gated activation (SwiGLU and friends): the weight holds the gate rows first, then the up rows. A program
owns columns ``j`` of both halves, keeps two accumulators that share each A tile, and the epilogue writes
``preact`` (rounded to the output dtype, as the reference does) and ``h = act(gate) * up`` together.

The products that go back to token order (down forward, gate_up grad_x) are stored per routed row and
summed per token by :func:`prmc.kernels.combine.combine_rows`: fp32 atomics from this epilogue were
measured slower (benchmarks/KERNELS_NOTES.md, v4) and were not deterministic. (The Gluon kernel on Hopper adds them
into the tokens' rows by 16-byte bf16/fp16 reductions instead, unless deterministic algorithms are asked for:
``gluon_gemm.Combine``.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import (
    AUTOTUNE,
    LAUNCH_OPTIONS,
    activation,
    descriptor_workspace,
    fp32_dot,
    gemm_configs,
    load_tile,
    mma,
    num_programs,
    swizzle,
    tma_reads,
)


def _prune(configs, named_args, **kwargs):
    """Two accumulators (gated) do not fit a 128x256 tile in registers. With TMA (Hopper) the 4-warp tiles
    measured 15-50% slower than the best 8-warp tile on every product and size tried (H200, KERNELS_NOTES.md
    v7), so they are not offered there (fewer compiles and benchmarks when a shape is first seen)."""
    launch = {**named_args, **kwargs}  # the constexprs are keyword arguments of the launch
    if launch["GATED"]:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 128] or configs
    if launch["A_DESC"] or launch["B_DESC"]:
        configs = [c for c in configs if c.num_warps == 8] or configs
    return configs


@triton.jit
def _load_weight(desc, e, n, k, K_CONTIG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of expert ``e``'s B at (k, n) through its descriptor, from either
    storage order (a transposed view of K-contiguous storage stays a transposed read of shared memory)."""
    if K_CONTIG:
        tile = tl.trans(desc.load([e, n, k]).reshape(BLOCK_N, BLOCK_K))
    else:
        tile = desc.load([e, k, n]).reshape(BLOCK_K, BLOCK_N)
    return tile


@triton.autotune(
    configs=gemm_configs("BLOCK_M", "BLOCK_N"),
    key=["N", "K", "EPILOGUE", "GATED", "GATHER_A", "A_DESC", "B_DESC", "B_K_CONTIG"],
    prune_configs_by={"early_config_prune": _prune},
    **AUTOTUNE,
)
@triton.heuristics(
    {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0, "EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0}
)
@triton.jit
def grouped_gemm_kernel(
    a_ptr, a_rows_ptr, offsets_ptr, b_ptr, c_ptr, h_ptr,
    M, N, K, E, NUM_PROGRAMS,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_hm, stride_hn,
    EPILOGUE: tl.constexpr, GATHER_A: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr, FP32_DOT: tl.constexpr,
    A_DESC: tl.constexpr, B_DESC: tl.constexpr, B_K_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    num_n = tl.cdiv(N, BLOCK_N)
    a_desc, b_desc = a_ptr, b_ptr  # pointer loads where there is no descriptor
    if A_DESC:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
    if B_DESC:  # in the weight's storage order; the gated weight's columns are both halves
        if B_K_CONTIG:
            b_desc = tl.make_tensor_descriptor(
                b_ptr, [E, N * (1 + GATED), K], [stride_be, stride_bn, 1], [1, BLOCK_N, BLOCK_K]
            )
        else:
            b_desc = tl.make_tensor_descriptor(
                b_ptr, [E, K, N * (1 + GATED)], [stride_be, stride_bk, 1], [1, BLOCK_K, BLOCK_N]
            )
    tile = tl.program_id(0)
    first_tile = 0  # id of the current group's first tile
    row_begin = 0
    if not B_DESC:
        b_group_ptr = b_ptr  # advanced by stride_be per group: 64-bit pointer arithmetic, no int32 overflow
    for e in range(E + 1):  # group E: the unrouted rows, zeroed
        if e < E:
            row_end = tl.load(offsets_ptr + e)
        else:
            row_end = M
        num_m = tl.cdiv(row_end - row_begin, BLOCK_M)
        while tile < first_tile + num_m * num_n:
            pid_m, pid_n = swizzle(tile - first_tile, num_m, num_n, GROUP)
            offs_m = row_begin + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_mask = offs_m < row_end
            n_mask = offs_n < N
            out_mask = m_mask[:, None] & n_mask[None, :]
            offs_m64 = offs_m.to(tl.int64)
            if e < E:
                offs_k = tl.arange(0, BLOCK_K)
                # Pointer loads: out-of-tile rows read row 0 instead of being masked (always valid memory,
                # results never stored); columns and K are masked only where they can run out (load_tile).
                # Descriptor loads (TMA) zero-fill past the tensor's ends; A rows past the group's end read the
                # next group's rows, which only reach output rows that are not stored.
                if not A_DESC:
                    if GATHER_A:
                        a_row = tl.load(a_rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
                    else:
                        a_row = tl.where(m_mask, offs_m64, 0)
                    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
                if not B_DESC:
                    b_ptrs = b_group_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k in range(0, tl.cdiv(K, BLOCK_K)):
                    k_ok = offs_k < K - k * BLOCK_K
                    if A_DESC:
                        a = a_desc.load([row_begin + pid_m * BLOCK_M, k * BLOCK_K])
                    else:
                        a = load_tile(a_ptrs, m_mask, k_ok, False, not EVEN_K)
                    if B_DESC:
                        b = _load_weight(b_desc, e, pid_n * BLOCK_N, k * BLOCK_K, B_K_CONTIG, BLOCK_N, BLOCK_K)
                    else:
                        b = load_tile(b_ptrs, k_ok, n_mask, not EVEN_K, not EVEN_N)
                    acc = mma(a, b, acc, FP32_DOT)
                    if GATED:  # the up half: columns N..2N of the same weight
                        if B_DESC:
                            b_up = _load_weight(b_desc, e, N + pid_n * BLOCK_N, k * BLOCK_K, B_K_CONTIG, BLOCK_N, BLOCK_K)
                        else:
                            b_up = load_tile(b_ptrs + N * stride_bn, k_ok, n_mask, not EVEN_K, not EVEN_N)
                        acc_up = mma(a, b_up, acc_up, FP32_DOT)
                    if not A_DESC:
                        a_ptrs += BLOCK_K * stride_ak
                    if not B_DESC:
                        b_ptrs += BLOCK_K * stride_bk

                c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n[None, :] * stride_cn
                if EPILOGUE == "gate_up":
                    gate = acc.to(c_ptr.dtype.element_ty)
                    tl.store(c_ptrs, gate, mask=out_mask)
                    h = activation(gate.to(tl.float32), ACTIVATION)
                    if GATED:
                        up = acc_up.to(c_ptr.dtype.element_ty)
                        tl.store(c_ptrs + N * stride_cn, up, mask=out_mask)
                        h = h * up.to(tl.float32)
                    h_ptrs = h_ptr + offs_m64[:, None] * stride_hm + offs_n[None, :] * stride_hn
                    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)
                else:  # "store"
                    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
            else:  # rows routed to no expert
                zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty)
                c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n[None, :] * stride_cn
                tl.store(c_ptrs, zeros, mask=out_mask)
                if EPILOGUE == "gate_up":
                    if GATED:
                        tl.store(c_ptrs + N * stride_cn, zeros, mask=out_mask)
                    h_ptrs = h_ptr + offs_m64[:, None] * stride_hm + offs_n[None, :] * stride_hn
                    tl.store(h_ptrs, zeros.to(h_ptr.dtype.element_ty), mask=out_mask)
            tile += NUM_PROGRAMS
        first_tile += num_m * num_n
        row_begin = row_end
        if not B_DESC:
            b_group_ptr += stride_be


def grouped_gemm(
    epilogue: str,
    a: torch.Tensor,
    offsets: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    n: int,
    a_rows: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = False,
    tma: bool = True,
):
    """Launch the kernel over the groups of ``offsets``; writes ``c`` (and ``h``) in place.
    Returns the launched kernel (its ``asm``, ``n_regs``, ``n_spills`` for inspection), None if empty.

    ``b`` is [E, K, N'] as strides (any view; N' = 2n when gated, the up half after the gate half);
    ``m`` routed rows are ``offsets``' rows (``a_rows.shape[0]`` when gathering, else ``a.shape[0]``).
    ``tma``: read B, and A when it is not gathered, through TMA descriptors where the device and the
    layouts allow (False: pointer loads throughout, for comparison).
    """
    m = a_rows.shape[0] if a_rows is not None else a.shape[0]
    k = b.shape[1]
    if m == 0 or n == 0:
        return None
    b_k_contig = b.stride(1) == 1 and b.stride(2) != 1
    a_desc = tma and a_rows is None and tma_reads(a)
    b_desc = tma and tma_reads(b.transpose(1, 2) if b_k_contig else b)  # in its storage order
    if a_desc or b_desc:
        descriptor_workspace(a.device)
    programs = num_programs(a.device)
    return grouped_gemm_kernel[(programs,)](
        a, a_rows if a_rows is not None else offsets, offsets, b, c, h if h is not None else c,
        m, n, k, offsets.shape[0], programs,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        *(h.stride() if h is not None else (0, 0)),
        EPILOGUE=epilogue, GATHER_A=a_rows is not None, ACTIVATION=activation, GATED=gated, FP32_DOT=fp32_dot(a.dtype),
        A_DESC=a_desc, B_DESC=b_desc, B_K_CONTIG=b_k_contig, **LAUNCH_OPTIONS,
    )  # fmt: skip


if __name__ == "__main__":
    # Check + benchmark of the gate_up forward (the largest user of this kernel) against the reference.
    from prmc.kernels import reference
    from prmc.kernels.check import random_routing, rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, hidden, inter, experts, top_k = (8192, 2048, 768, 128, 8) if device == "cuda" else (37, 48, 40, 5, 2)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) / hidden**0.5
    order, _, offsets = random_routing(tokens, experts, top_k, device)
    rows = order // top_k
    h = x.new_empty(rows.shape[0], inter)
    preact = x.new_empty(rows.shape[0], 2 * inter)
    grouped_gemm("gate_up", x, offsets, w.transpose(1, 2), preact, n=inter, a_rows=rows, h=h, gated=True)
    h_ref, preact_ref = reference.expert_gate_up(x, order, top_k, offsets, w, "silu", True)
    print(f"gate_up forward: rel err h {rel_err(h, h_ref):.2e}, preact {rel_err(preact, preact_ref):.2e}")
    if device == "cuda":
        run = lambda: grouped_gemm(  # noqa: E731
            "gate_up", x, offsets, w.transpose(1, 2), preact, n=inter, a_rows=rows, h=h, gated=True
        )
        ms = triton.testing.do_bench(run, return_mode="median")
        print(f"{ms:.3f} ms, {2 * rows.shape[0] * hidden * 2 * inter / ms / 1e9:.0f} TFLOP/s")
