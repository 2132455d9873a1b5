"""Gather: ``out[r] = src[rows[r]]``, one pass, for the products that cannot gather on load.

The story
---------
CUTLASS's grouped GEMM (:mod:`prmc.kernels.cutlass`) reads its operands as stored, and Hopper's TMA copies
whole tiles with no row gather, so on Hopper the token rows each routed row needs are gathered into a
sorted [M, N] copy first where the GEMM does not gather them by cp.async itself (the Gluon kernels do, up to
``triton_moe.MAX_GATHERED_COLUMNS`` / ``MAX_WEIGHT_GRAD_GATHERED_COLUMNS``): ``x`` for the wider gate_up weight
gradients (DeepSeek-V2-Lite's, Mixtral's) and Mixtral-class gate_up forwards, ``grad_out`` for the down weight
gradients over transposed tiles (DeepSeek-V2-Lite's) and Mixtral-class ones. ``src[rows]`` is the same copy;
this kernel writes it with 16-byte accesses along the row (32 rows x 256 columns per program), measured
0.06-0.09 ms at 8192 tokens on an H200 (benchmarks/results/moe_layer_breakdown.log).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import INTERPRET, LAUNCH_OPTIONS


@triton.jit
def gather_rows_kernel(
    src_ptr, rows_ptr, out_ptr, M, N, stride_src, stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    mask = m_ok[:, None] & (offs_n < N)[None, :]
    rows = tl.load(rows_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    tile = tl.load(src_ptr + rows[:, None] * stride_src + offs_n[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_out + offs_n[None, :], tile, mask=mask)


def gather_rows(src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``src[rows]``: [M, N], contiguous."""
    src = src.contiguous()
    m, n = rows.shape[0], src.shape[1]
    out = src.new_empty(m, n)
    if m == 0 or n == 0:
        return out
    block_m, block_n = (16, 16) if INTERPRET else (32, 256)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    gather_rows_kernel[grid](
        src, rows, out, m, n, src.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


if __name__ == "__main__":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens, hidden, routed = (8192, 2048, 65536) if device == "cuda" else (37, 48, 70)
    src = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    rows = torch.randint(0, tokens, (routed,), device=device)
    print("gather: exact" if torch.equal(gather_rows(src, rows), src[rows]) else "gather: MISMATCH")
    if device == "cuda":
        ms = triton.testing.do_bench(lambda: gather_rows(src, rows), return_mode="median")
        print(f"{ms:.3f} ms, {2 * routed * hidden * src.element_size() / ms / 1e6:.0f} GB/s")
