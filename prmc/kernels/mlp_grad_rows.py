"""The per-row part of an expert MLP's backward, between its two weight GEMMs, in one pass.

The story
---------
Forward, per routed row r of expert e: ``preact = x[t] @ W_gate_up[e].T``, ``h = act(gate) * up`` (or
``act(preact)``), ``y = h @ W_down[e].T``, and ``out[t] = sum_r scale[r] * y[r]``. Backward starts from the
unscaled gradient arriving at ``h``, ``g[r] = grad_out[t] @ W_down[e]`` (a plain grouped GEMM), and needs:

    grad_scale[r] = <g[r], h[r]>                 (= <grad_out[t], y[r]>: y is never kept)
    grad_h[r]     = scale[r] * g[r]
    d gate        = grad_h * up * act'(gate),    d up = grad_h * act(gate)      (gated)
    d preact      = grad_h * act'(preact)                                     (not gated)
    scale[r] h[r]                                (the down weight gradient's right operand)

This kernel reads ``g`` and ``preact`` once and writes ``d preact``, ``grad_scale`` and ``scale * h``:
``h`` is recomputed from ``preact`` rather than saved (the forward keeps only ``preact``), and ``grad_h``
never reaches memory. Measured on an H100 at Mixtral sizes, the two passes it replaces (routing-weight pass,
then activation backward) took 0.68 + 0.83 ms (benchmarks/KERNELS_NOTES.md). Both GEMMs of the gate_up
backward then read ``d preact``. Rows at and past ``offsets[-1]`` belong to no expert: their outputs are
zero whatever ``g`` and ``preact`` hold there (CUTLASS leaves those rows of ``g`` unwritten). The routing
weights and their gradient are in slot order: row r reads ``scale[order[r]]`` and writes
``grad_scale[order[r]]`` (a permutation: every slot written once, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import INTERPRET, LAUNCH_OPTIONS, activation, activation_grad


@triton.jit
def mlp_grad_rows_kernel(
    g_ptr, preact_ptr, scale_ptr, order_ptr, offsets_ptr, dpre_ptr, grad_scale_ptr, hs_ptr,
    M, I, E, stride_g, stride_pre, stride_dpre, stride_hs,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    routed = m_ok & (offs_m < tl.load(offsets_ptr + E - 1))
    offs_m64 = offs_m.to(tl.int64)
    if HAS_SCALE:
        slots = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
        scale = tl.load(scale_ptr + slots, mask=routed, other=0.0).to(tl.float32)
    rowdot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for first in range(0, I, BLOCK_I):
        offs_i = first + tl.arange(0, BLOCK_I)
        i_ok = offs_i < I
        store_mask = m_ok[:, None] & i_ok[None, :]
        load_mask = routed[:, None] & i_ok[None, :]
        g = tl.load(g_ptr + offs_m64[:, None] * stride_g + offs_i[None, :], mask=load_mask, other=0.0).to(tl.float32)
        gate_ptrs = preact_ptr + offs_m64[:, None] * stride_pre + offs_i[None, :]
        gate = tl.load(gate_ptrs, mask=load_mask, other=0.0).to(tl.float32)
        act = activation(gate, ACTIVATION)
        if GATED:
            up = tl.load(gate_ptrs + I, mask=load_mask, other=0.0).to(tl.float32)
            h = act * up
        else:
            h = act
        if HAS_SCALE:
            rowdot += tl.sum(g * h, axis=1)
            g = g * scale[:, None]
            h = h * scale[:, None]
        dgate_ptrs = dpre_ptr + offs_m64[:, None] * stride_dpre + offs_i[None, :]
        if GATED:
            tl.store(dgate_ptrs, (g * up * activation_grad(gate, ACTIVATION)).to(dpre_ptr.dtype.element_ty), mask=store_mask)
            tl.store(dgate_ptrs + I, (g * act).to(dpre_ptr.dtype.element_ty), mask=store_mask)
        else:
            tl.store(dgate_ptrs, (g * activation_grad(gate, ACTIVATION)).to(dpre_ptr.dtype.element_ty), mask=store_mask)
        hs_ptrs = hs_ptr + offs_m64[:, None] * stride_hs + offs_i[None, :]
        tl.store(hs_ptrs, h.to(hs_ptr.dtype.element_ty), mask=store_mask)
    if HAS_SCALE:
        tl.store(grad_scale_ptr + slots, rowdot.to(grad_scale_ptr.dtype.element_ty), mask=m_ok)


def mlp_grad_rows(
    g: torch.Tensor,
    preact: torch.Tensor,
    offsets: torch.Tensor,
    scale: torch.Tensor | None,
    order: torch.Tensor,
    activation: str,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``g`` [M, I] (unscaled gradient at h), ``preact`` [M, F], ``offsets`` [E] int32, ``scale`` [M] in slot
    order or None, ``order`` [M] int64 the slot of each row -> (d preact [M, F], grad_scale [M] in slot order
    and scale's dtype or None, scale * h [M, I] (h without a scale)), in preact's dtype. Unit column strides."""
    m, i = g.shape
    dpre = torch.empty(m, preact.shape[1], device=g.device, dtype=preact.dtype)
    hs = torch.empty(m, i, device=g.device, dtype=preact.dtype)
    grad_scale = torch.empty(m, device=g.device, dtype=scale.dtype) if scale is not None else None
    if m == 0:
        return dpre, grad_scale, hs
    # 8 rows x 256 columns per step, 16-byte accesses: the layout measured at 2.8 TB/s for the pass this
    # replaced (benchmarks/KERNELS_NOTES.md, v4); a program owns whole rows for the row dot.
    block_m, block_i = (4, 16) if INTERPRET else (8, 256)
    mlp_grad_rows_kernel[(triton.cdiv(m, block_m),)](
        g, preact, scale if scale is not None else g, order, offsets, dpre, grad_scale if scale is not None else g, hs,
        m, i, offsets.shape[0], g.stride(0), preact.stride(0), dpre.stride(0), hs.stride(0),
        ACTIVATION=activation, GATED=gated, HAS_SCALE=scale is not None,
        BLOCK_M=block_m, BLOCK_I=block_i, num_warps=1 if INTERPRET else 4, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return dpre, grad_scale, hs


if __name__ == "__main__":
    # Check against the reference's activation backward + benchmark at Qwen3-30B-A3B sizes (I = 768).
    from prmc.kernels import reference
    from prmc.kernels.check import rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, i, routed = (65536, 768, 65000) if device == "cuda" else (37, 40, 33)
    g, preact = torch.randn(m, i, device=device, dtype=dtype), torch.randn(m, 2 * i, device=device, dtype=dtype)
    scale, order = torch.rand(m, device=device, dtype=dtype), torch.randperm(m, device=device)
    offsets = torch.tensor([routed // 2, routed], device=device, dtype=torch.int32)
    dpre, grad_scale, hs = mlp_grad_rows(g, preact, offsets, scale, order, "silu", True)
    live = (torch.arange(m, device=device) < routed).double()[:, None]
    h = reference.activate(preact.double(), "silu", True) * live
    s = scale[order].double()[:, None]
    expected = reference.activate_backward(g.double() * s * live, preact.double(), "silu", True)
    expected_grad_scale = torch.empty(m, device=device, dtype=torch.float64)
    expected_grad_scale[order] = (g.double() * h).sum(1)
    print(
        f"d preact {rel_err(dpre, expected):.2e}, grad_scale {rel_err(grad_scale, expected_grad_scale):.2e},"
        f" scale*h {rel_err(hs, h * s):.2e}"
    )
    if device == "cuda":
        ms = triton.testing.do_bench(
            lambda: mlp_grad_rows(g, preact, offsets, scale, order, "silu", True), return_mode="median"
        )  # fmt: skip
        print(f"{ms:.3f} ms, {(2 * g.numel() + 2 * preact.numel()) * g.element_size() / ms / 1e6:.0f} GB/s")
