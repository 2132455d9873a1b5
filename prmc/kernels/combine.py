"""Combine: ``out[t] = sum over the routed rows r of token t of  scale[r] * y[r]``, deterministic.

The story
---------
Two expert products of an MoE layer come out one row per routed (token, expert) pair, sorted by expert,
and must be summed back into token order: the down projection's output (weighted by the routing weight)
and the gradient of the tokens (``d preact @ W_gate_up``). Adding each row into its token with fp32
atomics from the GEMM's epilogue costs an fp32 buffer, a cast pass, and atomic traffic of 4 bytes per
element per routed row; measured on an H100 at Qwen3-30B-A3B sizes it held the down forward at 294 TFLOP/s
and the gradient of the tokens at 356 (benchmarks/KERNELS_NOTES.md). So the GEMM stores its rows as they
are (half precision, the plain "store" epilogue of :mod:`prmc.kernels.grouped_gemm`) and this kernel
gathers them back: one program per (token, column block) reads the token's rows and sums them in fp32.

Each token's rows are read through the inverse of ``order`` (sort_by_expert's permutation, slot
``t * top_k + k`` of each sorted row, and its inverse, which sort_by_expert also returns): token t's rows
are ``inverse[t * top_k : (t + 1) * top_k]``, no sort and no host sync. Its routing weights are
``scale[t * top_k : (t + 1) * top_k]`` (slot order, as the router made them). The rows are summed in slot
order, so the result is bitwise deterministic (the atomics' was not). Rows at and past ``offsets[-1]``
belong to no expert and are skipped (their ``y`` is never read); a token all of whose rows are unrouted gets
a zero row.

On Hopper in bf16/fp16 the Gluon row kernel does without this pass: its epilogue adds each row into its token's row by
16-byte reductions in L2 (``gluon_gemm.Combine``; not bitwise deterministic). This pass runs elsewhere, and under
``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import INTERPRET, LAUNCH_OPTIONS


@triton.jit
def combine_rows_kernel(
    y_ptr, inverse_ptr, scale_ptr, offsets_ptr, out_ptr,
    N, E, TOP_K, stride_y, stride_out,
    HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    routed_end = tl.load(offsets_ptr + E - 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(TOP_K):
        slot = token.to(tl.int64) * TOP_K + j
        row = tl.load(inverse_ptr + slot)
        if row < routed_end:
            y = tl.load(y_ptr + row * stride_y + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                y = y * tl.load(scale_ptr + slot).to(tl.float32)
            acc += y
    tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def combine_rows(
    y: torch.Tensor, inverse: torch.Tensor, top_k: int, offsets: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[t] = sum_j scale[t*top_k + j] * y[inverse[t*top_k + j]]`` over the rows before ``offsets[-1]``:
    [M // top_k, N], ``y``'s dtype.

    ``y`` [M, N] (unit column stride, rows sorted by expert), ``inverse`` [M] int64 the sorted row of each slot,
    ``offsets`` [E] int32 group ends, ``scale`` [M] (slot order) or None.
    """
    m, n = y.shape
    num_rows = m // top_k
    out = y.new_empty(num_rows, n)
    if num_rows == 0 or n == 0:
        return out
    if m == 0 or offsets.numel() == 0:
        return out.zero_()
    if y.stride(1) != 1:
        y = y.contiguous()
    # 1024 columns per program, 16-byte loads: measured on an H100 at 2.6 TB/s (Qwen3-30B-A3B and Mixtral
    # sizes); loading several of a token's rows per step, or 256-512 columns, was up to 4x slower.
    block_n = 16 if INTERPRET else min(1024, triton.next_power_of_2(n))
    grid = (num_rows, triton.cdiv(n, block_n))
    combine_rows_kernel[grid](
        y, inverse, scale.contiguous() if scale is not None else y, offsets, out,
        n, offsets.shape[0], top_k, y.stride(0), out.stride(0),
        HAS_SCALE=scale is not None, BLOCK_N=block_n, num_warps=1 if INTERPRET else 4, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


if __name__ == "__main__":
    # Check against index_add + benchmark at Qwen3-30B-A3B sizes (8192 tokens, top-8, hidden 2048).
    from prmc.kernels.check import random_routing, rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, hidden, experts, top_k = (8192, 2048, 128, 8) if device == "cuda" else (37, 48, 5, 2)
    order, inverse, offsets = random_routing(tokens, experts, top_k, device, unrouted=3)
    y = torch.randn(order.shape[0], hidden, device=device, dtype=dtype)
    scale = torch.rand(order.shape[0], device=device, dtype=dtype)
    routed = int(offsets[-1])  # NOTE: host sync, for the check only
    expected = torch.zeros(tokens, hidden, device=device, dtype=torch.float64)
    row_scale = scale[order[:routed]].double()[:, None]
    expected.index_add_(0, order[:routed] // top_k, y[:routed].double() * row_scale)
    print(f"combine: rel err {rel_err(combine_rows(y, inverse, top_k, offsets, scale), expected):.2e}")
    if device == "cuda":
        ms = triton.testing.do_bench(lambda: combine_rows(y, inverse, top_k, offsets, scale), return_mode="median")
        moved = (y.numel() + tokens * hidden) * y.element_size()
        print(f"{ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s")
