"""The prmc operators: ``torch.ops.prmc.*``.

Real ``torch.library`` custom ops with fake (meta) implementations and registered autograd, so that
Dynamo, AOT autograd and Inductor see through them and they appear by name in graphs and profiler
traces. The default implementation of each op is its pure-PyTorch reference
(:mod:`prmc.kernels.reference`); :mod:`prmc.kernels.triton_moe` registers Triton kernels for CUDA.

The granularity follows what later passes need as separate graph nodes:

``sort_by_expert``      dispatch: route table -> expert-sorted order, counts, offsets, inverse order. The
                        recompute pass saves its outputs; expert parallelism exchanges ``counts`` and
                        permutes by ``order``.
``experts``             the routed experts of a block: gather rows, grouped GEMM (gate/up), activation,
                        grouped GEMM (down), routing weight, sum per token (the combine). With expert
                        parallelism (``top_k`` 1, no routing weight) it returns the rows in received order.
                        It also returns the pre-activation, the one [M, F] tensor its backward keeps (``h``
                        is recomputed from it in the backward's fused per-row pass; the recompute pass
                        may choose to recompute it too).
``experts_backward_down``, ``experts_backward_gate_up``
                        its backward, ops of their own so that kernels can replace them, in two: the
                        down projection's and the activation's (-> d preact, grad_w_down, grad_scale),
                        then the gate_up projection's (-> grad_x, grad_w_gate_up). Between them the compiled
                        backward frees ``preact``, the largest tensor the forward keeps, before the gate_up
                        gradients allocate theirs. ``preact`` is differentiable too (its gradient adds to
                        d preact), though the lowering never uses it.

The expert ops take ``order`` (sort_by_expert's permutation: the slot ``t * top_k + k`` of each routed row),
its ``inverse`` and ``top_k``, not just the token of each row: the inverse lists each token's rows, which
the combines need. The routing weights ``scale`` stay in slot order (the router's [T, K], flattened), so the
lowering feeds them without a gather (:mod:`prmc.kernels.reference` has the conventions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prmc.kernels import reference

__all__ = ["sort_by_expert", "experts"]


@torch.library.custom_op("prmc::sort_by_expert", mutates_args=())
def sort_by_expert(expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """[T, K] expert ids -> (order [T*K] int64, counts [E] int64, offsets [E] int32, inverse [T*K] int64)."""
    return reference.sort_by_expert(expert_ids, num_experts)


@sort_by_expert.register_fake
def _(expert_ids: Tensor, num_experts: int):
    m = expert_ids.numel()
    dev = expert_ids.device
    return (
        torch.empty(m, dtype=torch.int64, device=dev),
        torch.empty(num_experts, dtype=torch.int64, device=dev),
        torch.empty(num_experts, dtype=torch.int32, device=dev),
        torch.empty(m, dtype=torch.int64, device=dev),
    )


def _check_experts(
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
) -> None:
    def shape(t: Tensor) -> tuple:
        return tuple(t.shape)

    torch._check(x.dim() == 2, lambda: f"prmc.experts: x must be [T, H], got {shape(x)}")
    torch._check(order.dim() == 1, lambda: f"prmc.experts: order must be [M], got {shape(order)}")
    if top_k < 1:
        raise ValueError(f"prmc.experts: top_k must be at least 1, got {top_k}")
    torch._check(
        order.shape[0] == x.shape[0] * top_k,
        lambda: f"prmc.experts: order has {order.shape[0]} slots, expected {x.shape[0]} tokens x top_k {top_k}",
    )
    torch._check(
        inverse.shape == order.shape,
        lambda: f"prmc.experts: inverse must be [M] like order {shape(order)}, got {shape(inverse)}",
    )
    torch._check(w_gate_up.dim() == 3, lambda: f"prmc.experts: w_gate_up must be [E, F, H], got {shape(w_gate_up)}")
    torch._check(w_down.dim() == 3, lambda: f"prmc.experts: w_down must be [E, H, I], got {shape(w_down)}")
    torch._check(
        w_gate_up.shape[2] == x.shape[1],
        lambda: f"prmc.experts: w_gate_up {shape(w_gate_up)} does not take hidden size {x.shape[1]}",
    )
    torch._check(not gated or w_gate_up.shape[1] % 2 == 0, lambda: "prmc.experts: a gated w_gate_up needs 2*I rows")
    inter = w_gate_up.shape[1] // 2 if gated else w_gate_up.shape[1]
    torch._check(
        w_down.shape[0] == w_gate_up.shape[0] and w_down.shape[1] == x.shape[1] and w_down.shape[2] == inter,
        lambda: f"prmc.experts: w_down {shape(w_down)} does not match w_gate_up {shape(w_gate_up)} "
        f"(expected [E, H, I] = [{w_gate_up.shape[0]}, {x.shape[1]}, {inter}])",
    )
    torch._check(offsets.shape[0] == w_gate_up.shape[0], lambda: "prmc.experts: one offset per expert")
    if scale is not None:
        torch._check(
            scale.shape == order.shape,
            lambda: f"prmc.experts: scale must be [M] (the [T, K] routing weights flattened), got {shape(scale)}",
        )
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"prmc.experts: unknown activation {activation!r}; expected one of {reference.ACTIVATIONS}")


@torch.library.custom_op("prmc::experts", mutates_args=())
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
    """x [T, H], order and inverse [M = T*top_k], offsets [E], w_gate_up [E, F, H], w_down [E, H, I], scale [M]?
    (slot order) -> (out [T, H], preact [M, F])."""
    _check_experts(x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, activation, gated)
    return reference.experts(x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, activation, gated)


@experts.register_fake
def _(x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, activation, gated):
    _check_experts(x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, activation, gated)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(order.shape[0], w_gate_up.shape[1])


@torch.library.custom_op("prmc::experts_backward_down", mutates_args=())
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
    """grad_out [T, H], grad_preact [M, F]?, preact [M, F] -> (d preact [M, F], grad_w_down [E, H, I], grad_scale [M]
    in slot order, or [0] without ``scale``)."""
    return reference.experts_backward_down(
        grad_out, grad_preact, order, top_k, offsets, w_down, preact, scale, activation, gated
    )  # fmt: skip


@experts_backward_down.register_fake
def _(grad_out, grad_preact, order, top_k, offsets, w_down, preact, scale, activation, gated):
    grad_scale = scale.new_empty(scale.shape) if scale is not None else preact.new_empty(0)
    return torch.empty_like(preact, memory_format=torch.contiguous_format), w_down.new_empty(w_down.shape), grad_scale


@torch.library.custom_op("prmc::experts_backward_gate_up", mutates_args=())
def experts_backward_gate_up(
    dpre: Tensor, x: Tensor, order: Tensor, inverse: Tensor, top_k: int, offsets: Tensor, w_gate_up: Tensor
) -> tuple[Tensor, Tensor]:
    """d preact [M, F], x [T, H] -> (grad_x [T, H], grad_w_gate_up [E, F, H])."""
    return reference.experts_backward_gate_up(dpre, x, order, inverse, top_k, offsets, w_gate_up)


@experts_backward_gate_up.register_fake
def _(dpre, x, order, inverse, top_k, offsets, w_gate_up):
    return torch.empty_like(x, memory_format=torch.contiguous_format), w_gate_up.new_empty(w_gate_up.shape)


def _experts_setup(ctx, inputs, output):
    x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, activation, gated = inputs
    _, preact = output
    ctx.save_for_backward(x, order, inverse, offsets, w_gate_up, w_down, preact, scale)
    ctx.top_k, ctx.activation, ctx.gated, ctx.has_scale = top_k, activation, gated, scale is not None
    # preact is an output for saving: where nothing uses it, no [M, F] zero gradient is made for it.
    ctx.set_materialize_grads(False)


def _experts_backward(ctx, grad_out, grad_preact):
    if grad_out is None and grad_preact is None:
        return (None,) * 10
    x, order, inverse, offsets, w_gate_up, w_down, preact, scale = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(x.shape)
    dpre, grad_w_down, grad_scale = torch.ops.prmc.experts_backward_down(
        grad_out.contiguous(), grad_preact.contiguous() if grad_preact is not None else None,
        order, ctx.top_k, offsets, w_down, preact, scale if ctx.has_scale else None, ctx.activation, ctx.gated,
    )  # fmt: skip
    grad_x, grad_w_gate_up = torch.ops.prmc.experts_backward_gate_up(
        dpre, x, order, inverse, ctx.top_k, offsets, w_gate_up
    )  # fmt: skip
    grad_scale = grad_scale if ctx.has_scale else None
    return grad_x, None, None, None, None, grad_w_gate_up, grad_w_down, grad_scale, None, None


experts.register_autograd(_experts_backward, setup_context=_experts_setup)


# CUDA implementations (Triton kernels); CPU-only installs without Triton keep the reference everywhere.
if __import__("importlib.util").util.find_spec("triton") is not None:
    from prmc.kernels import triton_moe  # noqa: E402,F401
