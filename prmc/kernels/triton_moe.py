"""The CUDA implementations of the prmc expert ops, composed from the Triton kernels of this package.

``import prmc.kernels.triton_moe`` registers them (``prmc.ops`` does it when Triton is importable); CPU
keeps the reference. The functions are plain launchers too: the interpreter tests call them on CPU
tensors with ``TRITON_INTERPRET=1``.

=========================  ==================================================================================
op                         kernels
=========================  ==================================================================================
expert_gate_up             grouped_gemm "gate_up": gather x rows, GEMM with W.T, preact + act(gate) * up
expert_down                grouped_gemm "scatter": GEMM with W.T, * routing weight, atomic add to token rows
expert_gate_up_backward    activation_backward -> d preact; grouped_gemm "scatter" (grad_x = d preact @ W,
                           added to token rows); grouped_weight_grad (d preact.T @ x[rows])
expert_down_backward       grouped_gemm "down_grad" (grad_h and grad_scale from grad_out[rows] @ W);
                           grouped_weight_grad ((routing weight * grad_out[rows]).T @ h)
=========================  ==================================================================================

Inputs outside what the kernels take (fp64, mixed dtypes, indices not int64/int32) fall back to the
reference, so the op's semantics never depend on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prmc.kernels import reference
from prmc.kernels._triton_common import KERNEL_DTYPES
from prmc.kernels.activation_backward import activation_backward
from prmc.kernels.grouped_gemm import grouped_gemm
from prmc.kernels.weight_grad import grouped_weight_grad


def _kernels_take(*tensors: Tensor | None) -> bool:
    """One float dtype the kernels handle, shared by every float operand."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes.pop() in KERNEL_DTYPES


def _scatter_target(num_rows: int, cols: int, device: torch.device) -> Tensor:
    """Zeroed fp32 buffer for the atomic scatter-add; the caller casts it (no copy when fp32)."""
    return torch.zeros(num_rows, cols, device=device, dtype=torch.float32)


def expert_gate_up(
    x: Tensor, rows: Tensor, offsets: Tensor, weight: Tensor, activation: str, gated: bool
) -> tuple[Tensor, Tensor]:
    if not _kernels_take(x, weight):
        return reference.expert_gate_up(x, rows, offsets, weight, activation, gated)
    m, f = rows.shape[0], weight.shape[1]
    inter = f // 2 if gated else f
    h = x.new_empty(m, inter)
    preact = x.new_empty(m, f)
    grouped_gemm(
        "gate_up", x, offsets.int(), weight.transpose(1, 2), preact,
        n=inter, a_rows=rows.contiguous(), h=h, activation=activation, gated=gated,
    )  # fmt: skip
    return h, preact


def expert_gate_up_backward(
    grad_h: Tensor,
    x: Tensor,
    rows: Tensor,
    offsets: Tensor,
    weight: Tensor,
    preact: Tensor,
    activation: str,
    gated: bool,
) -> tuple[Tensor, Tensor]:
    if not _kernels_take(grad_h, x, weight, preact):
        return reference.expert_gate_up_backward(grad_h, x, rows, offsets, weight, preact, activation, gated)
    offsets, rows = offsets.int(), rows.contiguous()
    dpre = activation_backward(grad_h, preact, activation, gated)
    grad_x = _scatter_target(x.shape[0], x.shape[1], x.device)
    grouped_gemm("scatter", dpre, offsets, weight, grad_x, n=x.shape[1], c_rows=rows)
    grad_w = grouped_weight_grad(dpre, x, offsets, weight.shape[0], right_rows=rows)
    return grad_x.to(x.dtype), grad_w


def expert_down(h: Tensor, offsets: Tensor, weight: Tensor, rows: Tensor, scale: Tensor | None, num_rows: int) -> Tensor:
    if not _kernels_take(h, weight):
        return reference.expert_down(h, offsets, weight, rows, scale, num_rows)
    out = _scatter_target(num_rows, weight.shape[1], h.device)
    grouped_gemm(
        "scatter", h, offsets.int(), weight.transpose(1, 2), out,
        n=weight.shape[1], c_rows=rows.contiguous(), scale=scale.contiguous() if scale is not None else None,
    )  # fmt: skip
    return out.to(h.dtype)


def expert_down_backward(
    grad_out: Tensor, h: Tensor, offsets: Tensor, weight: Tensor, rows: Tensor, scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernels_take(grad_out, h, weight):
        return reference.expert_down_backward(grad_out, h, offsets, weight, rows, scale)
    offsets, rows = offsets.int(), rows.contiguous()
    scale = scale.contiguous() if scale is not None else None
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    grad_scale = torch.zeros(h.shape[0] if scale is not None else 0, device=h.device, dtype=torch.float32)
    grouped_gemm(
        "down_grad", grad_out, offsets, weight, grad_h, n=h.shape[1], a_rows=rows, h=h, scale=scale,
        rowdot=grad_scale if scale is not None else None,
    )  # fmt: skip
    grad_w = grouped_weight_grad(grad_out, h, offsets, weight.shape[0], left_rows=rows, scale=scale)
    return grad_h, grad_w, grad_scale.to(scale.dtype if scale is not None else h.dtype)


def register() -> None:
    """Make these the CUDA implementations of ``torch.ops.prmc.*`` (CPU keeps the reference)."""
    for name, fn in [
        ("expert_gate_up", expert_gate_up),
        ("expert_gate_up_backward", expert_gate_up_backward),
        ("expert_down", expert_down),
        ("expert_down_backward", expert_down_backward),
    ]:
        torch.library.register_kernel(f"prmc::{name}", "cuda", fn)


register()
