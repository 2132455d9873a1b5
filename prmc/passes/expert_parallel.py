"""expert_parallel: turn each lowered MoE block into its expert-parallel form, and make sure that every
rank will issue the same collectives before any is issued.

Two ways a block reaches here:

* **Sharded experts** (``prmc.distributed.shard_experts``; the intended use): the experts module's forward
  already is the EP computation (:func:`prmc.distributed.ep.ep_moe` on the DTensor shards' local
  tensors), so Dynamo's graph holds its all-to-alls, ``tolist`` and prmc ops. (The model's own expert code
  cannot be traced on sharded weights: Dynamo fails on the first op mixing DTensor and Tensor.) Nothing is
  rewritten; this pass checks the collective structure (below) and reports the blocks.
* **Replicated weights** (``options["expert_parallel"] = mesh`` without ``shard_experts``): ``moe_dispatch``
  lowered the block to ``sort_by_expert -> experts`` (role-tagged nodes). This pass replaces that with one
  ``call_function`` of :func:`ep_block` on this rank's slice of the weights; AOT autograd traces through it
  (``tolist`` becomes unbacked SymInts of Dynamo's ShapeEnv, with ``allow_scalar_outputs`` switched on for
  the trace). The weight gradient is zero outside this rank's experts; an all-reduce over the EP (and DP)
  ranks, as plain data parallelism does (``prmc.distributed.sync_gradients``), gives the global gradient.

Structure check: before the graph is compiled (so before any of its collectives runs), the sequence of
collectives it will issue (op, process group, fixed or data-dependent splits, module path) is hashed and
all-gathered over the world (a gloo group with a timeout, made by ``shard_experts``); any disagreement
raises on every rank with both structures in the message, instead of a hang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node

from prmc.distributed import ep as _ep
from prmc.distributed import shard as _shard

__all__ = ["run", "ep_block", "collective_signature", "check_graph", "is_ep_collective"]

_COLLECTIVE_WORDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce", "broadcast")


def ep_block(x2d, ids, wts, w13, w2, *, rank: int, world: int, group_name: str, num_experts: int,
             activation: str, gated: bool, chunks: int):
    """EP form of a lowered block on replicated weights: slice this rank's experts, run ``ep_moe``."""
    el = num_experts // world
    return _ep.ep_moe(
        x2d, ids, wts, w13[rank * el : (rank + 1) * el], w2[rank * el : (rank + 1) * el],
        group_name=group_name, world=world, num_experts=num_experts, activation=activation, gated=gated,
        chunks=chunks,
    )


def is_ep_collective(node: Node) -> bool:
    """True for a token/count all-to-all node (what a ``shard_experts`` block puts in Dynamo's graph).

    For ``recognise``: a top-k whose downstream experts computation contains such a node is an
    expert-parallel block that ``prmc.distributed`` already lowered; it is not a refusal.
    """
    return node.op == "call_function" and "all_to_all_single" in _target_name(node.target)


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _module_path(n: Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _group_size(name: str):
    """Group names differ between ranks of different EP groups (dp x ep); their sizes do not."""
    try:
        from torch.distributed import distributed_c10d as c10d

        return ("group of", c10d._get_group_size_by_name(name))
    except Exception:
        return ("group", name)


def collective_signature(gm: GraphModule) -> list[tuple]:
    """The collectives ``gm`` issues, in order: (op, group size, splits kind, module path) per node."""
    sig = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is ep_block:
            kw = n.kwargs
            sig.append(("ep_block", _group_size(kw["group_name"]), kw["num_experts"], kw["chunks"], _module_path(n)))
            continue
        name = _target_name(n.target)
        if not any(w in name for w in _COLLECTIVE_WORDS):
            continue
        group = _group_size(next((a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, str)), ""))
        lists = [a for a in n.args if isinstance(a, (list, tuple))]
        kind = "var" if any(isinstance(x, Node) or isinstance(x, torch.SymInt) for l in lists for x in l) else (
            "eq" + str([list(l) for l in lists]))
        sig.append((name, group, kind, _module_path(n)))
    return sig


