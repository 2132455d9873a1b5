"""The prmc operators: ``torch.ops.prmc.*``.

Real ``torch.library`` custom ops with fake (meta) implementations and registered autograd, so that
Dynamo, AOT autograd and Inductor see through them and they appear by name in graphs and profiler
traces. The default implementation of each op is its pure-PyTorch reference
(:mod:`prmc.kernels.reference`); :mod:`prmc.kernels.triton_moe` registers Triton kernels for CUDA.

The granularity follows what later passes need as separate graph nodes:

``sort_by_expert``      dispatch: route table -> expert-sorted order, counts, offsets. The recompute pass
                        saves its outputs; expert parallelism exchanges ``counts`` and permutes by ``order``.
``expert_gate_up``      gather rows + grouped GEMM (gate/up) + activation; also returns the pre-activation
                        that its backward needs (the recompute pass may choose to recompute it instead).
``expert_down``         grouped GEMM (down) + per-row routing weight + scatter-add to output rows (the
                        combine, fused). With expert parallelism it scatters to the received order instead.
``*_backward``          the backward computations, ops of their own so that kernels can replace them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prmc.kernels import reference

__all__ = ["sort_by_expert", "expert_gate_up", "expert_down"]


@torch.library.custom_op("prmc::sort_by_expert", mutates_args=())
def sort_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """[T, K] expert ids -> (order [T*K] int64, counts [E] int64, offsets [E] int32)."""
    return reference.sort_by_expert(expert_ids, num_experts)


@sort_by_expert.register_fake
def _(expert_ids: Tensor, num_experts: int):
    m = expert_ids.numel()
    dev = expert_ids.device
    return (
        torch.empty(m, dtype=torch.int64, device=dev),
        torch.empty(num_experts, dtype=torch.int64, device=dev),
        torch.empty(num_experts, dtype=torch.int32, device=dev),
    )


def _check_gate_up(x: Tensor, rows: Tensor, offsets: Tensor, weight: Tensor, activation: str, gated: bool) -> None:
    torch._check(x.dim() == 2, lambda: f"prmc.expert_gate_up: x must be [N, H], got {tuple(x.shape)}")
    torch._check(weight.dim() == 3, lambda: f"prmc.expert_gate_up: weight must be [E, F, H], got {tuple(weight.shape)}")
    torch._check(
        weight.shape[2] == x.shape[1],
        lambda: f"prmc.expert_gate_up: weight {tuple(weight.shape)} does not take hidden size {x.shape[1]}",
    )
    torch._check(offsets.shape[0] == weight.shape[0], lambda: "prmc.expert_gate_up: one offset per expert")
    torch._check(not gated or weight.shape[1] % 2 == 0, lambda: "prmc.expert_gate_up: gated weight needs 2*I rows")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"prmc.expert_gate_up: unknown activation {activation!r}; expected {reference.ACTIVATIONS}")


@torch.library.custom_op("prmc::expert_gate_up", mutates_args=())
def expert_gate_up(
    x: Tensor, rows: Tensor, offsets: Tensor, weight: Tensor, activation: str, gated: bool
) -> tuple[Tensor, Tensor]:
    """x [N, H], rows [M], offsets [E], weight [E, F, H] -> (h [M, I], preact [M, F])."""
    _check_gate_up(x, rows, offsets, weight, activation, gated)
    return reference.expert_gate_up(x, rows, offsets, weight, activation, gated)


@expert_gate_up.register_fake
def _(x, rows, offsets, weight, activation, gated):
    _check_gate_up(x, rows, offsets, weight, activation, gated)
    m, f = rows.shape[0], weight.shape[1]
    i = f // 2 if gated else f
    return x.new_empty(m, i), x.new_empty(m, f)


@torch.library.custom_op("prmc::expert_gate_up_backward", mutates_args=())
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
    """-> (grad_x [N, H], grad_weight [E, F, H])."""
    return reference.expert_gate_up_backward(grad_h, x, rows, offsets, weight, preact, activation, gated)


@expert_gate_up_backward.register_fake
def _(grad_h, x, rows, offsets, weight, preact, activation, gated):
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape)


def _gate_up_setup(ctx, inputs, output):
    x, rows, offsets, weight, activation, gated = inputs
    _, preact = output
    ctx.save_for_backward(x, rows, offsets, weight, preact)
    ctx.activation, ctx.gated = activation, gated


def _gate_up_backward(ctx, grad_h, _grad_preact):
    x, rows, offsets, weight, preact = ctx.saved_tensors
    grad_x, grad_w = torch.ops.prmc.expert_gate_up_backward(
        grad_h.contiguous(), x, rows, offsets, weight, preact, ctx.activation, ctx.gated
    )
    return grad_x, None, None, grad_w, None, None


expert_gate_up.register_autograd(_gate_up_backward, setup_context=_gate_up_setup)


def _check_down(h: Tensor, offsets: Tensor, weight: Tensor, rows: Tensor, scale: Tensor | None) -> None:
    torch._check(h.dim() == 2, lambda: f"prmc.expert_down: h must be [M, I], got {tuple(h.shape)}")
    torch._check(weight.dim() == 3, lambda: f"prmc.expert_down: weight must be [E, H, I], got {tuple(weight.shape)}")
    torch._check(
        weight.shape[2] == h.shape[1],
        lambda: f"prmc.expert_down: weight {tuple(weight.shape)} does not take intermediate size {h.shape[1]}",
    )
    torch._check(offsets.shape[0] == weight.shape[0], lambda: "prmc.expert_down: one offset per expert")
    torch._check(rows.shape[0] == h.shape[0], lambda: "prmc.expert_down: one output row per routed row")
    if scale is not None:
        torch._check(scale.shape == (h.shape[0],), lambda: "prmc.expert_down: scale must be [M]")


@torch.library.custom_op("prmc::expert_down", mutates_args=())
def expert_down(h: Tensor, offsets: Tensor, weight: Tensor, rows: Tensor, scale: Tensor | None, num_rows: int) -> Tensor:
    """h [M, I], offsets [E], weight [E, H, I], rows [M], scale [M]? -> out [num_rows, H]."""
    _check_down(h, offsets, weight, rows, scale)
    return reference.expert_down(h, offsets, weight, rows, scale, num_rows)


@expert_down.register_fake
def _(h, offsets, weight, rows, scale, num_rows):
    _check_down(h, offsets, weight, rows, scale)
    return h.new_empty(num_rows, weight.shape[1])


@torch.library.custom_op("prmc::expert_down_backward", mutates_args=())
def expert_down_backward(
    grad_out: Tensor, h: Tensor, offsets: Tensor, weight: Tensor, rows: Tensor, scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_h [M, I], grad_weight [E, H, I], grad_scale [M], or [0] without ``scale``)."""
    return reference.expert_down_backward(grad_out, h, offsets, weight, rows, scale)


@expert_down_backward.register_fake
def _(grad_out, h, offsets, weight, rows, scale):
    grad_scale = scale.new_empty(scale.shape) if scale is not None else h.new_empty(0)
    return torch.empty_like(h, memory_format=torch.contiguous_format), weight.new_empty(weight.shape), grad_scale


def _down_setup(ctx, inputs, output):
    h, offsets, weight, rows, scale, _ = inputs
    ctx.has_scale = scale is not None
    ctx.save_for_backward(h, offsets, weight, rows, scale)


def _down_backward(ctx, grad_out):
    h, offsets, weight, rows, scale = ctx.saved_tensors
    grad_h, grad_w, grad_scale = torch.ops.prmc.expert_down_backward(
        grad_out.contiguous(), h, offsets, weight, rows, scale if ctx.has_scale else None
    )
    return grad_h, None, grad_w, None, (grad_scale if ctx.has_scale else None), None


expert_down.register_autograd(_down_backward, setup_context=_down_setup)


# CUDA implementations (Triton kernels); CPU-only installs without Triton keep the reference everywhere.
if __import__("importlib.util").util.find_spec("triton") is not None:
    from prmc.kernels import triton_moe  # noqa: E402,F401
