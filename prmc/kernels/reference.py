"""Pure-PyTorch reference implementations of the prmc expert ops.

These define what every prmc op computes. The CPU implementations of the ops run them, and every
Triton kernel in this package is tested against them (forward and every gradient).

Shapes (names used throughout prmc):
    T  tokens entering an MoE block           K  experts chosen per token (top-k)
    E  experts                                H  hidden size
    I  expert intermediate size               F  I, or 2*I for gated activations (gate rows first)
    M  routed rows, T*K on one device (the token copies sorted by expert)

Grouping convention: rows of a grouped operand are sorted by expert and ``offsets[e]`` is the
(exclusive) end row of expert ``e``'s group, int32, as ``torch._grouped_mm`` takes it. Groups may be
empty; rows at and beyond ``offsets[-1]`` belong to no expert and are left zero.

Which token a routed row belongs to is given by ``order`` [M] (from ``sort_by_expert``): the slot
``t * top_k + k`` of each routed row, a permutation of ``[0, M)``; routed row r reads and writes token
``order[r] // top_k``. The kernels need the permutation, not just the token of each row: its inverse
(``inverse``, also from ``sort_by_expert``) gives each token its ``top_k`` rows directly, so the combine
needs no sort. Per-slot values (the routing weights ``scale`` and their gradient) stay in slot order, the
``[T, K]`` layout the router made them in; kernels read them through ``order``.

All arithmetic accumulates in fp32; outputs take the dtype of the activation operand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def _act(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _act_grad(x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx, elementwise (closed forms: the kernels compute the same)."""
    if activation == "silu":
        s = torch.sigmoid(x)
        return s * (1 + x * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * 0.7071067811865476))
        pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    if activation == "gelu_tanh":
        c = 0.7978845608028654  # sqrt(2 / pi)
        inner = c * (x + 0.044715 * x * x * x)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    if activation == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activate(preact: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """[M, F] pre-activation -> [M, I]: ``act(gate) * up`` if gated (gate = first I columns), else ``act``."""
    if gated:
        gate, up = preact.chunk(2, dim=-1)
        return _act(gate, activation) * up
    return _act(preact, activation)


def activate_backward(grad_h: torch.Tensor, preact: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """Gradient of :func:`activate` with respect to ``preact`` ([M, I] -> [M, F])."""
    if gated:
        gate, up = preact.chunk(2, dim=-1)
        return torch.cat([grad_h * up * _act_grad(gate, activation), grad_h * _act(gate, activation)], dim=-1)
    return grad_h * _act_grad(preact, activation)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] per expert. NOTE: one host sync (``tolist``); fine for a reference."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def sort_by_expert(
    expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route table -> expert-sorted order.

    Args:
        expert_ids: [T, K] integer, the experts each token chose; an id outside ``[0, E)`` routes nowhere.
    Returns:
        order:   [T*K] int64, the flat (t*K + k) slots sorted by expert, stable (ties keep token order); slots
                 routed nowhere come last, past ``offsets[-1]``.
        counts:  [E] int64, rows per expert.
        offsets: [E] int32, cumulative counts (end row of each group).
        inverse: [T*K] int64, ``inverse[order[r]] = r``: where each slot's row went.
    """
    ids = expert_ids.reshape(-1)
    # Keys narrowed to the smallest integer type that holds every expert and the "nowhere" key E: a GPU radix
    # sort does one pass per key byte (measured on an H100, 65536 keys: 37 us as int16, 59 as int32, 90 as
    # int64). The CUDA implementation is a counting sort (prmc/kernels/sort_by_expert.py).
    key_dtype = torch.int16 if num_experts < 2**15 - 1 else torch.int32 if num_experts < 2**31 - 1 else torch.int64
    keys = torch.where((ids >= 0) & (ids < num_experts), ids, num_experts).to(key_dtype)
    sorted_keys, order = torch.sort(keys, stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(num_experts + 1, device=ids.device, dtype=key_dtype))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device)
    return order, torch.diff(starts), starts[1:].to(torch.int32), inverse


def expert_gate_up(
    x: torch.Tensor,
    order: torch.Tensor,
    top_k: int,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    activation: str,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather + grouped GEMM + activation.

    Args:
        x: [T, H] activations (token order).   order: [M = T*top_k] int64 slot of each routed row.
        offsets: [E] int32 group ends.          weight: [E, F, H] (any strides; F = 2I if gated).
    Returns:
        h: [M, I] activated rows (x's dtype), preact: [M, F] the GEMM output (saved for backward).
    """
    m, f = order.shape[0], weight.shape[1]
    xs = _acc(x[order // top_k])
    preact = xs.new_zeros(m, f)
    for e, (s, t) in enumerate(group_bounds(offsets)):
        if t > s:
            preact[s:t] = xs[s:t] @ _acc(weight[e]).t()
    preact = preact.to(x.dtype)
    return activate(_acc(preact), activation, gated).to(x.dtype), preact


def expert_down(
    h: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    top_k: int,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """Grouped GEMM + optional per-row scale + sum per token (the combine).

    Args:
        h: [M, I].  offsets: [E] int32.  weight: [E, H, I] (any strides).
        order: [M] int64 slot of each routed row (token ``order[i] // top_k``).  scale: [M] or None.
    Returns:
        out: [M // top_k, H] in h's dtype, ``out[order[i] // top_k] += scale[i] * (h[i] @ weight[e(i)].T)``.
    """
    hf = _acc(h)
    y = hf.new_zeros(h.shape[0], weight.shape[1])
    for e, (s, t) in enumerate(group_bounds(offsets)):
        if t > s:
            y[s:t] = hf[s:t] @ _acc(weight[e]).t()
    if scale is not None:
        y = y * _acc(scale)[:, None]
    out = hf.new_zeros(order.shape[0] // top_k, weight.shape[1]).index_add_(0, order // top_k, y)
    return out.to(h.dtype)


def experts(
    x: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    top_k: int,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    scale: torch.Tensor | None,
    activation: str,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts of a block: :func:`expert_gate_up` then :func:`expert_down`.

    ``scale`` [M] is in slot order (the routing weights ``[T, K]`` flattened), ``inverse`` the inverse of
    ``order`` (the kernels' combine reads it; the reference sums by ``order`` alone).
    Returns out [T, H] (x's dtype) and preact [M, F], all that the backward keeps of the forward: ``h`` is
    recomputed from it.
    """
    h, preact = expert_gate_up(x, order, top_k, offsets, w_gate_up, activation, gated)
    row_scale = scale[order] if scale is not None else None
    return expert_down(h, offsets, w_down, order, top_k, row_scale), preact


def experts_backward_down(
    grad_out: torch.Tensor,
    grad_preact: torch.Tensor | None,
    order: torch.Tensor,
    top_k: int,
    offsets: torch.Tensor,
    w_down: torch.Tensor,
    preact: torch.Tensor,
    scale: torch.Tensor | None,
    activation: str,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of the down projection and the activation, from ``grad_out`` [T, H] (token order) and the saved
    ``preact`` [M, F]: -> d preact [M, F] (preact's dtype), grad_w_down [E, H, I], grad_scale [M] in slot order
    (scale's dtype; [0] without scale).

    Per routed row r of token t = order[r] // top_k: ``g = grad_out[t] @ W_down[e]``, ``grad_scale = <g, h>``
    (``h`` recomputed from preact as the forward rounded it), d preact the activation's backward of
    ``scale * g``, plus ``grad_preact``, a gradient arriving at preact itself (None where nothing used it, the usual
    case); ``grad_w_down[e] = grad_out[rows of e].T @ (scale * h)[rows of e]``.
    """
    h = _acc(activate(_acc(preact), activation, gated).to(preact.dtype))
    go = _acc(grad_out[order // top_k])
    g = torch.zeros_like(h)
    bounds = group_bounds(offsets)
    for e, (s, t) in enumerate(bounds):
        if t > s:
            g[s:t] = go[s:t] @ _acc(w_down[e])
    grad_scale = preact.new_empty(0)
    if scale is not None:
        row_scale = _acc(scale[order])[:, None]
        grad_scale = torch.empty_like(scale)
        grad_scale[order] = (g * h).sum(-1).to(scale.dtype)
        g, h = g * row_scale, h * row_scale
    grad_w_down = h.new_zeros(w_down.shape)
    for e, (s, t) in enumerate(bounds):
        if t > s:
            grad_w_down[e] = go[s:t].t() @ h[s:t]
    dpre = activate_backward(g, _acc(preact), activation, gated)
    if grad_preact is not None:
        dpre = dpre + _acc(grad_preact)
    return dpre.to(preact.dtype), grad_w_down.to(w_down.dtype), grad_scale


def experts_backward_gate_up(
    dpre: torch.Tensor,
    x: torch.Tensor,
    order: torch.Tensor,
    inverse: torch.Tensor,
    top_k: int,
    offsets: torch.Tensor,
    w_gate_up: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of the gate_up projection from d preact [M, F]: -> grad_x [T, H] (summed over each token's rows,
    x's dtype), grad_w_gate_up [E, F, H] (``d preact[rows of e].T @ x[rows of e]``)."""
    rows = order // top_k
    dp, xs = _acc(dpre), _acc(x[rows])
    grad_xs = torch.zeros_like(xs)
    grad_w = xs.new_zeros(w_gate_up.shape)
    for e, (s, t) in enumerate(group_bounds(offsets)):
        if t > s:
            grad_xs[s:t] = dp[s:t] @ _acc(w_gate_up[e])
            grad_w[e] = dp[s:t].t() @ xs[s:t]
    grad_x = xs.new_zeros(x.shape).index_add_(0, rows, grad_xs)
    return grad_x.to(x.dtype), grad_w.to(w_gate_up.dtype)
