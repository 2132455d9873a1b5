"""``shard_experts``: keep only this rank's experts, as DTensors sharded on the expert dimension.

After ``shard_experts(model, ep_mesh)`` every stacked-experts module (transformers v5 ``*Experts``:
3-D ``gate_up_proj`` [E, 2I, H] (or ``up_proj`` [E, I, H] without a gate) and ``down_proj`` [E, H, I])
holds ``nn.Parameter(DTensor)`` placed ``[Shard(0)]`` on the 1-D EP mesh (the torchtitan convention),
so ``full_tensor()`` gives the global weight or gradient, and FSDP2 / distributed checkpointing compose.

The module's forward is replaced by the expert-parallel computation (:func:`prmc.distributed.ep.ep_moe`)
on the local shards: the model's own expert code cannot run on sharded weights (neither eagerly nor under
Dynamo: it indexes global experts), and the replacement is exact, so the model stays correct eagerly,
under ``torch.compile(backend="inductor")`` and under ``backend="prmc"`` (whose passes then find the EP
nodes, check that ranks agree on the block structure, and schedule the overlap).
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from prmc.distributed import ep

__all__ = [
    "shard_experts",
    "EPInfo",
    "find_expert_modules",
    "set_overlap_chunks",
    "current_overlap_chunks",
    "check_structure",
    "check_group",
    "ShardingError",
]

_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


class ShardingError(ValueError):
    """The model cannot be sharded for expert parallelism as asked (the message says why and what to do)."""


@dataclass
class EPInfo:
    """Attached to each sharded experts module as ``module._prmc_ep``."""

    path: str
    num_experts: int
    num_local: int
    world: int
    rank: int
    group_name: str
    activation: str
    gated: bool
    transposed: bool
    chunks: int = 1

    def structure(self) -> tuple:
        """What all ranks must agree on before any collective of this block is issued."""
        return (self.path, self.num_experts, self.world, self.activation, self.gated, self.transposed)


def _activation_name(mod: nn.Module) -> str | None:
    cfg = getattr(mod, "config", None)
    for key in ("hidden_act", "hidden_activation"):
        name = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(name, str):
            return _ACTIVATIONS.get(name)
    act = getattr(mod, "act_fn", None)
    cls = type(act).__name__.lower() if act is not None else ""
    for k, v in (("silu", "silu"), ("gelutanh", "gelu_tanh"), ("pytorchgelutanh", "gelu_tanh"), ("relu", "relu")):
        if k in cls:
            return v
    if cls in ("geluactivation", "gelu"):
        return "gelu"
    return None


def _is_stacked_experts(mod: nn.Module) -> bool:
    down = mod._parameters.get("down_proj")
    up = mod._parameters.get("gate_up_proj", mod._parameters.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def find_expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Stacked-experts modules (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``), in module order."""
    return [(n, m) for n, m in model.named_modules() if _is_stacked_experts(m)]


def _looks_like_expert_list(mod: nn.Module) -> bool:
    return isinstance(mod, nn.ModuleList) and len(mod) > 1 and all(type(m) is type(mod[0]) for m in mod)


def _options_of(fn) -> dict | None:
    """The ``options`` dict of a ``torch.compile`` wrapper around ``fn`` (``_TorchCompileWrapper.kwargs``)."""
    seen, stack = set(), [fn]
    while stack and len(seen) < 32:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        kw = getattr(f, "kwargs", None)
        if isinstance(kw, dict) and isinstance(kw.get("options"), dict):
            return kw["options"]
        for attr in ("compiler_fn", "_torchdynamo_orig_backend", "func", "__wrapped__"):
            inner = getattr(f, attr, None)
            if inner is not None and callable(inner):
                stack.append(inner)
    return None


