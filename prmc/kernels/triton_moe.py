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
experts               x[rows] -> "gate_up": GEMM with W_gate_up.T, preact + h = act(gate) * up; "store": h @ W_down.T
                      per routed row; combine_rows (* routing weight, summed per token through ``inverse``); on the
                      Gluon kernel, unless deterministic algorithms are asked for, the combine is its epilogue's
                      reductions into the tokens' rows (_combined_in_epilogue). Keeps only preact.
experts_backward_down g = grad_out[rows] @ W_down per routed row ("store"); mlp_grad_rows: d preact, grad_scale,
                      scale * h (h recomputed from preact); grad_W_down = grad_out[rows].T @ (scale * h) (weight
                      grad)
experts_backward_     grad_x = combine_rows("store": d preact @ W_gate_up); grad_W_gate_up = d preact.T @ x[rows]
gate_up               (weight grad); the combine as in experts. With a few large experts (cublas.takes: Mixtral-class,
                      Hopper, bf16) grad_W_gate_up is one cuBLAS mm per expert where the Gluon kernel does not fit
====================  =======================================================================================
routed rows           x[rows], grad_out[rows] (``_Routed``): gathered by the GEMM's own loads where it can (the
                      Gluon kernels' cp.async on Hopper: the gate_up forward up to MAX_GATHERED_COLUMNS, grad_h,
                      both weight gradients up to MAX_WEIGHT_GRAD_GATHERED_COLUMNS; the Triton kernels' pointer
                      loads where the GPU has no TMA), else one gather_rows copy read through TMA, shared by the
                      GEMMs of an op that need it (grad_W_down over transposed tiles; wider layers:
                      DeepSeek-V2-Lite's grad_W_gate_up, Mixtral's)
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


# Past this many output columns per gathered row, a GEMM gathering its rows by cp.async (the Gluon kernels) costs
# more than one gather_rows copy that it reads through TMA: each k-step's rows are copied again for every 256 of
# them, and the kernel runs 2-11% slower than on the copy, while the copy costs the same whatever the width. Measured
# (H200, bf16, 8192 tokens; benchmarks/KERNELS_NOTES.md, v14-v15): the gated forward at 2 * I = 1536-2816 columns
# 0.05-0.07 ms faster than gather + TMA, at Mixtral's 28672 0.10 ms slower. The weight gradients' break-even comes
# sooner (8-11% slower gathered): the down one (columns: I) at 768-1024 0.04-0.05 ms faster, at 14336 0.34 ms
# slower; the gate_up one (columns: F = 2 * I) at 1536-2048 0.01-0.03 ms faster, at 2816 0.05 ms slower. The down
# grad_h product gathered faster than TMA read the copy at every size measured, Mixtral's I = 14336 included, so it
# always gathers.
MAX_GATHERED_COLUMNS = 8192
MAX_WEIGHT_GRAD_GATHERED_COLUMNS = 2048


class _Routed:
    """``src[rows]`` for the GEMMs that read it. Each gathers the rows on its own loads where it can: cp.async in the
    Gluon kernels (Hopper, bf16/fp16, up to ``MAX_*GATHERED_COLUMNS``); the Triton kernels' pointer loads where the
    GPU has no TMA. Elsewhere on Hopper they read one copy through TMA (TMA has no row gather; gathering first, then
    TMA, beat gathering on pointer loads: benchmarks/KERNELS_NOTES.md, v7-v8), made on first use and shared."""

    def __init__(self, src: Tensor, rows: Tensor):
        self.src, self.rows, self._copy = src, rows, None

    def operand(self) -> tuple[Tensor, Tensor | None]:
        """(operand, index) for a GEMM that does not gather by cp.async: the copy and no index where TMA reads it,
        else ``src`` and ``rows``, gathered on load."""
        if not tma_reads(self.src):
            return self.src, self.rows
        if self._copy is None:
            self._copy = gather_rows(self.src, self.rows)
        return self._copy, None


def gathered_row_weight(
    src: Tensor, rows: Tensor, b: Tensor, c: Tensor, h: Tensor | None = None
) -> tuple[Tensor, bool] | None:
    """The Gluon kernel's weight operand (``gluon_gemm.weight_operand``) where the layer runs ``c = src[rows] @ b[e]``
    on it gathering the rows by cp.async (``h``: the gated epilogue); None where it reads a copy instead."""
    if h is not None and c.shape[1] > MAX_GATHERED_COLUMNS:
        return None
    return gluon_gemm.weight_operand(src, b, c, h, rows)


