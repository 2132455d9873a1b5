"""Grouped weight gradient: ``grad_W[e] = sum over e's rows r of  L[l(r)]^T R[r(r)]``.

The story
---------
The gradient of an expert's weight reduces over that expert's rows: a GEMM whose reduction (K) dimension
is the group, of variable length, possibly zero (an expert nobody chose gets a zero gradient). Both
weight gradients of an MoE layer are this kernel:

==================  ================================  ==========================  ===============
weight              L (rows along K, columns -> P)    R (rows along K, -> Q)      out [E, P, Q]
==================  ================================  ==========================  ===============
gate_up [E, F, H]   d preact (sorted rows)            x[rows] (gathered)          P = F, Q = H
down    [E, H, I]   grad_out[rows] (gathered)         scale * h (sorted rows)     P = H, Q = I
==================  ================================  ==========================  ===============

One program per output tile (e, p-block, q-block): the output has a fixed size, so a plain grid needs
no scheduler, and the hardware hands the long tiles of a hot expert and the short ones of a cold expert
to free multiprocessors as they come. Each program walks its group's rows BLOCK_K at a time; rows past
the group's end are masked to zero (they belong to the next expert). The gathers happen on the tile as it
is loaded, so no permuted copy is written (``scale * h`` comes from :mod:`prmc.kernels.mlp_grad_rows`).

On Hopper in bf16 the layer uses CUTLASS's K-grouped GEMM instead (:mod:`prmc.kernels.cutlass`), on a
materialised gathered operand: measured on an H100 (benchmarks/KERNELS_NOTES.md, v3), this kernel, best
tile of a 12-config sweep, runs at 250-410 TFLOP/s where CUTLASS runs at 480-650, and the gather costs
0.1-0.2 ms at 8192 tokens. This kernel serves the other dtypes and devices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import fp32_dot, gemm_configs, group_start, load_tile, mma, swizzle


@triton.autotune(configs=gemm_configs("BLOCK_P", "BLOCK_Q"), key=["P", "Q", "GATHER_L", "GATHER_R"])
@triton.heuristics(
    {"EVEN_P": lambda args: args["P"] % args["BLOCK_P"] == 0, "EVEN_Q": lambda args: args["Q"] % args["BLOCK_Q"] == 0}
)
@triton.jit
def weight_grad_kernel(
    l_ptr, l_rows_ptr, r_ptr, r_rows_ptr, offsets_ptr, out_ptr,
    P, Q,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_oe, stride_op, stride_oq,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_P: tl.constexpr, EVEN_Q: tl.constexpr,
):  # fmt: skip
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    e = pid // (num_p * num_q)
    pid_p, pid_q = swizzle(pid % (num_p * num_q), num_p, num_q, GROUP)
    row_begin = group_start(offsets_ptr, e)
    row_end = tl.load(offsets_ptr + e)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for k in range(row_begin, row_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < row_end
        if GATHER_L:
            l_row = tl.load(l_rows_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
        else:
            l_row = offs_k.to(tl.int64)
        if GATHER_R:
            r_row = tl.load(r_rows_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
        else:
            r_row = offs_k.to(tl.int64)
        l_tile = load_tile(l_ptr + l_row[:, None] * stride_lm + offs_p[None, :] * stride_lp, k_mask, p_ok, True, not EVEN_P)
        r_tile = load_tile(r_ptr + r_row[:, None] * stride_rm + offs_q[None, :] * stride_rq, k_mask, q_ok, True, not EVEN_Q)
        acc = mma(tl.trans(l_tile), r_tile, acc, FP32_DOT)

    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


def weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor,
    *,
    left_rows: torch.Tensor | None = None,
    right_rows: torch.Tensor | None = None,
):
    """Write ``out[e] = left[left_rows][g_e].T @ right[right_rows][g_e]`` for every group g_e.
    Returns the launched kernel (its ``asm``, ``n_regs``, ``n_spills`` for inspection).

    ``out`` is [E, P, Q] (any strides); P = left's columns, Q = right's columns.
    """
    experts, p, q = out.shape

    def grid(meta):
        return (experts * triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]),)

    return weight_grad_kernel[grid](
        left, left_rows if left_rows is not None else offsets, right,
        right_rows if right_rows is not None else offsets, offsets, out,
        p, q,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), *out.stride(),
        GATHER_L=left_rows is not None, GATHER_R=right_rows is not None, FP32_DOT=fp32_dot(left.dtype),
    )  # fmt: skip


if __name__ == "__main__":
    # Check + benchmark of the gate_up weight gradient against the reference's product.
    from prmc.kernels.check import random_routing, rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, hidden, f, experts, top_k = (8192, 2048, 1536, 128, 8) if device == "cuda" else (37, 48, 40, 5, 2)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    order, _, offsets = random_routing(tokens, experts, top_k, device)
    rows = order // top_k
    dpre = torch.randn(rows.shape[0], f, device=device, dtype=dtype)
    grad_w = x.new_empty(experts, f, hidden)
    weight_grad(dpre, x, offsets, grad_w, right_rows=rows)
    ends = offsets.tolist()  # NOTE: host sync, for the check only
    expected = torch.stack([
        dpre[s:t].double().t() @ x[rows[s:t]].double() for s, t in zip([0] + ends[:-1], ends)
    ])  # fmt: skip
    print(f"weight grad: rel err {rel_err(grad_w, expected):.2e}")
    if device == "cuda":
        ms = triton.testing.do_bench(lambda: weight_grad(dpre, x, offsets, grad_w, right_rows=rows), return_mode="median")
        print(f"{ms:.3f} ms, {2 * rows.shape[0] * hidden * f / ms / 1e9:.0f} TFLOP/s")
