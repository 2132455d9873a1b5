"""Gradient reduction for expert parallel x data parallel.

Convention: every rank computes the mean loss over its own (equal-sized) share of the global batch, and
the global loss is the mean of those. Then

* a non-expert parameter's gradient is the mean of its per-rank gradients over *all* ranks (EP x DP);
* an expert shard's gradient already sums the contributions of every EP rank's tokens (the all-to-all
  backward brings them home), so it is summed over the DP group only and divided by EP x DP.

With FSDP2 on the non-expert parameters (``fully_shard(..., ignored_params=<expert params>)``), leave those
to FSDP (its reduce-scatter averages over its mesh) and call this with ``expert_only=True``. Expert
parameters are recognised by the ``_prmc_expert`` mark that ``shard_experts`` puts on them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["sync_gradients"]


def sync_gradients(model: nn.Module, ep_mesh, dp_mesh=None, *, dense_group=None, expert_only: bool = False) -> None:
    """All-reduce gradients after ``backward`` for EP (``ep_mesh``) x DP (``dp_mesh``, optional).

    ``dense_group``: the group spanning every EP x DP rank (default: the EP group without ``dp_mesh``, the
    world with it; pass it when the EP x DP mesh is a part of the world).
    """
    ep_size = ep_mesh.size()
    dp_size = dp_mesh.size() if dp_mesh is not None else 1
    total = ep_size * dp_size
    if not expert_only and dense_group is None:
        if dp_mesh is None:
            dense_group = ep_mesh.get_group()
        elif total == dist.get_world_size():
            dense_group = dist.group.WORLD
        else:
            raise ValueError(
                f"sync_gradients: the dp x ep mesh ({dp_size} x {ep_size}) is not the whole world "
                f"({dist.get_world_size()} ranks); pass dense_group= (e.g. mesh['dp', 'ep']._flatten().get_group())"
            )
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "_prmc_expert", False):
            expert.append(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
        elif isinstance(p, DTensor) or isinstance(p.grad, DTensor):
            if not expert_only:
                raise ValueError(
                    "sync_gradients: a DTensor parameter that shard_experts did not make (FSDP2?); "
                    "let FSDP reduce those and call sync_gradients(..., expert_only=True)"
                )
        elif not expert_only:
            dense.append(p.grad)
    if dense:
        flat = torch.cat([g.reshape(-1) for g in dense])
        dist.all_reduce(flat, group=dense_group)
        flat /= total
        i = 0
        for g in dense:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()
    for g in expert:
        if dp_mesh is not None and dp_size > 1:
            dist.all_reduce(g, group=dp_mesh.get_group())
        g /= total