@torch._dynamo.assume_constant_result
def _compile_overlap_chunks() -> int:
    """At trace time (a Dynamo constant): ``options["overlap"]["chunks"]`` of the compile tracing us, or 0."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        opts = _options_of(InstructionTranslator.current_tx().output.compiler_fn)
        chunks = (opts or {}).get("overlap", {}).get("chunks", 0)
        return int(chunks) if isinstance(chunks, int) and chunks > 0 else 0
    except Exception:
        return 0


def current_overlap_chunks(default: int) -> int:
    """Token chunks for the block being run or traced: the compile's ``overlap`` option, else ``default``."""
    if torch.compiler.is_compiling():
        c = _compile_overlap_chunks()
        return c if c > 0 else default
    return default


def _ep_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Replacement ``forward`` of a sharded experts module: [T, H], [T, K], [T, K] -> [T, H]."""
    info: EPInfo = self._prmc_ep
    up = self.gate_up_proj if info.gated else self.up_proj
    w13 = up.to_local() if isinstance(up, DTensor) else up
    w2 = self.down_proj.to_local() if isinstance(self.down_proj, DTensor) else self.down_proj
    if info.transposed:  # [E, H, F] / [E, I, H] storage
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    out = ep.ep_moe(
        x,
        top_k_index.reshape(x.shape[0], -1),
        top_k_weights.reshape(x.shape[0], -1),
        w13,
        w2,
        group_name=info.group_name,
        world=info.world,
        num_experts=info.num_experts,
        activation=info.activation,
        gated=info.gated,
        chunks=current_overlap_chunks(info.chunks),
    )
    return out.reshape(shape)


def shard_experts(model: nn.Module, ep_mesh, *, overlap_chunks: int = 1) -> list[EPInfo]:
    """Shard every stacked-experts module of ``model`` over the 1-D ``ep_mesh`` (in place).

    Returns one :class:`EPInfo` per sharded module. Raises :class:`ShardingError` (before touching
    anything) when the mesh is not 1-D, its size does not divide a module's number of experts, the expert
    layout is one prmc cannot run (biases, interleaved gate/up), or the model has no stacked experts.

    Also sets ``torch._dynamo.config.capture_scalar_outputs = True``: the all-to-all split sizes are
    data-dependent (one ``tolist`` per block), and Dynamo must capture them to keep one graph.
    """
    if ep_mesh.ndim != 1:
        raise ShardingError(f"shard_experts takes a 1-D expert-parallel mesh (e.g. mesh['ep']), got {ep_mesh.ndim}-D")
    world = ep_mesh.size()
    rank = ep_mesh.get_local_rank()
    group = ep_mesh.get_group()
    mods = find_expert_modules(model)
    if not mods:
        lists = [n for n, m in model.named_modules() if _looks_like_expert_list(m) and n.endswith("experts")]
        hint = (
            f" Found per-expert ModuleLists ({', '.join(lists[:3])}): stack them into 3-D gate_up_proj/down_proj"
            " parameters (transformers v5 layout) to use expert parallelism."
            if lists
            else ""
        )
        raise ShardingError("shard_experts: no stacked-experts module (3-D gate_up_proj/up_proj + down_proj) found." + hint)
    plans = []
    for path, mod in mods:
        gated = "gate_up_proj" in mod._parameters
        up = mod._parameters["gate_up_proj" if gated else "up_proj"]
        down = mod._parameters["down_proj"]
        e = up.shape[0]
        if down.shape[0] != e:
            raise ShardingError(f"{path}: up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the expert count")
        if e % world != 0:
            raise ShardingError(
                f"{path}: {e} experts cannot be split over an expert-parallel mesh of size {world}; "
                f"use a mesh size that divides {e}"
            )
        if getattr(mod, "has_bias", False) or any(k.endswith("_bias") and v is not None for k, v in mod._parameters.items()):
            raise ShardingError(f"{path}: experts with biases are not supported by prmc expert parallel yet")
        if getattr(mod, "is_concatenated", True) is False:
            raise ShardingError(f"{path}: interleaved gate/up layout is not supported (need [gate; up] concatenated)")
        act = _activation_name(mod)
        if act is None:
            raise ShardingError(f"{path}: unknown expert activation {getattr(mod, 'act_fn', None)!r}")
        if isinstance(up, DTensor) or isinstance(down, DTensor):
            raise ShardingError(f"{path}: expert weights are already DTensors (shard_experts called twice?)")
        transposed = bool(getattr(mod, "is_transposed", False))
        plans.append((path, mod, gated, act, transposed, e))

    _ensure_check_group()
    # every rank must shard the same blocks the same way (checked before anything is changed)
    check_structure([(p[0], p[5], world, p[3], p[2], p[4]) for p in plans], group)
    infos = []
    torch._dynamo.config.capture_scalar_outputs = True
    for path, mod, gated, act, transposed, e in plans:
        for name in ("gate_up_proj" if gated else "up_proj", "down_proj"):
            p = mod._parameters[name]
            dt = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
            param = nn.Parameter(dt, requires_grad=p.requires_grad)
            param._prmc_expert = True  # sync_gradients: reduced over DP only (FSDP2 params are DTensors too)
            mod._parameters[name] = param
        info = EPInfo(
            path=path,
            num_experts=e,
            num_local=e // world,
            world=world,
            rank=rank,
            group_name=group.group_name,
            activation=act,
            gated=gated,
            transposed=transposed,
            chunks=int(overlap_chunks),
        )
        mod._prmc_ep = info
        mod.forward = types.MethodType(_ep_forward, mod)
        infos.append(info)
    return infos


def set_overlap_chunks(model: nn.Module, chunks: int) -> None:
    """Set the token chunks of every sharded experts module (1 = no overlap). Recompiles on change."""
    if chunks < 1:
        raise ValueError(f"overlap chunks must be >= 1, got {chunks}")
    for _, m in model.named_modules():
        if hasattr(m, "_prmc_ep"):
            m._prmc_ep.chunks = int(chunks)


_CHECK_GROUP = None  # world-wide gloo group with a short timeout, for the structure checks


def check_group():
    """The process group the structure checks all-gather over (made by ``shard_experts``; else WORLD)."""
    return _CHECK_GROUP if _CHECK_GROUP is not None else dist.group.WORLD


def _ensure_check_group() -> None:
    global _CHECK_GROUP
    if _CHECK_GROUP is None and dist.is_initialized():
        import datetime
        import os

        timeout = datetime.timedelta(seconds=float(os.environ.get("PRMC_EP_CHECK_TIMEOUT", "300")))
        _CHECK_GROUP = dist.new_group(backend="gloo", timeout=timeout)


def structure_hash(items) -> str:
    return hashlib.sha256(repr(list(items)).encode()).hexdigest()[:16]


def check_structure(infos_or_items, group, what: str = "expert-parallel block structure") -> None:
    """All-gather a hash of the block structure over ``group``; raise on any disagreement.

    Runs before any collective of the blocks is issued, so a mismatch is an error, not a hang.
    """
    items = [i.structure() if isinstance(i, EPInfo) else i for i in infos_or_items]
    h = structure_hash(items)
    if not dist.is_initialized():
        return
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    try:
        dist.all_gather_object(gathered, (h, items), group=group)
    except Exception as exc:  # a rank that never arrives: it compiled or built something else
        raise RuntimeError(
            f"prmc expert parallel: the {what} check timed out or failed ({exc}); some rank did not reach it, "
            "which means the ranks run different models or compile different graphs"
        ) from exc
    bad = [i for i, (hh, _) in enumerate(gathered) if hh != h]
    if bad:
        ranks = dist.get_process_group_ranks(group)
        mine = dist.get_rank(group)
        other = gathered[bad[0]][1]
        raise RuntimeError(
            f"prmc expert parallel: ranks disagree on the {what}; collectives would hang or exchange wrong rows. "
            f"group rank {mine} (global {ranks[mine]}) has {len(items)} blocks {items[:4]}, group rank {bad[0]} "
            f"(global {ranks[bad[0]]}) has {len(other)} blocks {other[:4]}. Build the same model on every rank "
            "(same config, same MoE layers) and compile it the same way."
        )
