"""The CUDA implementations of the prmc expert ops, composed from the Triton kernels of this package.

``import prmc.kernels.triton_moe`` registers them (``prmc.ops`` does it when Triton is importable); CPU
keeps the reference. The functions are plain launchers too: the interpreter tests call them on CPU
tensors with ``TRITON_INTERPRET=1``.

====================  =======================================================================================
op                    kernels ("store"/"gate_up": grouped_gemm, through TMA where the GPU and layouts allow;
                      "store" and gated "gate_up" run the Gluon gluon_gemm instead where gluon_gemm.weight_operand
                      says (Hopper, bf16/fp16);
                      "weight grad": the Gluon gluon_weight_grad where it takes the operands (Hopper,
                      bf16/fp16), else CUTLASS's ``torch._grouped_mm`` where cutlass.takes (Hopper, bf16), else
                      the Triton weight_grad, through TMA where it can)
====================  =======================================================================================
sort_by_expert        a counting sort in three Triton launches, giving the inverse permutation too (torch path
                      past 512 experts)
experts               x[rows] (gather_rows, where TMA reads it; else gathered on load) -> "gate_up": GEMM with
                      W_gate_up.T, preact + h = act(gate) * up; "store": h @ W_down.T per routed row;
                      combine_rows (* routing weight, summed per token through ``inverse``). Keeps only preact.
experts_backward      g = grad_out[rows] @ W_down per routed row ("store" on gather_rows' copy where TMA reads
                      it, else gathering on load); mlp_grad_rows: d preact, grad_scale, scale * h (h
                      recomputed from preact); grad_W_down = grad_out[rows].T @ (scale * h) (weight grad, on
                      the same copy); grad_x = combine_rows("store": d preact @ W_gate_up);
                      grad_W_gate_up = d preact.T @ x[rows] (weight grad, on gather_rows' copy where TMA reads
                      it, else gathering on load). With a few large experts (cublas.takes: Mixtral-class,
                      Hopper, bf16) grad_W_gate_up is one cuBLAS mm per expert where the Gluon kernel does
                      not fit
====================  =======================================================================================

Inputs outside what the kernels take (fp64, mixed dtypes, indices not int64/int32) fall back to the
reference, so the op's semantics never depend on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prmc.kernels import cublas, cutlass, gluon_gemm, gluon_weight_grad, reference
from prmc.kernels._triton_common import KERNEL_DTYPES, tma_reads
from prmc.kernels.combine import combine_rows
from prmc.kernels.gather_rows import gather_rows
from prmc.kernels.grouped_gemm import grouped_gemm
from prmc.kernels.mlp_grad_rows import mlp_grad_rows
from prmc.kernels.sort_by_expert import sort_by_expert
from prmc.kernels.weight_grad import weight_grad


def _kernels_take(*tensors: Tensor | None) -> bool:
    """One float dtype the kernels handle, shared by every float operand."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes.pop() in KERNEL_DTYPES


def _routed_rows(t: Tensor, rows: Tensor) -> tuple[Tensor, Tensor | None]:
    """(operand, index) for a GEMM that needs ``t[rows]``: on Hopper a gathered copy and no index (TMA has no
    row gather, and gathering first then reading through TMA beat gathering on load: benchmarks/
    KERNELS_NOTES.md, v7-v8); elsewhere ``t`` itself and ``rows``, gathered on load (no copy)."""
    if tma_reads(t):
        return gather_rows(t, rows), None
    return t, rows


def _row_product(
    a: Tensor, offsets: Tensor, b: Tensor, c: Tensor, a_rows: Tensor | None = None, h: Tensor | None = None,
    activation: str = "silu", gated: bool = False,
) -> None:
    """``c[r] = a[a_rows[r]] @ b[e(r)]`` in place (rows past ``offsets[-1]`` zero); ``h`` given, the gate_up
    epilogue: c is preact and ``h = act(gate) * up`` (``act(preact)`` ungated). On Hopper in bf16/fp16 the Gluon
    kernel, pipelined across tiles, where it takes the layouts (faster than the Triton kernel: the store products
    by 4-9% on the fine-grained layers and level on Mixtral's, v10; the gated forward by 1-2%, 2-7% on Mixtral's,
    v11; benchmarks/KERNELS_NOTES.md; it has no ungated activation); elsewhere the Triton kernel, through TMA
    where the GPU has it (within 2% of CUTLASS or faster, v7), else on pointer loads."""
    gluon_takes = a_rows is None and (h is None or gated)
    weight = gluon_gemm.weight_operand(a, b, c, h) if gluon_takes else None
    if weight is not None:
        gluon_gemm.grouped_gemm(a, offsets, weight, c, h, activation)
    elif h is None:
        grouped_gemm("store", a, offsets, b, c, n=b.shape[2], a_rows=a_rows)
    else:
        grouped_gemm("gate_up", a, offsets, b, c, n=h.shape[1], a_rows=a_rows, h=h, activation=activation, gated=gated)


def _per_row_product(a: Tensor, offsets: Tensor, b: Tensor) -> Tensor:
    """``a[r] @ b[e(r)]`` for every routed row r: [M, N] (rows past ``offsets[-1]`` zero; _row_product)."""
    c = a.new_empty(a.shape[0], b.shape[2])
    _row_product(a, offsets, b, c)
    return c