def _sources(left: Tensor | _Routed, right: Tensor | _Routed) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(left, right, left_rows, right_rows): a routed operand as its source and rows, the other as it is."""
    left, left_rows = (left.src, left.rows) if isinstance(left, _Routed) else (left, None)
    right, right_rows = (right.src, right.rows) if isinstance(right, _Routed) else (right, None)
    return left, right, left_rows, right_rows


def weight_grad_gathers(
    left: Tensor, right: Tensor, shape: torch.Size, left_rows: Tensor | None = None, right_rows: Tensor | None = None
) -> bool:
    """Whether the layer runs the weight gradient ``left[left_rows][g_e].T @ right[right_rows][g_e]`` (one operand
    routed) on the Gluon kernel gathering the routed rows by cp.async (else on a copy): up to
    ``MAX_WEIGHT_GRAD_GATHERED_COLUMNS`` of the other operand's, where ``gluon_weight_grad.takes`` says (the down
    gradient's grad_out[rows] over untransposed tiles, the gate_up one's x[rows] over transposed ones)."""
    other = right if left_rows is not None else left
    return (
        (left_rows is None) != (right_rows is None)
        and other.shape[1] <= MAX_WEIGHT_GRAD_GATHERED_COLUMNS
        and gluon_weight_grad.takes(left, right, shape, left_rows, right_rows)
    )


def _row_product(
    a: Tensor | _Routed, offsets: Tensor, b: Tensor, c: Tensor, h: Tensor | None = None, activation: str = "silu",
    gated: bool = False,
) -> None:
    """``c[r] = a[r] @ b[e(r)]`` in place (rows past ``offsets[-1]`` zero; ``a`` routed: its rows gathered); ``h``
    given, the gate_up epilogue: c is preact and ``h = act(gate) * up`` (``act(preact)`` ungated). On Hopper in
    bf16/fp16 the Gluon kernel (192 x 256 tiles over three warpgroups, pipelined across tiles) where it takes the
    layouts (its 128 x 256 predecessor was faster than the Triton kernel: the store products by 4-9% on the
    fine-grained layers and level on Mixtral's, v10; the gated forward by 1-2%, 2-7% on Mixtral's, v11; the 192-row
    tile faster again by 7-8% on Qwen3's products, level on OLMoE's, v20; benchmarks/KERNELS_NOTES.md; it has no
    ungated activation); elsewhere the Triton kernel, through TMA where the GPU has it (within 2% of CUTLASS or
    faster, v7), else on pointer loads."""
    gluon_epilogue = h is None or gated  # (the Gluon kernel has no ungated activation)
    a_rows = None
    if isinstance(a, _Routed):
        weight = gathered_row_weight(a.src, a.rows, b, c, h) if gluon_epilogue else None
        if weight is not None:
            gluon_gemm.grouped_gemm(a.src, offsets, weight, c, h, activation, a.rows)
            return
        a, a_rows = a.operand()
    weight = gluon_gemm.weight_operand(a, b, c, h) if a_rows is None and gluon_epilogue else None
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


def _combined_in_epilogue(
    a: Tensor, offsets: Tensor, b: Tensor, rows: Tensor, order: Tensor, top_k: int, scale: Tensor | None = None
) -> Tensor | None:
    """``combine_rows(_per_row_product(a, offsets, b), ...)`` by the Gluon kernel alone: each routed row's product,
    times its routing weight ``scale`` (slot order), added into its token ``rows[r]`` (= ``order[r] // top_k``) of the
    [M // top_k, N] output by 16-byte reductions in L2, in the output's dtype and in no fixed order; the [M, N] rows
    are neither stored nor read back. None where it does not run: off the Gluon kernel, or under
    ``torch.use_deterministic_algorithms``, where the caller stores the rows and ``combine_rows`` sums them in fp32
    in slot order (bitwise deterministic). (The caller keeps that path, so that it can free ``a`` first.)"""
    # (the combining epilogue has no column mask: whole 256-wide column tiles only)
    if torch.are_deterministic_algorithms_enabled() or b.shape[2] % gluon_gemm.BLOCK_N[False] != 0:
        return None
    out = a.new_empty(order.shape[0] // top_k, b.shape[2])
    weight = gluon_gemm.weight_operand(a, b, out)
    if weight is None:
        return None
    row_scale = scale[order] if scale is not None else None
    gluon_gemm.grouped_gemm(a, offsets, weight, out.zero_(), combine=gluon_gemm.Combine(rows, row_scale))
    return out


def _weight_grad(
    left: Tensor | _Routed, right: Tensor | _Routed, offsets: Tensor, shape: torch.Size, bounds: list[int] | None = None
) -> Tensor:
    """``out[e] = left[g_e].T @ right[g_e]`` (a routed operand: its rows gathered), [E, P, Q] = ``shape``. On Hopper in
    bf16/fp16 the Gluon kernel where it takes the operands, gathering a routed one by cp.async where
    ``weight_grad_gathers`` says: at the fine-grained layers' sizes 2-14% faster than CUTLASS, on
    Mixtral's gate_up 7-9%, level on its down (v12); then CUTLASS, which ran 6-20% faster than the Triton kernel
    through TMA (H200, bf16, benchmarks/KERNELS_NOTES.md, v8). ``bounds`` (the group bounds on the host): one cuBLAS
    mm per expert instead, on gathered operands (prmc.kernels.cublas)."""
    left_src, right_src, left_rows, right_rows = _sources(left, right)
    if bounds is None and weight_grad_gathers(left_src, right_src, shape, left_rows, right_rows):
        return gluon_weight_grad.k_grouped_mm(left_src, right_src, offsets, left_rows, right_rows)
    left, left_rows = left.operand() if isinstance(left, _Routed) else (left, None)
    right, right_rows = right.operand() if isinstance(right, _Routed) else (right, None)
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
    rows = order // top_k
    x_rows = _Routed(x, rows)  # (a copy of x[rows], where one is made, lives until the GEMM is done)
    _row_product(x_rows, offsets, w_gate_up.transpose(1, 2), preact, h, activation, gated)
    del x_rows
    out = _combined_in_epilogue(h, offsets, w_down.transpose(1, 2), rows, order, top_k, scale)
    if out is None:
        y = _per_row_product(h, offsets, w_down.transpose(1, 2))
        del h  # freed before the combine allocates: the backward recomputes h from preact (mlp_grad_rows)
        out = combine_rows(y, inverse, top_k, offsets, scale)
    return out, preact


def experts_backward_down(
    grad_out: Tensor,
    grad_preact: Tensor | None,
    order: Tensor,
    top_k: int,
    offsets: Tensor,
    w_down: Tensor,
    preact: Tensor,
    scale: Tensor | None,
    activation: str,
    gated: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernels_take(grad_out, grad_preact, w_down, preact):
        return reference.experts_backward_down(
            grad_out, grad_preact, order, top_k, offsets, w_down, preact, scale, activation, gated
        )  # fmt: skip
    offsets, rows = offsets.int(), order // top_k
    scale = scale.contiguous() if scale is not None else None
    preact = preact.contiguous()
    # g = grad_out[rows] @ W_down[e], the gradient at h before the routing weight. Where a copy of grad_out[rows] is
    # made, it serves this product and the weight gradient.
    grad_out_rows = _Routed(grad_out, rows)
    g = grad_out.new_empty(rows.shape[0], w_down.shape[2])
    _row_product(grad_out_rows, offsets, w_down, g)
    dpre, grad_scale, hs = mlp_grad_rows(g, preact, offsets, scale, order, activation, gated)
    del g
    if grad_preact is not None:  # preact used beyond h: never by the lowering
        dpre += grad_preact
    grad_w_down = _weight_grad(grad_out_rows, hs, offsets, w_down.shape)
    return dpre, grad_w_down, grad_scale if scale is not None else preact.new_empty(0)


def experts_backward_gate_up(
    dpre: Tensor, x: Tensor, order: Tensor, inverse: Tensor, top_k: int, offsets: Tensor, w_gate_up: Tensor
) -> tuple[Tensor, Tensor]:
    if not _kernels_take(dpre, x, w_gate_up):
        return reference.experts_backward_gate_up(dpre, x, order, inverse, top_k, offsets, w_gate_up)
    offsets, rows = offsets.int(), order // top_k
    dpre = dpre.contiguous()
    # Few large experts (cublas.takes: Mixtral-class, Hopper, bf16): grad_W_gate_up on cuBLAS per expert where the
    # Gluon kernel does not fit (on Mixtral: Gluon 5.93-5.98 ms, cuBLAS per expert 6.09, CUTLASS 6.36-6.58; v12).
    # NOTE: host sync there: the group bounds go to the host now, behind the work queued so far, and are waited for
    # once grad_x's products are queued, so that the GPU has those to run while the host waits.
    per_expert = cublas.takes(offsets, rows.shape[0], dpre, x, w_gate_up) and not gluon_weight_grad.fits(
        w_gate_up.shape, dpre.dtype, dpre.device
    )
    bounds_later = cublas.group_bounds_later(offsets) if per_expert else None
    grad_x = _combined_in_epilogue(dpre, offsets, w_gate_up, rows, order, top_k)
    if grad_x is None:
        grad_x = combine_rows(_per_row_product(dpre, offsets, w_gate_up), inverse, top_k, offsets)
    # x[rows] is gathered again rather than kept from the forward (that would hold T*k*H more memory).
    bounds = bounds_later() if bounds_later is not None else None
    grad_w_gate_up = _weight_grad(dpre, _Routed(x, rows), offsets, w_gate_up.shape, bounds=bounds)
    return grad_x, grad_w_gate_up


def register() -> None:
    """Make these the CUDA implementations of ``torch.ops.prmc.*`` (CPU keeps the reference)."""
    for name, fn in [
        ("sort_by_expert", sort_by_expert), ("experts", experts), ("experts_backward_down", experts_backward_down),
        ("experts_backward_gate_up", experts_backward_gate_up),
    ]:  # fmt: skip
        torch.library.register_kernel(f"prmc::{name}", "cuda", fn)


register()
