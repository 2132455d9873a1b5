"""CUTLASS's grouped GEMM (``torch._grouped_mm``) for the layer's weight gradients where the Gluon kernel does not fit.

The weight gradients reduce over each expert's rows (a K-grouped product). On Hopper in bf16 PyTorch's sm90
CUTLASS kernel runs them at 432-655 TFLOP/s where our Triton weight_grad kernel, reading through TMA, runs at
405-573 (H200, benchmarks/KERNELS_NOTES.md, v8), both on a gathered copy of the token rows
(:mod:`prmc.kernels.gather_rows`). Since v12 the Gluon K-grouped kernel (:mod:`prmc.kernels.gluon_weight_grad`)
runs them 2-8% faster than CUTLASS on the fine-grained layers where it fits (gradient rows whole 128-row tiles);
CUTLASS takes the rest in bf16.

The row-grouped products (down forward, down grad_h, gate_up grad_x) ran on ``row_grouped_mm`` from v4 to v6;
since v7 the Triton grouped GEMM reading through TMA runs them within 2% of it or faster (up to 14%; H200,
bf16, four model sizes, benchmarks/results/moe_layer_breakdown.log), so the layer runs Triton there (one kernel
whose epilogues can grow), and ``row_grouped_mm`` is the alternative ``benchmarks/moe_layer.py --breakdown``
times beside it.

Outside the CUTLASS case (fp16, fp32, other GPUs, the interpreter, layouts CUTLASS rejects) the Triton
kernels run. In layers of a few large experts gate_up's weight gradient goes to cuBLAS, one mm per expert
(:mod:`prmc.kernels.cublas`).
"""

from __future__ import annotations

import torch

from prmc.kernels._triton_common import INTERPRET, capability


def _cutlass_layout(t: torch.Tensor) -> bool:
    """16-byte aligned base and leading dimension, unit stride on one of the last two dimensions."""
    inner, outer = t.stride()[-1], t.stride()[-2]
    aligned = t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-2])
    return aligned and ((inner == 1 and outer % 8 == 0) or (outer == 1 and inner % 8 == 0))


def takes(*tensors: torch.Tensor) -> bool:
    """Whether these operands get CUTLASS: non-empty, CUDA sm90, all bf16, layouts its sm90 path accepts."""
    first = tensors[0]
    return (
        not INTERPRET
        and first.is_cuda
        and all(t.numel() for t in tensors)
        and hasattr(torch, "_grouped_mm")
        and all(t.dtype == torch.bfloat16 for t in tensors)
        and capability(first.device) == (9, 0)
        and all(_cutlass_layout(t) for t in tensors)
    )


def row_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a[r] @ b[e(r)]``: a [M, K] row-major, b [E, K, N] -> [M, N]. Rows at and past ``offsets[-1]``
    are left unwritten (callers skip or zero them)."""
    return torch._grouped_mm(a.contiguous(), b, offs=offsets)


def k_grouped_mm(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = left[g_e].T @ right[g_e]`` over each group's rows g_e: left [M, P], right [M, Q] -> [E, P, Q]."""
    # [P, M] column-major times [M, Q] row-major, groups along M: the layouts CUTLASS's sm90 path takes.
    return torch._grouped_mm(left.contiguous().t(), right.contiguous(), offs=offsets, out_dtype=left.dtype)
