"""prmc expert parallelism: shard experts over a mesh, all-to-all dispatch/combine, gradient sync."""

from prmc.distributed.ep import ep_finish, ep_moe, ep_start
from prmc.distributed.grads import sync_gradients
from prmc.distributed.shard import EPInfo, ShardingError, check_structure, find_expert_modules, set_overlap_chunks, shard_experts

__all__ = [
    "shard_experts",
    "set_overlap_chunks",
    "sync_gradients",
    "find_expert_modules",
    "check_structure",
    "ep_moe",
    "ep_start",
    "ep_finish",
    "EPInfo",
    "ShardingError",
]
