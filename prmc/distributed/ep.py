"""Expert-parallel dispatch and combine, dropless, as traceable PyTorch code.

Everything here is plain PyTorch on top of the prmc ops and the functional collectives, so it runs
eagerly, traces with Dynamo (``capture_scalar_outputs``) and with AOT autograd, and compiles through
Inductor forward and backward. The token all-to-alls are ``all_to_all_single_autograd`` (backward: the
transposed all-to-all); traced, each is an ``all_to_all_single`` node followed by a ``wait_tensor`` node.
The code issues them in the order the schedule wants (next chunk before this chunk's GEMMs); where the
waits go in the compiled forward and backward graphs is decided by :mod:`prmc.passes.overlap`. Eagerly,
functional collectives return ``AsyncCollectiveTensor`` s that wait at first use, which gives the same
overlap.

Layout (EP size ``W``, ``E`` experts, ``El = E / W`` local experts; rank ``r`` owns experts
``[r*El, (r+1)*El)``):

1. ``sort_by_expert(ids, E)`` sorts the ``T*K`` routed slots by global expert, hence by destination rank.
2. per-expert counts ``[E]`` (``scatter_add``) are exchanged with one equal-split all-to-all (all chunks
   at once) and turned into split sizes with one ``tolist`` (one host sync per block): unbacked SymInts
   under tracing, constrained with ``torch._check``. Send and receive sizes come from the same exchanged
   counts, so the ranks agree on every split by construction.
3. rows are gathered in sorted order and sent (variable splits); the receiver sees them grouped by source
   rank then local expert, and re-sorts them by local expert (``sort_by_expert`` on local ids).
4. ``experts`` on the local expert weights, returning the rows in the received order (top_k 1, no routing
   weight: the sender applies it).
5. the reverse all-to-all returns the rows to the sender, which combines them into token order with its
   routing weights (``index_add``).

With ``chunks = N > 1`` the tokens are split into N contiguous chunks; the token all-to-all of chunk i+1 is
issued before chunk i's expert GEMMs and waited after them, and chunk i's return all-to-all is issued right
after its GEMMs and waited at the end. ``ep_start`` issues the first dispatch all-to-all and returns; work
placed between ``ep_start`` and ``ep_finish`` (a shared expert) runs while it is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

import prmc.ops  # noqa: F401  (registers torch.ops.prmc.*)

import torch.distributed._functional_collectives as _fc

_c10d = torch.ops._c10d_functional

__all__ = ["ep_moe", "ep_start", "ep_finish", "EPState", "all_to_all"]


# ---------------------------------------------------------------- collectives
def all_to_all(x: Tensor, out_splits: list, in_splits: list, group_name: str) -> Tensor:
    """Variable-split all-to-all with autograd (backward: the transposed all-to-all).

    Eagerly the result is an ``AsyncCollectiveTensor`` (waited at its first use); traced, the graph holds
    ``all_to_all_single`` then ``wait_tensor``, and :mod:`prmc.passes.overlap` sinks the wait to the first
    use after the independent compute.
    """
    return _fc.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group_name)


# ---------------------------------------------------------------- dispatch state
@dataclass
class _Chunk:
    t0: object  # first token of the chunk (int or SymInt)
    rows: Tensor  # [Tc*K] token row (within the chunk) of each sorted slot
    scale: Tensor  # [Tc*K] routing weight of each sorted slot
    in_splits: list  # rows sent to each rank
    out_splits: list  # rows received from each rank
    n_recv: object  # sum(out_splits)
    recv_counts: Tensor  # [W*El] rows received per (source rank, local expert)
    x_sorted: Tensor  # [Tc*K, H] rows in send order
    issued: Tensor | None = None
    received: Tensor | None = None
    back_issued: Tensor | None = None


@dataclass
class EPState:
    """What ``ep_start`` hands to ``ep_finish`` (one MoE block)."""

    x: Tensor
    group_name: str
    world: int
    num_local: int
    chunks: list = field(default_factory=list)


def _token_bounds(t, n: int) -> list:
    """Start offsets of ``n`` contiguous chunks of ``t`` tokens (``t`` may be a SymInt)."""
    return [(i * t) // n for i in range(n + 1)]


def ep_start(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    *,
    group_name: str,
    world: int,
    num_experts: int,
    chunks: int = 1,
) -> EPState:
    """Route, exchange counts, issue the first token all-to-all.

    Args:
        x: [T, H] tokens.  expert_ids: [T, K] global expert per slot.  weights: [T, K] or [T*K] routing weights.
        group_name: the EP process group's name.  world: its size.  num_experts: E (divisible by ``world``).
        chunks: token chunks (1 = no overlap).
    """
    if num_experts % world != 0:
        raise ValueError(f"prmc expert parallel: {num_experts} experts do not divide over {world} ranks")
    t, k = expert_ids.shape
    el = num_experts // world
    weights = weights.reshape(t, k)
    n = max(1, int(chunks))
    bounds = _token_bounds(t, n)

    # 1. per-chunk sort and counts; 2. one count exchange for all chunks
    sorted_ = []
    for c in range(n):
        ids_c = expert_ids[bounds[c] : bounds[c + 1]]
        order, counts, _, _ = torch.ops.prmc.sort_by_expert(ids_c, num_experts)
        sorted_.append((ids_c, order, counts))
    send_counts = torch.stack([s[2] for s in sorted_])  # [n, E]
    send_counts_w = send_counts.view(n, world, el).transpose(0, 1).contiguous()  # [W, n, El]
    recv_counts_w = _c10d.wait_tensor(
        _c10d.all_to_all_single(send_counts_w.view(-1), [n * el] * world, [n * el] * world, group_name)
    ).view(world, n, el)  # [W(source), n, El]
    split_tab = torch.stack([send_counts_w.sum(-1), recv_counts_w.sum(-1)])  # [2, W, n]
    split_list = split_tab.permute(2, 0, 1).tolist()  # [n][2][W] (the one host sync)

    state = EPState(x=x, group_name=group_name, world=world, num_local=el)
    for c in range(n):
        ids_c, order, _ = sorted_[c]
        in_splits, out_splits = split_list[c]
        tc = bounds[c + 1] - bounds[c]
        for v in in_splits + out_splits:
            torch._check(v >= 0)
        torch._check(sum(in_splits) == tc * k, lambda: "prmc expert parallel: send splits do not cover the routed rows")
        n_recv = sum(out_splits)
        rows = order // k
        scale = weights[bounds[c] : bounds[c + 1]].reshape(-1)[order]
        x_sorted = x[bounds[c] : bounds[c + 1]][rows]
        ch = _Chunk(
            t0=bounds[c],
            rows=rows,
            scale=scale,
            in_splits=in_splits,
            out_splits=out_splits,
            n_recv=n_recv,
            recv_counts=recv_counts_w[:, c, :].reshape(-1),
            x_sorted=x_sorted,
        )
        state.chunks.append(ch)
    _issue_dispatch(state, 0)
    return state


def _issue_dispatch(state: EPState, c: int) -> None:
    if c < len(state.chunks):
        ch = state.chunks[c]
        ch.issued = all_to_all(ch.x_sorted, ch.out_splits, ch.in_splits, state.group_name)


def _local_experts(state: EPState, ch: _Chunk, w13: Tensor, w2: Tensor, activation: str, gated: bool) -> Tensor:
    """Received rows (grouped by source rank, then local expert) -> expert outputs in the same order."""
    el = state.num_local
    recv = ch.received
    bounds = torch.cumsum(ch.recv_counts, 0)
    pos = torch.arange(ch.n_recv, device=recv.device, dtype=bounds.dtype)
    seg = torch.searchsorted(bounds, pos, right=True)
    local_ids = (seg % el).view(-1, 1)
    lorder, _, loffsets, linverse = torch.ops.prmc.sort_by_expert(local_ids, el)
    return torch.ops.prmc.experts(recv, lorder, linverse, 1, loffsets, w13, w2, None, activation, gated)[0]


def ep_finish(state: EPState, w13: Tensor, w2: Tensor, activation: str, gated: bool) -> Tensor:
    """Expert GEMMs on the local experts, return all-to-all, weighted combine. -> [T, H] (x's dtype).

    w13: [El, F, H] local gate/up weights; w2: [El, H, I] local down weights.
    """
    x, g = state.x, state.group_name
    n = len(state.chunks)
    for c, ch in enumerate(state.chunks):
        _issue_dispatch(state, c + 1)  # next chunk's tokens travel while this chunk computes
        ch.received = ch.issued
        y = _local_experts(state, ch, w13, w2, activation, gated)
        ch.back_issued = all_to_all(y, ch.in_splits, ch.out_splits, g)
    out = None
    for c, ch in enumerate(state.chunks):
        back = ch.back_issued
        acc = torch.promote_types(back.dtype, torch.float32)
        contrib = back.to(acc) * ch.scale.to(acc)[:, None]
        rows = ch.rows + ch.t0 if n > 1 else ch.rows
        out = (x.new_zeros(x.shape, dtype=acc) if out is None else out).index_add(0, rows, contrib)
    return out.to(x.dtype)


def ep_moe(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    *,
    group_name: str,
    world: int,
    num_experts: int,
    activation: str = "silu",
    gated: bool = True,
    chunks: int = 1,
) -> Tensor:
    """The whole expert-parallel MoE computation: ``ep_finish(ep_start(...))``."""
    st = ep_start(
        x, expert_ids, weights, group_name=group_name, world=world, num_experts=num_experts, chunks=chunks
    )
    return ep_finish(st, w13, w2, activation, gated)
