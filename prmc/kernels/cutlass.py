"""CUTLASS's grouped GEMM (``torch._grouped_mm``) for the layer's plain products, where it measured faster.

On an H100 in bf16 (benchmarks/KERNELS_NOTES.md, v4; torch 2.11, 8192 tokens) PyTorch's sm90 CUTLASS
grouped GEMM beats our Triton grouped GEMM on every product without a fused gather or activation:
down forward 0.43 vs 0.50 ms (Qwen3-30B-A3B) / 2.79 vs 2.92 (Mixtral), gate_up grad_x 0.81 vs 0.99 /
5.50 vs 6.99, down grad_h (after a gather) 0.52 vs 0.67 / 2.80 vs 4.20, weight gradients 480-650 vs
250-410 TFLOP/s. The gate_up forward stays Triton: its gather of token rows and gated activation are
fused there (0.91 ms), which CUTLASS would need as two extra passes.

Outside that case (fp16, fp32, other GPUs, the interpreter, layouts CUTLASS rejects) the Triton kernels run.
"""

from __future__ import annotations

import torch

from prmc.kernels._triton_common import INTERPRET


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
        and torch.cuda.get_device_capability(first.device) == (9, 0)
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
