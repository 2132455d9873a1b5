"""moe_dispatch: lower each recognised MoE block into prmc ops (dropless, one device).

Matches: nodes tagged ``meta["prmc"]["role"] == "moe_output"`` by ``recognise`` (their ``MoESpec``).
Produces, right before the block's output and replacing it (routing stays the model's own ops)::

    x2d     = tokens.reshape(-1, H)                                  role "tokens"
    ids     = expert_ids.reshape(-1, K)                              role "expert_ids"
    wts     = weights.reshape(-1)   (dense gate: gather(gate, 1, ids)) role "weights" (slot order)
    sorted  = prmc.sort_by_expert(ids, E)                            role "dispatch"
    ex      = prmc.experts(x2d, sorted[0], sorted[3], K, sorted[2], W13, W2, wts, act, gated)   role "experts"
    out     = ex[0]                                                  role "experts_out"

Every inserted node carries ``meta["prmc"] = {"block": name, "role": ...}`` (the dispatch node also
``"spec"``), which is what the expert-parallel, overlap and recompute passes match on, and, as Dynamo's
own nodes do, ``meta["example_value"]`` (a fake tensor): AOT autograd's cache takes only graphs whose
tensors all have one. The original expert computation is erased where nothing else uses it.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from prmc.passes.recognise import MoESpec, WeightStack


def run(gm: GraphModule, config, report) -> None:
    fake_mode = None
    for node in list(gm.graph.nodes):
        meta = node.meta.get("prmc")
        if meta and meta.get("role") == "moe_output":
            spec: MoESpec = meta["spec"]
            _lower(gm, spec)
            fake_mode = spec.tokens.meta["example_value"].fake_mode
            block = report.block(spec.name)
            block.rewritten = True
            block.reason = ""
            block.rewrites.append("sort_by_expert -> experts")
    if fake_mode is not None:
        _add_example_values(gm.graph, fake_mode)


def _weight(graph, stack: WeightStack, tag) -> Node:
    w = stack.nodes[0] if not stack.per_expert else tag(graph.call_function(torch.stack, (list(stack.nodes),)), "weight")
    return tag(graph.call_method("transpose", (w, 1, 2)), "weight") if stack.transposed else w


def _lower(gm: GraphModule, spec: MoESpec) -> None:
    graph = gm.graph
    y = spec.output

    def tag(node: Node, role: str) -> Node:
        node.meta["prmc"] = {"block": spec.name, "role": role}
        return node

    with graph.inserting_before(y):
        w13 = [_weight(graph, s, tag) for s in spec.gate_up]
        w13 = w13[0] if len(w13) == 1 else tag(graph.call_function(torch.cat, (w13,), {"dim": 1}), "weight")
        w2 = _weight(graph, spec.down, tag)
        x2d = tag(graph.call_method("reshape", (spec.tokens, -1, spec.hidden)), "tokens")
        x_dtype, w_dtype = spec.tokens.meta["example_value"].dtype, _dtype(spec.gate_up[0].nodes[0])
        if x_dtype != w_dtype:
            x2d = tag(graph.call_method("to", (x2d, w_dtype)), "tokens")
        ids = tag(graph.call_method("reshape", (spec.expert_ids, -1, spec.top_k)), "expert_ids")
        if spec.dense_gate:
            gate = graph.call_method("reshape", (spec.weights, -1, spec.num_experts))
            wts = tag(graph.call_function(torch.gather, (gate, 1, ids)), "weights")
            wts = tag(graph.call_method("reshape", (wts, -1)), "weights")
        else:
            wts = tag(graph.call_method("reshape", (spec.weights, -1)), "weights")
        dispatch = tag(graph.call_function(torch.ops.prmc.sort_by_expert.default, (ids, spec.num_experts)), "dispatch")
        dispatch.meta["prmc"]["spec"] = spec
        order = tag(graph.call_function(operator.getitem, (dispatch, 0)), "order")
        offsets = tag(graph.call_function(operator.getitem, (dispatch, 2)), "offsets")
        inverse = tag(graph.call_function(operator.getitem, (dispatch, 3)), "inverse")
        experts = tag(
            graph.call_function(
                torch.ops.prmc.experts.default,
                (x2d, order, inverse, spec.top_k, offsets, w13, w2, wts, spec.activation, spec.gated),
            ),
            "experts",
        )
        out = tag(graph.call_function(operator.getitem, (experts, 0)), "experts_out")
        y_value = y.meta["example_value"]
        if y_value.dtype != w_dtype:
            out = tag(graph.call_method("to", (out, y_value.dtype)), "output")
        if y_value.dim() != 2:
            out = tag(graph.call_method("reshape", (out, _output_shape(graph, spec))), "output")
    y.replace_all_uses_with(out)
    out.meta["prmc"]["spec"] = spec
    _erase_unused(graph, [*spec.region, y])


def _add_example_values(graph, fake_mode) -> None:
    """Run the inserted nodes (those without an ``example_value``) on their inputs' fake values."""
    with fake_mode:
        for n in graph.nodes:
            if n.op not in ("call_function", "call_method") or "example_value" in n.meta:
                continue
            args, kwargs = map_arg((n.args, n.kwargs), lambda a: a.meta["example_value"])
            if n.op == "call_function":
                n.meta["example_value"] = n.target(*args, **kwargs)
            else:
                n.meta["example_value"] = getattr(args[0], n.target)(*args[1:], **kwargs)


def _dtype(n: Node) -> torch.dtype:
    return n.meta["example_value"].dtype


def _output_shape(graph, spec: MoESpec):
    """The block output's shape: static sizes, or (dynamic) the block input's sizes, which recognise
    checked are the same."""
    shape = spec.output.meta["example_value"].shape
    if all(isinstance(d, int) for d in shape):
        return tuple(shape)
    return graph.call_method("size", (spec.token_source,))


def _erase_unused(graph, region: list[Node]) -> None:
    """Erase the old expert computation where nothing else uses it, with the runtime size checks
    Dynamo attached to its data-dependent sizes (``torch.where`` per expert, ``.tolist()``)."""
    region = set(region)
    dead, todo = set(region), list(region)
    while todo:
        for user in todo.pop().users:
            if user not in dead and (_is_size_bookkeeping(user) or user.target is operator.getitem):
                dead.add(user)
                todo.append(user)
    position = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(dead, key=position.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


_SIZE_CHECKS = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_size.int, torch._check, torch._check_is_size}


def _is_size_bookkeeping(n: Node) -> bool:
    value = n.meta.get("example_value", n.meta.get("val"))
    return n.target in _SIZE_CHECKS or isinstance(value, (torch.SymInt, torch.SymBool))
