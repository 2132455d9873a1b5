"""cuBLAS, one ``torch.mm`` per expert, for gate_up's weight gradient where a few large experts make it the fastest
of the kernels that fit.

With few experts, each holding thousands of rows (Mixtral 8x7B: 8 experts, ~2048 rows each at 8192 tokens and
top-2), every expert's product is a large dense GEMM. There cuBLAS ran gate_up's weight gradient faster than
CUTLASS's K-grouped kernel, but slower than the Gluon K-grouped kernel (:mod:`prmc.kernels.gluon_weight_grad`,
v12), so it runs only where that kernel does not fit (H200, bf16, ms; v9:
benchmarks/results/cublas_per_expert_probe_v9.log, v11-v12: moe_layer_breakdown_v11.log, _v12.log;
benchmarks/KERNELS_NOTES.md):

==================  ==================  =========================================================================
product             cuBLAS per expert   grouped
==================  ==================  =========================================================================
gate_up grad_w      6.06 / 6.25 / 6.15  6.47 / 6.41 / 6.40 (CUTLASS K-grouped); 5.98 / 5.93 (Gluon, v12)
gate_up grad_x      5.91 / 5.71 / 5.83  6.23 / 5.95 (Triton, v9); 5.63 / 5.57 (Gluon, v10-v11): grouped since v11
down grad_w         2.97 / 3.23         2.93 / 2.94 (CUTLASS); 3.06 / 2.92 (Gluon, v12): grouped
down fwd, grad_h    2.84-3.01           2.93-3.00 (Triton, v9): kept, a tie
==================  ==================  =========================================================================

With many small experts the loop of launches loses by far: Qwen3-30B-A3B's (128 experts x ~512 rows) weight
gradients took 2.5-3.5 ms against CUTLASS's 0.42-0.84, DeepSeek-V2-Lite's (64 x ~768) 1.21-1.29 against
0.55-1.01. Hence the rule in :func:`takes`.

NOTE: host sync. The loop needs the group bounds on the host. :func:`group_bounds_later` copies them to pinned
memory without blocking when the backward starts; the host waits for that copy alone (an event), once the
products before gate_up's weight gradient are queued, so the GPU never runs dry. Under CUDA graph capture,
where a sync is not allowed, the grouped kernels run instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prmc.kernels import cutlass

# Mixtral-class layers (measured: 8 experts of ~2048 rows); DeepSeek-V2-Lite (64 x ~768) measured slower.
MAX_GROUPS = 16
MIN_ROWS_PER_GROUP = 1024


def takes(offsets: Tensor, rows: int, *tensors: Tensor) -> bool:
    """Whether the layer's gate_up grad_w goes to cuBLAS: few groups of many rows on average, the operands CUTLASS
    would take (Hopper, bf16: where it was measured), and no CUDA graph being captured."""
    groups = offsets.shape[0]
    return (
        groups <= MAX_GROUPS
        and rows >= MIN_ROWS_PER_GROUP * groups
        and cutlass.takes(*tensors)
        and not torch.cuda.is_current_stream_capturing()
    )


def group_bounds(offsets: Tensor) -> list[int]:
    """``[0, end_0, ..., end_{E-1}]`` on the host. NOTE: host sync: waits for all the work queued so far."""
    return [0, *offsets.tolist()]


def group_bounds_later(offsets: Tensor) -> Callable[[], list[int]]:
    """:func:`group_bounds`, copied now without blocking; the function returned waits for that copy only (not for
    the work queued after it) and gives the bounds. NOTE: host sync on the copy (see the module's docstring)."""
    if not offsets.is_cuda:
        bounds = group_bounds(offsets)
        return lambda: bounds
    host = torch.empty(offsets.shape, dtype=offsets.dtype, pin_memory=True)
    host.copy_(offsets, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return [0, *host.tolist()]

    return wait


def k_mm(left: Tensor, right: Tensor, bounds: list[int]) -> Tensor:
    """``out[e] = left[g_e].T @ right[g_e]`` over each group's rows g_e: left [M, P], right [M, Q] -> [E, P, Q]
    (an empty group gives zeros)."""
    out = left.new_empty(len(bounds) - 1, left.shape[1], right.shape[1])
    for e in range(out.shape[0]):
        torch.mm(left[bounds[e] : bounds[e + 1]].t(), right[bounds[e] : bounds[e + 1]], out=out[e])
    return out