def check_graph(gm: GraphModule, signature: list | None = None) -> None:
    """All-gather the collective signature of ``gm`` over the world; raise on any mismatch."""
    if not dist.is_available() or not dist.is_initialized():
        return
    sig = collective_signature(gm) if signature is None else signature
    _shard.check_structure(sig, _shard.check_group(), what="collectives of this compiled graph")


def run(gm: GraphModule, config, report=None) -> None:
    mesh = getattr(config, "expert_parallel", None)
    rewritten = _rewrite_lowered_blocks(gm, config, mesh, report) if mesh is not None else 0
    sig = collective_signature(gm)
    if rewritten:
        gm.recompile()
    if sig:
        check_graph(gm, sig)
        if report is not None and hasattr(report, "blocks"):
            known = {b.name: b for b in report.blocks}
            for path in sorted({s[-1] for s in sig if "all_to_all" in s[0]}):
                b = known.get(path.rsplit(".experts", 1)[0])
                if b is not None and "expert parallel" not in " ".join(b.rewrites):
                    b.rewrites.append("expert parallel (sharded experts)")


def _rewrite_lowered_blocks(gm: GraphModule, config, mesh, report) -> int:
    graph = gm.graph
    world = mesh.size()
    rank = mesh.get_local_rank()
    group_name = mesh.get_group().group_name
    blocks: dict[str, dict[str, list[Node]]] = {}
    for n in graph.nodes:
        m = n.meta.get("prmc")
        if m and "block" in m and "role" in m:
            blocks.setdefault(m["block"], {}).setdefault(m["role"], []).append(n)
    done = 0
    for name, roles in blocks.items():
        if "experts_out" not in roles or "experts" not in roles or "dispatch" not in roles:
            continue
        experts_out, experts, dispatch = roles["experts_out"][0], roles["experts"][0], roles["dispatch"][0]
        spec = dispatch.meta["prmc"].get("spec")
        e = int(dispatch.args[1])
        if e % world != 0:
            raise ValueError(
                f"prmc expert parallel: block {name} has {e} experts, which an expert-parallel mesh of size "
                f"{world} does not divide; use a mesh size that divides {e}"
            )
        x2d, _, _, _, _, w13, w2, wts, activation, gated = experts.args  # wts: routing weights in slot order
        ids = dispatch.args[0]
        chunks = int(getattr(config, "overlap_chunks", 1) or 1)
        with graph.inserting_before(experts_out):
            out = graph.call_function(
                ep_block,
                (x2d, ids, wts, w13, w2),
                dict(rank=rank, world=world, group_name=group_name, num_experts=e, activation=activation,
                     gated=gated, chunks=chunks),
            )
        out.meta.update({k: v for k, v in experts_out.meta.items() if k != "prmc"})
        out.meta["prmc"] = {"block": name, "role": "ep", "spec": spec}
        experts_out.replace_all_uses_with(out)
        for n in reversed(list(graph.nodes)):
            m = n.meta.get("prmc")
            if m and m.get("block") == name and not n.users and n is not out and n.op == "call_function":
                graph.erase_node(n)
        done += 1
        if report is not None:
            try:
                report.block(name).rewrites.append(f"expert parallel over {world} ranks, {chunks} chunk(s)")
            except Exception:
                pass
    if done:
        _allow_scalar_outputs(gm)
    return done


def _allow_scalar_outputs(gm: GraphModule) -> None:
    """Let AOT autograd trace ``tolist`` into unbacked SymInts in Dynamo's ShapeEnv."""
    fake_mode = None
    ctx = torch._guards.TracingContext.try_get()
    if ctx is not None:
        fake_mode = ctx.fake_mode
    if fake_mode is None:
        for n in gm.graph.nodes:
            v = n.meta.get("example_value")
            if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
                fake_mode = v.fake_mode
                break
    env = fake_mode.shape_env if fake_mode is not None else None
    if env is not None and not env.allow_scalar_outputs:
        import dataclasses

        env.settings = dataclasses.replace(env.settings, allow_scalar_outputs=True)
