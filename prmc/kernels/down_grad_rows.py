"""Down-projection backward, per row: routing-weight scale and its gradient around a plain grouped GEMM.

The story
---------
With ``y = h @ W_down[e].T`` per routed row and ``out[t] = sum scale[r] * y[r]``, the backward needs, for
the gathered output gradient ``g[r] = grad_out[rows[r]] @ W_down[e]`` (a plain grouped GEMM):

    grad_h[r]     = scale[r] * g[r]
    grad_scale[r] = <g[r], h[r]>                     (= <grad_out[rows[r]], y[r]>, without keeping y)
    grad_W_down   = sum_r g_out[r]^T (scale[r] h[r])  (so the same gathered g_out feeds both GEMMs)

Where CUTLASS's grouped GEMM computes ``g`` (Hopper, bf16: measured faster than our fused Triton epilogue,
benchmarks/KERNELS_NOTES.md, v4), this one pass reads ``g`` and ``h`` once and writes ``grad_h``,
``grad_scale`` and ``scale * h``. Rows at and past ``offsets[-1]`` belong to no expert: their gradients
are zero whatever ``g`` holds there (CUTLASS leaves those rows unwritten).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import INTERPRET


@triton.jit
def down_grad_rows_kernel(
    g_ptr, h_ptr, scale_ptr, offsets_ptr, grad_h_ptr, grad_scale_ptr, scaled_h_ptr,
    M, I, E, stride_g, stride_h, stride_grad_h, stride_scaled_h,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    routed = m_ok & (offs_m < tl.load(offsets_ptr + E - 1))
    offs_m64 = offs_m.to(tl.int64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_m, mask=routed, other=0.0).to(tl.float32)
    rowdot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for first in range(0, I, BLOCK_I):
        offs_i = first + tl.arange(0, BLOCK_I)
        i_ok = offs_i < I
        store_mask = m_ok[:, None] & i_ok[None, :]
        load_mask = routed[:, None] & i_ok[None, :]
        g = tl.load(g_ptr + offs_m64[:, None] * stride_g + offs_i[None, :], mask=load_mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            h = tl.load(h_ptr + offs_m64[:, None] * stride_h + offs_i[None, :], mask=load_mask, other=0.0).to(tl.float32)
            rowdot += tl.sum(g * h, axis=1)
            scaled_h_ptrs = scaled_h_ptr + offs_m64[:, None] * stride_scaled_h + offs_i[None, :]
            tl.store(scaled_h_ptrs, (h * scale[:, None]).to(scaled_h_ptr.dtype.element_ty), mask=store_mask)
            g = g * scale[:, None]
        grad_h_ptrs = grad_h_ptr + offs_m64[:, None] * stride_grad_h + offs_i[None, :]
        tl.store(grad_h_ptrs, g.to(grad_h_ptr.dtype.element_ty), mask=store_mask)
    if HAS_SCALE:
        tl.store(grad_scale_ptr + offs_m, rowdot.to(grad_scale_ptr.dtype.element_ty), mask=m_ok)


def down_grad_rows(
    g: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``g`` [M, I] (unscaled gradient of the down GEMM's input), ``h`` [M, I], ``offsets`` [E] int32,
    ``scale`` [M] or None -> (grad_h [M, I], grad_scale [M] in scale's dtype, scale * h [M, I]); without a
    scale: (g with unrouted rows zeroed, None, None). Unit column strides."""
    m, i = g.shape
    grad_h = torch.empty(m, i, device=g.device, dtype=h.dtype)
    grad_scale = scaled_h = None
    if scale is not None:
        grad_scale = torch.empty(m, device=g.device, dtype=scale.dtype)
        scaled_h = torch.empty(m, i, device=g.device, dtype=h.dtype)
    if m == 0:
        return grad_h, grad_scale, scaled_h
    block_m, block_i = (4, 16) if INTERPRET else (8, 256)
    down_grad_rows_kernel[(triton.cdiv(m, block_m),)](
        g, h, scale if scale is not None else g, offsets, grad_h,
        grad_scale if scale is not None else g, scaled_h if scale is not None else grad_h,
        m, i, offsets.shape[0], g.stride(0), h.stride(0), grad_h.stride(0),
        scaled_h.stride(0) if scale is not None else 0,
        HAS_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_I=block_i, num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return grad_h, grad_scale, scaled_h


if __name__ == "__main__":
    # Check against plain torch + benchmark at Qwen3-30B-A3B sizes (65536 routed rows, I = 768).
    from prmc.kernels.check import rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, i, routed = (65536, 768, 65000) if device == "cuda" else (37, 40, 33)
    g, h = (torch.randn(m, i, device=device, dtype=dtype) for _ in range(2))
    scale = torch.rand(m, device=device, dtype=dtype)
    offsets = torch.tensor([routed // 2, routed], device=device, dtype=torch.int32)
    grad_h, grad_scale, scaled_h = down_grad_rows(g, h, offsets, scale)
    live = (torch.arange(m, device=device) < routed).double()[:, None]
    s = scale.double()[:, None] * live
    print(
        f"grad_h {rel_err(grad_h, g.double() * s):.2e}, grad_scale {rel_err(grad_scale, (g.double() * h.double() * live).sum(1)):.2e},"
        f" scale*h {rel_err(scaled_h, h.double() * s):.2e}"
    )
    if device == "cuda":
        ms = triton.testing.do_bench(lambda: down_grad_rows(g, h, offsets, scale), return_mode="median")
        print(f"{ms:.3f} ms, {4 * g.numel() * g.element_size() / ms / 1e6:.0f} GB/s")
