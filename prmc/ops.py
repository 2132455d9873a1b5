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
``expert_down``         grouped GEMM (down) + per-row routing weight + sum per token (the combine). With
                        expert parallelism (``top_k`` 1) it un-permutes to the received order instead.

The expert ops take ``order`` (sort_by_expert's permutation: the slot ``t * top_k + k`` of each routed row)
and ``top_k``, not just the token of each row: the permutation's inverse lists each token's rows, which
the combines need (:mod:`prmc.kernels.reference` has the conventions).
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


def _check_order(op: str, order: Tensor, top_k: int, num_rows: int | None) -> None:
    torch._check(order.dim() == 1, lambda: f"prmc.{op}: order must be [M], got {tuple(order.shape)}")
    if top_k < 1:
        raise ValueError(f"prmc.{op}: top_k must be at least 1, got {top_k}")
    if num_rows is not None:
        torch._check(
            order.shape[0] == num_rows * top_k,
            lambda: f"prmc.{op}: order has {order.shape[0]} slots, expected {num_rows} tokens x top_k {top_k}",
        )
    else:
        torch._check(order.shape[0] % top_k == 0, lambda: f"prmc.{op}: {order.shape[0]} slots is not a multiple of top_k {top_k}")


def _check_gate_up(x: Tensor, order: Tensor, top_k: int, offsets: Tensor, weight: Tensor, activation: str, gated: bool) -> None:
    torch._check(x.dim() == 2, lambda: f"prmc.expert_gate_up: x must be [T, H], got {tuple(x.shape)}")
    _check_order("expert_gate_up", order, top_k, x.shape[0])
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
    x: Tensor, order: Tensor, top_k: int, offsets: Tensor, weight: Tensor, activation: str, gated: bool
) -> tuple[Tensor, Tensor]:
    """x [T, H], order [M = T*top_k], offsets [E], weight [E, F, H] -> (h [M, I], preact [M, F])."""
    _check_gate_up(x, order, top_k, offsets, weight, activation, gated)
    return reference.expert_gate_up(x, order, top_k, offsets, weight, activation, gated)


@expert_gate_up.register_fake
def _(x, order, top_k, offsets, weight, activation, gated):
    _check_gate_up(x, order, top_k, offsets, weight, activation, gated)
    m, f = order.shape[0], weight.shape[1]
    i = f // 2 if gated else f
    return x.new_empty(m, i), x.new_empty(m, f)


@torch.library.custom_op("prmc::expert_gate_up_backward", mutates_args=())
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
    """-> (grad_x [T, H], grad_weight [E, F, H])."""
    return reference.expert_gate_up_backward(grad_h, x, order, top_k, offsets, weight, preact, activation, gated)


@expert_gate_up_backward.register_fake
def _(grad_h, x, order, top_k, offsets, weight, preact, activation, gated):
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape)


def _gate_up_setup(ctx, inputs, output):
    x, order, top_k, offsets, weight, activation, gated = inputs
    _, preact = output
    ctx.save_for_backward(x, order, offsets, weight, preact)
    ctx.top_k, ctx.activation, ctx.gated = top_k, activation, gated
    # preact is an output for saving, not for use: no [M, F] zero gradient is made for it.
    ctx.set_materialize_grads(False)


def _gate_up_backward(ctx, grad_h, grad_preact):
    if grad_preact is not None:
        raise NotImplementedError(
            "prmc.expert_gate_up: its second output (preact) is saved for backward, not differentiable; "
            "use the first output (h)"
        )
    x, order, offsets, weight, preact = ctx.saved_tensors
    if grad_h is None:
        return None, None, None, None, None, None, None
    grad_x, grad_w = torch.ops.prmc.expert_gate_up_backward(
        grad_h.contiguous(), x, order, ctx.top_k, offsets, weight, preact, ctx.activation, ctx.gated
    )
    return grad_x, None, None, None, grad_w, None, None


expert_gate_up.register_autograd(_gate_up_backward, setup_context=_gate_up_setup)


def _check_down(h: Tensor, offsets: Tensor, weight: Tensor, order: Tensor, top_k: int, scale: Tensor | None) -> None:
    torch._check(h.dim() == 2, lambda: f"prmc.expert_down: h must be [M, I], got {tuple(h.shape)}")
    torch._check(weight.dim() == 3, lambda: f"prmc.expert_down: weight must be [E, H, I], got {tuple(weight.shape)}")
    torch._check(
        weight.shape[2] == h.shape[1],
        lambda: f"prmc.expert_down: weight {tuple(weight.shape)} does not take intermediate size {h.shape[1]}",
    )
    torch._check(offsets.shape[0] == weight.shape[0], lambda: "prmc.expert_down: one offset per expert")
    torch._check(order.shape[0] == h.shape[0], lambda: "prmc.expert_down: order must have one slot per row of h")
    _check_order("expert_down", order, top_k, None)
    if scale is not None:
        torch._check(scale.shape == (h.shape[0],), lambda: "prmc.expert_down: scale must be [M]")


@torch.library.custom_op("prmc::expert_down", mutates_args=())
def expert_down(h: Tensor, offsets: Tensor, weight: Tensor, order: Tensor, top_k: int, scale: Tensor | None) -> Tensor:
    """h [M, I], offsets [E], weight [E, H, I], order [M], scale [M]? -> out [M // top_k, H]."""
    _check_down(h, offsets, weight, order, top_k, scale)
    return reference.expert_down(h, offsets, weight, order, top_k, scale)


@expert_down.register_fake
def _(h, offsets, weight, order, top_k, scale):
    _check_down(h, offsets, weight, order, top_k, scale)
    return h.new_empty(order.shape[0] // top_k, weight.shape[1])


@torch.library.custom_op("prmc::expert_down_backward", mutates_args=())
def expert_down_backward(
    grad_out: Tensor, h: Tensor, offsets: Tensor, weight: Tensor, order: Tensor, top_k: int, scale: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """-> (grad_h [M, I], grad_weight [E, H, I], grad_scale [M], or [0] without ``scale``)."""
    return reference.expert_down_backward(grad_out, h, offsets, weight, order, top_k, scale)


@expert_down_backward.register_fake
def _(grad_out, h, offsets, weight, order, top_k, scale):
    grad_scale = scale.new_empty(scale.shape) if scale is not None else h.new_empty(0)
    return torch.empty_like(h, memory_format=torch.contiguous_format), weight.new_empty(weight.shape), grad_scale


def _down_setup(ctx, inputs, output):
    h, offsets, weight, order, top_k, scale = inputs
    ctx.has_scale, ctx.top_k = scale is not None, top_k
    ctx.save_for_backward(h, offsets, weight, order, scale)


def _down_backward(ctx, grad_out):
    h, offsets, weight, order, scale = ctx.saved_tensors
    grad_h, grad_w, grad_scale = torch.ops.prmc.expert_down_backward(
        grad_out.contiguous(), h, offsets, weight, order, ctx.top_k, scale if ctx.has_scale else None
    )
    return grad_h, None, grad_w, None, None, (grad_scale if ctx.has_scale else None)


expert_down.register_autograd(_down_backward, setup_context=_down_setup)


# CUDA implementations (Triton kernels); CPU-only installs without Triton keep the reference everywhere.
if __import__("importlib.util").util.find_spec("triton") is not None:
    from prmc.kernels import triton_moe  # noqa: E402,F401
