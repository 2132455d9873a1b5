"""The CUDA implementations of the prmc expert ops, composed from the Triton kernels of this package.

``import prmc.kernels.triton_moe`` registers them (``prmc.ops`` does it when Triton is importable); CPU
keeps the reference. The functions are plain launchers too: the interpreter tests call them on CPU
tensors with ``TRITON_INTERPRET=1``.

=========================  ==================================================================================
op                         kernels (CUTLASS: ``torch._grouped_mm`` where cutlass.takes, else the Triton kernel)
=========================  ==================================================================================
expert_gate_up             grouped_gemm "gate_up": gather x rows, GEMM with W.T, preact + act(gate) * up
expert_down                h @ W.T per routed row (CUTLASS | grouped_gemm "store"); combine_rows (* routing
                           weight, summed per token through the inverse of ``order``)
expert_gate_up_backward    activation_backward -> d preact; d preact @ W per routed row (CUTLASS | "store"),
                           combine_rows -> grad_x; d preact.T @ x[rows] (gather_rows + CUTLASS | weight_grad)
expert_down_backward       CUTLASS: gather_rows(grad_out) -> g_out; g = g_out @ W; down_grad_rows (grad_h,
                           grad_scale, scale * h); grad_W = g_out.T @ (scale * h).
                           Triton: grouped_gemm "down_grad" (gather, grad_h and grad_scale in the epilogue);
                           weight_grad (gather and scale on load)
=========================  ==================================================================================

Inputs outside what the kernels take (fp64, mixed dtypes, indices not int64/int32) fall back to the
reference, so the op's semantics never depend on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prmc.kernels import cutlass, reference
from prmc.kernels._triton_common import KERNEL_DTYPES
from prmc.kernels.activation_backward import activation_backward
from prmc.kernels.combine import combine_rows
from prmc.kernels.down_grad_rows import down_grad_rows
from prmc.kernels.gather_rows import gather_rows
from prmc.kernels.grouped_gemm import grouped_gemm
from prmc.kernels.weight_grad import weight_grad


def _kernels_take(*tensors: Tensor | None) -> bool:
    """One float dtype the kernels handle, shared by every float operand."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes.pop() in KERNEL_DTYPES


def _per_row_product(a: Tensor, offsets: Tensor, b: Tensor) -> Tensor:
    """``a[r] @ b[e(r)]`` for every routed row r: [M, N]; rows past ``offsets[-1]`` are not to be read."""
    if cutlass.takes(a, b):
        return cutlass.row_grouped_mm(a, b, offsets)
    c = a.new_empty(a.shape[0], b.shape[2])
    grouped_gemm("store", a, offsets, b, c, n=b.shape[2])
    return c


def expert_gate_up(
    x: Tensor, order: Tensor, top_k: int, offsets: Tensor, weight: Tensor, activation: str, gated: bool
) -> tuple[Tensor, Tensor]:
    if not _kernels_take(x, weight):
        return reference.expert_gate_up(x, order, top_k, offsets, weight, activation, gated)
    m, f = order.shape[0], weight.shape[1]
    inter = f // 2 if gated else f
    h = x.new_empty(m, inter)
    preact = x.new_empty(m, f)
    grouped_gemm(
        "gate_up", x, offsets.int(), weight.transpose(1, 2), preact,
        n=inter, a_rows=order // top_k, h=h, activation=activation, gated=gated,
    )  # fmt: skip
    return h, preact


def expert_gate_up_backward(
    grad_h: Tensor,
    x: Tensor,
    order: Tensor,
    top_k: int,
    offsets: Tensor,
    weight: Tensor,
    preact: Tensor,
    activation: str,
    gated: bool,
) -> tuple[Tensor, Tensor]:
    if not _kernels_take(grad_h, x, weight, preact):
        return reference.expert_gate_up_backward(grad_h, x, order, top_k, offsets, weight, preact, activation, gated)
    offsets, rows = offsets.int(), order // top_k
    dpre = activation_backward(grad_h, preact, activation, gated)
    grad_x = combine_rows(_per_row_product(dpre, offsets, weight), order, top_k, offsets)
    if cutlass.takes(dpre, x):
        grad_w = cutlass.k_grouped_mm(dpre, gather_rows(x, rows), offsets)
    else:
        grad_w = weight.new_empty(weight.shape)
        weight_grad(dpre, x, offsets, grad_w, right_rows=rows)
    return grad_x, grad_w


def expert_down(h: Tensor, offsets: Tensor, weight: Tensor, order: Tensor, top_k: int, scale: Tensor | None) -> Tensor:
    if not _kernels_take(h, weight):
        return reference.expert_down(h, offsets, weight, order, top_k, scale)
    offsets = offsets.int()
    return combine_rows(_per_row_product(h, offsets, weight.transpose(1, 2)), order, top_k, offsets, scale)


def expert_down_backward(
    grad_out: Tensor, h: Tensor, offsets: Tensor, weight: Tensor, order: Tensor, top_k: int, scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernels_take(grad_out, h, weight):
        return reference.expert_down_backward(grad_out, h, offsets, weight, order, top_k, scale)
    offsets, rows = offsets.int(), order // top_k
    scale = scale.contiguous() if scale is not None else None
    if cutlass.takes(grad_out, h, weight):
        h = h.contiguous()
        grad_out_rows = gather_rows(grad_out, rows)
        g = cutlass.row_grouped_mm(grad_out_rows, weight, offsets)
        grad_h, grad_scale, scaled_h = down_grad_rows(g, h, offsets, scale)
        grad_w = cutlass.k_grouped_mm(grad_out_rows, scaled_h if scale is not None else h, offsets)
        return grad_h, grad_w, grad_scale if scale is not None else h.new_zeros(0)
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    grad_scale = torch.zeros(h.shape[0] if scale is not None else 0, device=h.device, dtype=torch.float32)
    grouped_gemm(
        "down_grad", grad_out, offsets, weight, grad_h, n=h.shape[1], a_rows=rows, h=h, scale=scale,
        rowdot=grad_scale if scale is not None else None,
    )  # fmt: skip
    grad_w = weight.new_empty(weight.shape)
    weight_grad(grad_out, h, offsets, grad_w, left_rows=rows, scale=scale)
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
