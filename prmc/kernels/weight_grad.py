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
to free multiprocessors as they come. Each program walks its group's rows BLOCK_K at a time.

Two ways to load the tiles. Where the GPU has TMA (Hopper on) and an operand is not gathered and is
16-byte aligned, the program makes a tensor descriptor on the device over just its group's rows (base at
the group's first row, extent the group's length): TMA zero-fills past the group's end, so the next
expert's rows never enter the sum and the loop needs no masks. Triton writes such descriptors into a
workspace it asks for at launch (``triton.set_allocator``). Elsewhere the tiles are pointer loads, rows
past the group's end are masked to zero, and an operand may be gathered on load through an index vector
(no permuted copy).

Measured at the layer's sizes (H200, bf16, 8192 tokens, benchmarks/KERNELS_NOTES.md, v8): through TMA on
gathered copies this kernel runs 405-409 TFLOP/s at Qwen3-30B-A3B sizes and 523-573 at Mixtral's, gathering
on load 324-353 and 393-431, and CUTLASS's K-grouped GEMM (:mod:`prmc.kernels.cutlass`) 432-489 and 589-655.
So in bf16 on Hopper the layer takes CUTLASS, and since v12 first the Gluon K-grouped kernel
(:mod:`prmc.kernels.gluon_weight_grad`, bf16 and fp16); this kernel serves fp32, the layouts those do not take
and the other devices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import (
    AUTOTUNE,
    LAUNCH_OPTIONS,
    descriptor_workspace,
    fp32_dot,
    gemm_configs,
    group_start,
    load_tile,
    mma,
    swizzle,
    tma_reads,
)


@triton.jit
def _operand_tile(
    src, rows_ptr, first, k, offs_k, k_mask, col, offs_c, c_ok, stride_m, stride_c,
    DESC: tl.constexpr, GATHER: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_K, BLOCK_C] tile of one operand at the group's rows k.. and columns col..: through the
    group's descriptor (``src`` a descriptor), or by pointers (``src`` the tensor; rows gathered through
    ``rows_ptr`` when GATHER, rows past the group's end masked to zero)."""
    if DESC:
        tile = src.load([k, col])
    else:
        if GATHER:
            row = tl.load(rows_ptr + first + offs_k, mask=k_mask, other=0).to(tl.int64)
        else:
            row = first + offs_k
        tile = load_tile(src + row[:, None] * stride_m + offs_c[None, :] * stride_c, k_mask, c_ok, True, not EVEN_C)
    return tile


@triton.autotune(
    configs=gemm_configs("BLOCK_P", "BLOCK_Q"), key=["P", "Q", "GATHER_L", "GATHER_R", "L_DESC", "R_DESC"], **AUTOTUNE
)
@triton.heuristics(
    {"EVEN_P": lambda args: args["P"] % args["BLOCK_P"] == 0, "EVEN_Q": lambda args: args["Q"] % args["BLOCK_Q"] == 0}
)
@triton.jit
def weight_grad_kernel(
    l_ptr, l_rows_ptr, r_ptr, r_rows_ptr, offsets_ptr, out_ptr,
    P, Q,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_oe, stride_op, stride_oq,
    GATHER_L: tl.constexpr, GATHER_R: tl.constexpr, L_DESC: tl.constexpr, R_DESC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    EVEN_P: tl.constexpr, EVEN_Q: tl.constexpr,
):  # fmt: skip
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    e = pid // (num_p * num_q)
    pid_p, pid_q = swizzle(pid % (num_p * num_q), num_p, num_q, GROUP)
    row_begin = group_start(offsets_ptr, e)
    rows = tl.load(offsets_ptr + e) - row_begin

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    # The group's rows as a tensor of their own: TMA zero-fills past its end, so the next expert's rows
    # never enter the sum and the loop needs no masks.
    first = row_begin.to(tl.int64)
    l_desc, r_desc = l_ptr, r_ptr  # pointer loads where there is no descriptor
    if L_DESC:
        l_desc = tl.make_tensor_descriptor(l_ptr + first * stride_lm, [rows, P], [stride_lm, 1], [BLOCK_K, BLOCK_P])
    if R_DESC:
        r_desc = tl.make_tensor_descriptor(r_ptr + first * stride_rm, [rows, Q], [stride_rm, 1], [BLOCK_K, BLOCK_Q])
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for k in range(0, rows, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < rows
        l_tile = _operand_tile(
            l_desc, l_rows_ptr, first, k, offs_k, k_mask, pid_p * BLOCK_P, offs_p, p_ok, stride_lm, stride_lp,
            L_DESC, GATHER_L, EVEN_P,
        )  # fmt: skip
        r_tile = _operand_tile(
            r_desc, r_rows_ptr, first, k, offs_k, k_mask, pid_q * BLOCK_Q, offs_q, q_ok, stride_rm, stride_rq,
            R_DESC, GATHER_R, EVEN_Q,
        )  # fmt: skip
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
    tma: bool = True,
):
    """Write ``out[e] = left[left_rows][g_e].T @ right[right_rows][g_e]`` for every group g_e.
    Returns the launched kernel (its ``asm``, ``n_regs``, ``n_spills`` for inspection).

    ``out`` is [E, P, Q] (any strides); P = left's columns, Q = right's columns. ``tma``: read the operands
    that are not gathered through TMA where the device and their layouts allow (False: pointer loads).
    """
    experts, p, q = out.shape
    l_desc = tma and left_rows is None and tma_reads(left)
    r_desc = tma and right_rows is None and tma_reads(right)
    if l_desc or r_desc:
        descriptor_workspace(left.device)

    def grid(meta):
        return (experts * triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]),)

    return weight_grad_kernel[grid](
        left, left_rows if left_rows is not None else offsets, right,
        right_rows if right_rows is not None else offsets, offsets, out,
        p, q,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), *out.stride(),
        GATHER_L=left_rows is not None, GATHER_R=right_rows is not None, L_DESC=l_desc, R_DESC=r_desc,
        FP32_DOT=fp32_dot(left.dtype), **LAUNCH_OPTIONS,
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