def _weight_grad(
    left: Tensor, right: Tensor, offsets: Tensor, shape: torch.Size, *, left_rows: Tensor | None = None,
    right_rows: Tensor | None = None, bounds: list[int] | None = None,
) -> Tensor:
    """``out[e] = left[left_rows][g_e].T @ right[right_rows][g_e]``, [E, P, Q] = ``shape``. On Hopper in bf16/fp16
    the Gluon kernel where it takes the (gathered) operands: at the fine-grained layers' sizes 2-14% faster than
    CUTLASS, on Mixtral's gate_up 7-9%, level on its down (v12); then CUTLASS, which
    ran 6-20% faster than the Triton kernel through TMA (H200, bf16, benchmarks/KERNELS_NOTES.md, v8). ``bounds``
    (the group bounds on the host): one cuBLAS mm per expert instead, on gathered operands (prmc.kernels.cublas)."""
    if left_rows is None and right_rows is None:
        if bounds is not None:
            return cublas.k_mm(left, right, bounds)
        if gluon_weight_grad.takes(left, right, shape):
            return gluon_weight_grad.k_grouped_mm(left, right, offsets)
        if cutlass.takes(left, right):
            return cutlass.k_grouped_mm(left, right, offsets)
    out = left.new_empty(shape)
    weight_grad(left, right, offsets, out, left_rows=left_rows, right_rows=right_rows)
    return out


def experts(
    x: Tensor,
    order: Tensor,
    inverse: Tensor,
    top_k: int,
    offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    scale: Tensor | None,
    activation: str,
    gated: bool,
) -> tuple[Tensor, Tensor]:
    if not _kernels_take(x, w_gate_up, w_down):
        return reference.experts(x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, activation, gated)
    m, f = order.shape[0], w_gate_up.shape[1]
    inter = f // 2 if gated else f
    offsets = offsets.int()
    h = x.new_empty(m, inter)
    preact = x.new_empty(m, f)
    a, a_rows = _routed_rows(x, order // top_k)  # a copy of x[rows] lives until the GEMM is done
    _row_product(a, offsets, w_gate_up.transpose(1, 2), preact, a_rows, h, activation, gated)
    del a
    y = _per_row_product(h, offsets, w_down.transpose(1, 2))
    del h  # freed before the combine allocates: the backward recomputes h from preact (mlp_grad_rows)
    return combine_rows(y, inverse, top_k, offsets, scale), preact


def experts_backward(
    grad_out: Tensor,
    grad_preact: Tensor | None,
    x: Tensor,
    order: Tensor,
    inverse: Tensor,
    top_k: int,
    offsets: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    preact: Tensor,
    scale: Tensor | None,
    activation: str,
    gated: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not _kernels_take(grad_out, grad_preact, x, w_gate_up, w_down, preact):
        return reference.experts_backward(
            grad_out, grad_preact, x, order, inverse, top_k, offsets, w_gate_up, w_down, preact, scale, activation, gated
        )  # fmt: skip
    offsets, rows = offsets.int(), order // top_k
    scale = scale.contiguous() if scale is not None else None
    preact = preact.contiguous()
    # Few large experts (cublas.takes: Mixtral-class, Hopper, bf16): grad_W_gate_up on cuBLAS per expert where the
    # Gluon kernel does not fit (on Mixtral: Gluon 5.93-5.98 ms, cuBLAS per expert 6.09, CUTLASS 6.36-6.58; v12).
    # NOTE: host sync there (d preact will have preact's dtype and layout): the group bounds go to the host now, and
    # are waited for once the products before it are queued, so that the GPU has those to run while the host waits.
    per_expert = cublas.takes(offsets, rows.shape[0], preact, x, w_gate_up) and not gluon_weight_grad.fits(
        w_gate_up.shape, preact.dtype, preact.device
    )
    bounds_later = cublas.group_bounds_later(offsets) if per_expert else None
    # Down projection: g = grad_out[rows] @ W_down[e], the gradient at h before the routing weight. A gathered
    # copy of grad_out[rows] serves this product and the weight gradient.
    grad_out_rows, grad_out_index = _routed_rows(grad_out, rows)
    g = grad_out.new_empty(rows.shape[0], w_down.shape[2])
    _row_product(grad_out_rows, offsets, w_down, g, a_rows=grad_out_index)
    dpre, grad_scale, hs = mlp_grad_rows(g, preact, offsets, scale, order, activation, gated)
    del g
    if grad_preact is not None:  # preact used beyond h: never by the lowering
        dpre += grad_preact
    grad_w_down = _weight_grad(grad_out_rows, hs, offsets, w_down.shape, left_rows=grad_out_index)
    del grad_out_rows, hs
    # Gate/up projection, from d preact.
    grad_x = combine_rows(_per_row_product(dpre, offsets, w_gate_up), inverse, top_k, offsets)
    # x[rows] is gathered again rather than kept from the forward (that would hold T*k*H more memory).
    x_rows, x_index = _routed_rows(x, rows)
    bounds = bounds_later() if bounds_later is not None else None
    grad_w_gate_up = _weight_grad(dpre, x_rows, offsets, w_gate_up.shape, right_rows=x_index, bounds=bounds)
    return grad_x, grad_w_gate_up, grad_w_down, grad_scale if scale is not None else x.new_empty(0)


def register() -> None:
    """Make these the CUDA implementations of ``torch.ops.prmc.*`` (CPU keeps the reference)."""
    for name, fn in [("sort_by_expert", sort_by_expert), ("experts", experts), ("experts_backward", experts_backward)]:
        torch.library.register_kernel(f"prmc::{name}", "cuda", fn)


register()
