"""Activation backward: ``d preact`` from ``grad_h`` and the saved (or recomputed) pre-activation.

The story
---------
``h = act(gate) * up`` (gated) or ``h = act(preact)``; its gradient with respect to the [M, F]
pre-activation is elementwise:

    d gate = grad_h * up * act'(gate),     d up = grad_h * act(gate)        (gated)
    d preact = grad_h * act'(preact)                                        (not gated)

One pass: read grad_h [M, I] and preact [M, F], write d preact [M, F] in the input dtype; both weight
and input gradients of the gate_up GEMM then read it. Only ``preact`` is needed, never the GEMM's input,
so a recompute pass may drop ``preact`` and recompute it with the forward kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prmc.kernels._triton_common import INTERPRET, activation, activation_grad


@triton.jit
def activation_backward_kernel(
    grad_h_ptr, preact_ptr, dpre_ptr,
    M, I,
    stride_gm, stride_gi, stride_pm, stride_pf, stride_dm, stride_df,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
):  # fmt: skip
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (offs_m < M)[:, None] & (offs_i < I)[None, :]
    grad_h = tl.load(grad_h_ptr + offs_m[:, None] * stride_gm + offs_i[None, :] * stride_gi, mask=mask, other=0.0)
    gate_ptrs = preact_ptr + offs_m[:, None] * stride_pm + offs_i[None, :] * stride_pf
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    grad_h = grad_h.to(tl.float32)
    dgate_ptrs = dpre_ptr + offs_m[:, None] * stride_dm + offs_i[None, :] * stride_df
    if GATED:
        up = tl.load(gate_ptrs + I * stride_pf, mask=mask, other=0.0).to(tl.float32)
        tl.store(dgate_ptrs, (grad_h * up * activation_grad(gate, ACTIVATION)).to(dpre_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_ptrs + I * stride_df, (grad_h * activation(gate, ACTIVATION)).to(dpre_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(dgate_ptrs, (grad_h * activation_grad(gate, ACTIVATION)).to(dpre_ptr.dtype.element_ty), mask=mask)


def activation_backward(grad_h: torch.Tensor, preact: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """[M, I] grad_h, [M, F] preact -> [M, F] d preact (preact's dtype)."""
    m, i = grad_h.shape
    dpre = torch.empty(preact.shape, device=preact.device, dtype=preact.dtype)
    if m == 0:
        return dpre
    # 32 x 128 elements per program: 16-byte accesses along I, enough programs to fill the chip.
    block_m, block_i = (16, 16) if INTERPRET else (32, 128)
    grid = (triton.cdiv(m, block_m), triton.cdiv(i, block_i))
    activation_backward_kernel[grid](
        grad_h, preact, dpre, m, i, *grad_h.stride(), *preact.stride(), *dpre.stride(),
        ACTIVATION=activation, GATED=gated, BLOCK_M=block_m, BLOCK_I=block_i, num_warps=4,
    )  # fmt: skip
    return dpre


if __name__ == "__main__":
    from prmc.kernels import reference
    from prmc.kernels.check import rel_err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, i = (65536, 768) if device == "cuda" else (37, 40)
    grad_h = torch.randn(m, i, device=device, dtype=dtype)
    preact = torch.randn(m, 2 * i, device=device, dtype=dtype)
    for act in reference.ACTIVATIONS:
        expected = reference.activate_backward(grad_h.double(), preact.double(), act, True)
        print(f"{act}: rel err {rel_err(activation_backward(grad_h, preact, act, True), expected):.2e}")
    if device == "cuda":
        ms = triton.testing.do_bench(lambda: activation_backward(grad_h, preact, "silu", True), return_mode="median")
        print(f"{ms:.3f} ms, {(grad_h.numel() * 2 + preact.numel() * 2 * 2) / ms / 1e9:.0f} GB/s")
