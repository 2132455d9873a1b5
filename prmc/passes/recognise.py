"""recognise: find the MoE blocks of a Dynamo graph and describe each as an :class:`MoESpec`.

Matches on what the graph computes, not on module or class names:

1. A *routing top-k* is a ``topk`` whose indices reach no later ``topk`` (so the group-limited
   top-k of DeepSeek-V3 counts once, by its final selection). Its scores must come from a router
   projection: a matmul of the block's tokens ``x`` [T, H] with a parameter of E rows.
2. The *expert computation* is the part of the graph between the routing and a value ``Y`` of the
   tokens' shape: every ancestor of ``Y``, walking back, must stop at the tokens (or views and casts
   of them), at the top-k indices, at one routing-weight tensor ([T, K] derived from the top-k, or a
   dense [T, E] gate matrix) or at parameters. Candidates for ``Y`` are tried from the latest node
   back, so a shared expert added to the routed sum is kept outside the block.
3. The expert parameters (stacked [E, ., .] tensors, or E per-expert matrices grouped by name) are
   read as gate/up and down projections in every layout their shapes allow.
4. Proof: the original expert computation and the prmc lowering are both run, on the graph's own
   shapes and parameters, with random tokens, random routing (one probe leaves experts empty) and
   random weights; an interpretation is accepted only if they agree to the dtype's tolerance.
   Nothing is rewritten on a guess: a block no interpretation reproduces is reported with the reason.

Produces ``Y.meta["prmc"] = {"block": name, "role": "moe_output", "spec": MoESpec}`` and one entry
per routing top-k in the report. The graph itself is not changed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from prmc.kernels.reference import ACTIVATIONS
from prmc.passes.expert_parallel import is_ep_collective
from prmc.report import log

# Single-input ops through which the tokens reach the router unchanged in value.
_VIEW_METHODS = {"view", "reshape", "to", "float", "type", "contiguous", "flatten", "bfloat16", "half", "detach"}
_ACT_TARGETS: dict[Any, str] = {
    F.silu: "silu",
    torch.nn.functional.silu: "silu",
    F.gelu: "gelu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.sigmoid: "silu",
    torch.tanh: "gelu_tanh",
}
_ACT_METHODS = {"silu": "silu", "relu": "relu", "sigmoid": "silu", "tanh": "gelu_tanh"}
# A module index in a parameter's path: "._modules['3']." or ".3." (digits that are a whole component).
_INDEX = re.compile(r"(?<=\[')\d+(?='\])|(?<=\.)\d+(?=\.|$)")
_MATMULS = (F.linear, torch.matmul, operator.matmul, torch.mm, "matmul", "mm")
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclasses.dataclass(frozen=True)
class WeightStack:
    """One [E, out, in] expert weight as the graph holds it.

    ``nodes`` is either one stacked parameter of leading dimension E, or E per-expert matrices in
    expert order. ``transposed`` means the stored layout is [.., in, out] (x @ W) rather than
    nn.Linear's [.., out, in].
    """

    nodes: tuple[Node, ...]
    transposed: bool

    @property
    def per_expert(self) -> bool:
        return len(self.nodes) > 1


@dataclasses.dataclass
class MoESpec:
    """What one MoE block computes: ``Y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])``.

    ``expert_e(x) = down_e @ act(gate_e @ x) * (up_e @ x)`` when ``gated``, else ``down_e @ act(up_e @ x)``.
    Routing (scores, top-k, normalisation, scaling, group limits) stays the model's own ops: the spec
    points at its results.
    """

    name: str  # module path of the block, for reports
    form: str  # how the model spelled the experts (grouped_mm, per-expert loop, dense, ...)
    tokens: Node  # [..., H] tokens entering the experts
    token_source: Node  # the block input the tokens are a view of (same shape as ``output`` if not 2-D)
    expert_ids: Node  # [T, K] top-k expert indices
    weights: Node  # [T, K] routing weights, or [T, E] dense gate matrix
    dense_gate: bool
    output: Node  # the node whose value the experts produce
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    activation: str
    gated: bool
    gate_up: tuple[WeightStack, ...]  # concatenated along the output rows, gate first
    down: WeightStack
    routing: str
    shared_expert: Node | None  # the value added to the routed output outside the block, if any
    region: tuple[Node, ...]  # the original expert computation (graph order)


class NotMoE(Exception):
    """A top-k that is not (provably) an MoE block; the message says why and what to do."""


def run(gm: GraphModule, config, report) -> None:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    routing = _routing_topks(nodes, report)
    boundaries = [order[k] for k in routing] + [len(nodes)]
    for i, topk in enumerate(routing):
        name = _module_path(topk) or f"top-k {topk.name}"
        window = nodes[order[topk] : boundaries[i + 1]]
        if any(is_ep_collective(n) for n in window):
            block = report.block(name)
            block.rewritten, block.form = True, "expert parallel (sharded experts)"
            block.rewrites.append("prmc.distributed all-to-all dispatch -> experts -> combine")
            continue
        try:
            spec = _recognise_block(gm, topk, order, window)
        except NotMoE as why:
            report.block(name).reason = str(why)
            continue
        except Exception as error:  # never fail the user's compile over a block prmc cannot analyse
            log.warning("prmc: could not analyse the block at %s", name, exc_info=True)
            report.block(name).reason = f"prmc could not analyse it ({type(error).__name__}: {error}); please report this"
            continue
        block = report.block(spec.name)
        block.form, block.num_experts, block.top_k = spec.form, spec.num_experts, spec.top_k
        block.hidden, block.intermediate, block.routing = spec.hidden, spec.intermediate, spec.routing
        block.activation = f"{spec.activation}{' (gated)' if spec.gated else ''}"
        block.shared_expert = spec.shared_expert is not None
        block.reason = "recognised; the moe_dispatch pass is not enabled"
        spec.output.meta["prmc"] = {"block": spec.name, "role": "moe_output", "spec": spec}


# --------------------------------------------------------------------------------------------- graph


def _routing_topks(nodes: list[Node], report) -> list[Node]:
    """The final top-k of each router: of the top-ks fed by one router projection (a group-limited
    router has several), the one whose indices reach no other."""
    by_router: dict[Node, list[Node]] = {}
    unrouted = []
    for k in (n for n in nodes if _is_topk(n)):
        try:
            by_router.setdefault(_router_projection(k)[0], []).append(k)
        except NotMoE as why:
            unrouted.append((k, why))
    routing = []
    for ks in by_router.values():
        for k in ks:
            after = _descendants(k)
            if not any(o is not k and o in after for o in ks):
                routing.append(k)
    for k, why in unrouted:
        # A top-k over group scores (DeepSeek-V3) sits between a router projection and its final top-k.
        after, before = _descendants(k), _ancestors_until(k, None)
        if not any(proj in before and any(r in after for r in ks) for proj, ks in by_router.items()):
            report.block(_module_path(k) or f"top-k {k.name}").reason = str(why)
    position = {n: i for i, n in enumerate(nodes)}
    return sorted(routing, key=position.__getitem__)


def _is_topk(n: Node) -> bool:
    return (n.op == "call_function" and n.target is torch.topk) or (n.op == "call_method" and n.target == "topk")


def _module_path(n: Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", path).replace("._modules['", ".").replace("']", "")


def _descendants(n: Node) -> set[Node]:
    """Nodes that depend on ``n``, counting a read of a tensor after an in-place op on it (e.g.
    ``mask.scatter_(1, idx, 1)`` then ``mask.bool()``) as depending on that op."""
    position = {m: i for i, m in enumerate(n.graph.nodes)}
    seen, todo = set(), [n]
    while todo:
        m = todo.pop()
        users = list(m.users)
        if _is_inplace(m) and m.args and isinstance(m.args[0], Node):
            users += [u for u in m.args[0].users if position[u] > position[m]]
        for u in users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _value(n: Node) -> Any:
    return n.meta.get("example_value")


def _is_size(n: Node) -> bool:
    """A symbolic size of the graph's inputs (dynamic shapes): the probe feeds its trace-time value.
    Data-dependent sizes (``.tolist()``, ``nonzero``) have none and are computed inside the block."""
    value = _value(n)
    return isinstance(value, torch.SymInt) and value.node.hint is not None


def _is_float_tensor(n: Node) -> bool:
    v = _value(n)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _hint(d) -> int:
    """A concrete size for a possibly symbolic dimension (its trace-time value); -1 for a
    data-dependent size, which matches no shape prmc looks for."""
    if isinstance(d, torch.SymInt):
        if d.node.hint is not None:
            return int(d.node.hint)
        return -1
    return int(d)


def _shape(n: Node) -> tuple[int, ...]:
    return tuple(_hint(d) for d in _value(n).shape)


def _topk_outputs(topk: Node) -> tuple[Node | None, Node | None]:
    values = indices = None
    for u in topk.users:
        if u.op == "call_function" and u.target is operator.getitem:
            values, indices = (u, indices) if u.args[1] == 0 else (values, u)
        elif u.op == "call_function" and u.target is getattr:
            values, indices = (u, indices) if u.args[1] == "values" else (values, u)
    return values, indices


def _param_value(gm: GraphModule, n: Node) -> torch.Tensor | None:
    """The real parameter behind a placeholder or get_attr, or None if ``n`` is no parameter."""
    if n.op == "placeholder":
        arg = n.meta.get("grapharg")
        example = getattr(arg, "example", None) if arg is not None else None
        return example if isinstance(example, torch.nn.Parameter) else None
    if n.op == "get_attr":
        value = gm
        for part in n.target.split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.nn.Parameter) else None
    return None


def _param_name(n: Node) -> str:
    arg = n.meta.get("grapharg")
    return arg.source.name if arg is not None else str(n.target)


def _is_inplace(n: Node) -> bool:
    if n.op == "call_method":
        return n.target.endswith("_") and not n.target.endswith("__")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return n.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
    return False


# ----------------------------------------------------------------------------------------- matching


def _router_projection(topk: Node) -> tuple[Node, Node]:
    """The matmul of tokens with an [E, H] parameter whose scores this top-k selects from, and the tokens."""
    num_experts = _shape(topk.args[0])[-1]
    seen, todo = set(), [topk]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a.op in ("call_function", "call_method") and a.target in _MATMULS:
                x, w = a.args[0], a.args[1]
                wv = _value(w) if isinstance(w, Node) else None
                if isinstance(x, Node) and isinstance(wv, torch.Tensor) and wv.dim() == 2 and num_experts in _shape(w):
                    return a, x
            todo.append(a)
    raise NotMoE(
        "no router projection (a matmul of the tokens with an [E, H] parameter) feeds this top-k: "
        "prmc only rewrites token-choice routers"
    )


def _router_tokens(topk: Node) -> tuple[Node, list[Node]]:
    """The tokens the router projects, and the chain of views/casts of them back to their source."""
    x = _router_projection(topk)[1]
    chain = [x]
    while chain[-1].op == "call_method" and chain[-1].target in _VIEW_METHODS:
        chain.append(chain[-1].args[0])
    return x, chain


def _closure(
    y: Node, stops: set[Node], lo: int, order: dict[Node, int], gm: GraphModule, forbidden: set[Node] = frozenset()
) -> tuple[list[Node], set[Node]] | None:
    """Nodes computing ``y`` from ``stops`` and parameters (with in-place ops on them), and the leaves
    reached; None if ``y`` needs anything else: a node before index ``lo`` or in ``forbidden``."""
    region: set[Node] = set()
    leaves: set[Node] = set()
    todo = [y]
    while todo:
        n = todo.pop()
        if n in region or n in leaves:
            continue
        if n in stops or _param_value(gm, n) is not None or _is_size(n):
            leaves.add(n)
            continue
        if n.op in ("placeholder", "get_attr", "output") or order[n] < lo or n in forbidden:
            return None
        region.add(n)
        todo.extend(n.all_input_nodes)
        todo.extend(u for u in n.users if _is_inplace(u) and u.args and u.args[0] is n and order[u] < order[y])
    return sorted(region, key=order.__getitem__), leaves


def _index_derived(n: Node, ids: Node, order: dict[Node, int], gm: GraphModule) -> bool:
    """``n`` is computed from the top-k indices alone (an expert mask, say), not from routing scores."""
    closed = _closure(n, {ids}, order[ids], order, gm)
    return closed is not None and not any(_param_value(gm, leaf) is not None for leaf in closed[1])


def _activation_candidates(region: list[Node]) -> list[str]:
    found = []
    for n in region:
        act = None
        if n.op == "call_function" and n.target in _ACT_TARGETS:
            act = _ACT_TARGETS[n.target]
            if act == "gelu" and n.kwargs.get("approximate", "none") == "tanh":
                act = "gelu_tanh"
        elif n.op == "call_method" and n.target in _ACT_METHODS:
            act = _ACT_METHODS[n.target]
        if act and act not in found:
            found.append(act)
    return found + [a for a in ACTIVATIONS if a not in found]


def _stacks_by_role(gm: GraphModule, params: list[Node], num_experts: int) -> list[list[Node]] | None:
    """Per-expert 2-D parameters grouped by role (same name but for numbers), each in expert order."""
    roles: dict[str, list[Node]] = {}
    for p in params:
        roles.setdefault(_INDEX.sub("#", _param_name(p)), []).append(p)
    if any(len(v) != num_experts for v in roles.values()):
        return None
    key = lambda p: tuple(int(d) for d in _INDEX.findall(_param_name(p)))  # noqa: E731
    return [sorted(v, key=key) for v in roles.values()]


def _weight_interpretations(gm: GraphModule, params: list[Node], num_experts: int, hidden: int):
    """Every (gate_up stacks, down stack, gated, intermediate) the parameter shapes allow."""
    shapes = {p: _shape(p) for p in params}
    if any(len(s) not in (2, 3) for s in shapes.values()):
        raise NotMoE("the experts use parameters that are neither matrices nor stacked matrices (biases are not supported yet)")
    if all(len(s) == 3 and s[0] == num_experts for s in shapes.values()):
        stacks = [[p] for p in params]
        mats = {p: s[1:] for p, s in shapes.items()}
    elif all(len(s) == 2 for s in shapes.values()):
        stacks = _stacks_by_role(gm, params, num_experts)
        if stacks is None:
            raise NotMoE(f"{len(params)} expert matrices cannot be grouped into {num_experts} experts by name")
        mats = {p: shapes[p] for p in params}
    else:
        raise NotMoE("the experts mix stacked and per-expert parameters")

    def oriented(stack, transposed):  # -> (out, in) of the projection, or None
        out, inp = mats[stack[0]] if not transposed else mats[stack[0]][::-1]
        return out, inp

    result = []
    for perm in itertools.permutations(stacks):
        for flags in itertools.product((False, True), repeat=len(perm)):
            dims = [oriented(s, t) for s, t in zip(perm, flags)]
            ws = [WeightStack(tuple(s), t) for s, t in zip(perm, flags)]
            down_out, inter = dims[-1]
            if down_out != hidden:
                continue
            if len(perm) == 2:
                f, h = dims[0]
                if h != hidden:
                    continue
                if f == 2 * inter:
                    result.append(((ws[0],), ws[1], True, inter))
                if f == inter:
                    result.append(((ws[0],), ws[1], False, inter))
            elif len(perm) == 3:
                (g, hg), (u, hu) = dims[0], dims[1]
                if hg == hu == hidden and g == u == inter:
                    result.append(((ws[0], ws[1]), ws[2], True, inter))
    if not result:
        raise NotMoE(f"expert parameter shapes {sorted(set(shapes.values()))} do not form gate/up and down projections of hidden size {hidden}")
    return result


def _routing_kind(topk: Node, router_out: Node, weights: Node) -> str:
    ops = set()
    for n in _ancestors_until(topk, router_out) | _ancestors_until(weights, router_out):
        t = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
        ops.add(t)
    kind = "sigmoid" if "sigmoid" in ops else "softmax" if "softmax" in ops else "scores"
    parts = [f"{kind} top-k"]
    if "topk" in {getattr(n.target, "__name__", n.target) for n in _ancestors_until(topk, router_out) if n is not topk}:
        parts.append("group-limited")
    if ops & {"truediv", "itruediv", "div", "div_"}:
        parts.append("normalised")
    return ", ".join(parts)


def _ancestors_until(n: Node, stop: Node | None) -> set[Node]:
    seen, todo = set(), [n]
    while todo:
        m = todo.pop()
        if m in seen or m is stop:
            continue
        seen.add(m)
        todo.extend(m.all_input_nodes)
    return seen


def _form(gm: GraphModule, region: list[Node], dense: bool) -> str:
    names = set()
    for n in region:
        names.add(n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target)))
    if dense:
        form = "dense gate-weighted sum over all experts"
    elif "grouped_mm" in names or "_grouped_mm" in names:
        form = "grouped_mm experts"
    elif any("grouped_mm_fallback" in str(n.target) for n in region):
        form = "grouped_mm experts (transformers fallback op)"
    elif "bmm" in names:
        form = "batched_mm experts"
    else:
        form = "per-expert loop"
    if any("eager_experts_forward" in (n.meta.get("stack_trace") or "") for n in region):
        # prmc.capture had Dynamo trace transformers' grouped_mm experts for the eager loop.
        form += " (model's experts_implementation='eager', traced as grouped_mm: prmc.capture)"
    return form


def _recognise_block(gm: GraphModule, topk: Node, order: dict[Node, int], window: list[Node]) -> MoESpec:
    values, ids = _topk_outputs(topk)
    if ids is None:
        raise NotMoE("the top-k indices are never used")
    t_k = _shape(ids)
    top_k, num_tokens = t_k[-1], 1
    for d in t_k[:-1]:
        num_tokens *= d
    num_experts = _shape(topk.args[0])[-1]
    router_x, x_chain = _router_tokens(topk)
    hidden = _shape(router_x)[-1]
    lo = min(order[n] for n in x_chain)
    after = _descendants(topk)
    window_set = set(window)
    weight_inputs = {
        n
        for n in after & window_set
        if _is_float_tensor(n)
        and _shape(n)[-1:] in ((top_k,), (num_experts,))
        and _numel(n) in (num_tokens * top_k, num_tokens * num_experts)
        and not _index_derived(n, ids, order, gm)
    }
    stops = set(x_chain) | weight_inputs | {ids}
    candidates = [
        n for n in reversed(window) if n in after and n not in weight_inputs and _is_float_tensor(n) and _shape(n)[-1:] == (hidden,) and _numel(n) == num_tokens * hidden
    ]
    # Why each closed candidate failed, latest (most likely the block's real output) first.
    reasons = []
    router_side = _ancestors_until(topk, None)
    for y in candidates:
        closed = _closure(y, stops, lo, order, gm, router_side)
        if closed is None:
            continue
        region, leaves = closed
        w_leaves = leaves & weight_inputs
        x_leaves = leaves & set(x_chain)
        if len(w_leaves) != 1 or not x_leaves:
            reasons.append("the expert computation does not use exactly one routing-weight tensor and the tokens")
            continue
        (weights,) = w_leaves
        dense = _shape(weights)[-1] == num_experts and num_experts != top_k
        if dense and not _is_topk_scatter(weights, ids):
            reasons.append("the [T, E] gate matrix is not a scatter of top-k weights into zeros, so it may not be top-k sparse")
            continue
        if not dense and ids not in leaves:
            reasons.append("the expert computation does not use the top-k indices")
            continue
        params = [n for n in leaves if _param_value(gm, n) is not None]
        if not params:
            continue
        try:
            interpretations = _weight_interpretations(gm, sorted(params, key=order.__getitem__), num_experts, hidden)
        except NotMoE as e:
            reasons.append(str(e))
            continue
        x = max(x_leaves, key=order.__getitem__)
        if not _static_or_same_shape(y, x_chain[-1]):
            reasons.append("the block's output has a dynamic shape other than its input's")
            continue
        probe = _Probe(gm, region, x_chain, x, ids, weights, dense, y, num_experts)
        for (gate_up, down, gated, inter), act in itertools.product(interpretations, _activation_candidates(region)):
            lowered = functools.partial(
                _lowered, gate_up=gate_up, down=down, gated=gated, activation=act, num_experts=num_experts, dense=dense
            )
            if probe.matches(lowered):
                name = _block_name(topk, y)
                return MoESpec(
                    name=name,
                    form=_form(gm, region, dense),
                    tokens=x,
                    token_source=x_chain[-1],
                    expert_ids=ids,
                    weights=weights,
                    dense_gate=dense,
                    output=y,
                    num_experts=num_experts,
                    top_k=top_k,
                    hidden=hidden,
                    intermediate=inter,
                    activation=act,
                    gated=gated,
                    gate_up=gate_up,
                    down=down,
                    routing=_routing_kind(topk, router_x, weights),
                    shared_expert=_shared_expert(gm, y, set(x_chain), lo, order),
                    region=tuple(region),
                )
        reasons.append(
            "the expert computation matches no gate/up/down reading of its parameters with a "
            f"{'/'.join(ACTIVATIONS)} activation on random probes (custom gating, biases or clamping are not supported yet)"
        )
    if not reasons:
        reasons.append(
            "no value of the tokens' shape is computed from this routing by MLP experts (attention experts, "
            "as in JetMoE's MoA, are not rewritten)"
        )
    raise NotMoE(reasons[0] + "; if a graph break splits the block, see the graph breaks below")


_ZEROS = (torch.zeros, torch.zeros_like, "new_zeros", "zero_")


def _is_topk_scatter(gate: Node, ids: Node) -> bool:
    """``gate`` is (a view or cast of) ``zeros.scatter(-1, ids, values)``: non-zero only at the top-k."""
    n = gate
    while n.op == "call_method" and n.target in _VIEW_METHODS:
        n = n.args[0]
    if n.target not in (torch.scatter, "scatter", "scatter_"):
        return False
    base, dim, index = n.args[:3]
    return (
        isinstance(base, Node)
        and base.target in _ZEROS
        and dim in (1, -1)
        and index is ids
    )


def _static_or_same_shape(y: Node, source: Node) -> bool:
    shape = _value(y).shape
    if all(isinstance(d, int) for d in shape) or len(shape) == 2:
        return True
    return [str(d) for d in shape] == [str(d) for d in _value(source).shape]


def _numel(n: Node) -> int:
    out = 1
    for d in _shape(n):
        out *= d
    return out


def _block_name(topk: Node, y: Node) -> str:
    """The deepest module holding both the router's top-k and the experts' output."""
    prefix = []
    for p, q in zip(_module_path(topk).split("."), _module_path(y).split(".")):
        if p != q:
            break
        prefix.append(p)
    return ".".join(prefix) or y.name


def _shared_expert(gm: GraphModule, y: Node, x_chain: set[Node], lo: int, order: dict[Node, int]) -> Node | None:
    """The other operand of an add that combines the routed output with a value of the tokens alone."""
    for u in y.users:
        if u.op == "call_function" and u.target in (operator.add, torch.add, operator.iadd):
            for other in u.all_input_nodes:
                if other is not y and _closure(other, x_chain, lo, order, gm) is not None:
                    return other
    return None


# ------------------------------------------------------------------------------------------- proof


def _lowered(x, ids, weights, params, gate_up, down, gated, activation, num_experts, dense):
    """The prmc lowering of a spec, run eagerly on real tensors (what moe_dispatch inserts)."""
    x2d = x.reshape(-1, x.shape[-1])
    ids2d = ids.reshape(-1, ids.shape[-1])
    w = torch.gather(weights.reshape(ids2d.shape[0], -1), 1, ids2d) if dense else weights
    w13 = torch.cat([stack_weight([params[n] for n in s.nodes], s.transposed) for s in gate_up], dim=1)
    w2 = stack_weight([params[n] for n in down.nodes], down.transposed)
    out = moe_experts(x2d.to(w13.dtype), ids2d, w.reshape(-1), w13, w2, activation, gated, num_experts)
    return out


def stack_weight(parts: list, transposed: bool):
    """[E, out, in] from one stacked parameter or E per-expert matrices (tensors or, in graphs, nodes)."""
    w = parts[0] if len(parts) == 1 else torch.stack(parts)
    return w.transpose(1, 2) if transposed else w


def moe_experts(x2d, ids2d, w_flat, w13, w2, activation: str, gated: bool, num_experts: int):
    """Routed experts on one device, in prmc ops: [T, H] -> [T, H] (in x2d's dtype)."""
    top_k = ids2d.shape[1]
    order, _counts, offsets, inverse = torch.ops.prmc.sort_by_expert(ids2d, num_experts)
    return torch.ops.prmc.experts(x2d, order, inverse, top_k, offsets, w13, w2, w_flat, activation, gated)[0]


class _Probe:
    """Runs the original expert computation and a candidate lowering on the same random inputs."""

    def __init__(self, gm, region, x_chain, x, ids, weights, dense, y, num_experts):
        self.gm, self.ids, self.weights, self.dense, self.num_experts = gm, ids, weights, dense, num_experts
        self.root = x_chain[-1]
        # The probe graph takes (tokens source, ids, weights, *params) and returns (x, y).
        graph = Graph()
        env: dict[Node, Node] = {}
        env[self.root] = graph.placeholder("tokens")
        env[ids] = graph.placeholder("ids")
        env[weights] = graph.placeholder("weights")
        self.params = [n for n in _leaf_params(gm, region)]
        for p in self.params:
            env[p] = graph.placeholder(p.name)
        self.sizes = sorted({a for n in region for a in n.all_input_nodes if _is_size(a)}, key=lambda n: n.name)
        for s in self.sizes:
            env[s] = graph.placeholder(s.name)
        chain = list(reversed(x_chain[:-1]))
        for n in chain + [n for n in region if n not in env]:
            if n not in env:
                env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output((env[x], env[y]))
        self.module = GraphModule(gm, graph)
        self.tolerance = 3e-2 if _value(y).dtype in (torch.bfloat16, torch.float16) else 1e-3
        self.results: list[tuple] | None = None

    def _inputs(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        params = {p: _param_value(self.gm, p) for p in self.params}
        device = next(iter(params.values())).device
        root_v = _value(self.root)
        tokens = torch.randn(tuple(_hint(d) for d in root_v.shape), generator=gen).to(device, root_v.dtype)
        ids_shape = tuple(_hint(d) for d in _value(self.ids).shape)
        top_k = ids_shape[-1]
        # Probe 0 leaves the last expert empty (where top-k allows), probe 1 routes uniformly.
        pool = self.num_experts - 1 if seed == 0 and self.num_experts - 1 >= top_k else self.num_experts
        rows = int(torch.tensor(ids_shape[:-1]).prod())
        ids = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(rows)]).reshape(ids_shape)
        ids = ids.to(device, _value(self.ids).dtype)
        wv = _value(self.weights)
        w_topk = (torch.rand(ids_shape, generator=gen) + 0.1).to(device, wv.dtype)
        if self.dense:
            gates = torch.zeros(rows, self.num_experts, device=device, dtype=wv.dtype)
            weights = gates.scatter(1, ids.reshape(rows, top_k).long(), w_topk.reshape(rows, top_k))
            weights = weights.reshape(tuple(_hint(d) for d in wv.shape))
        else:
            weights = w_topk.reshape(tuple(_hint(d) for d in wv.shape))
        return tokens, ids, weights, params

    def matches(self, lowered: Callable) -> bool:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.no_grad():
            if self.results is None:
                self.results = []
                for seed in (0, 1):
                    tokens, ids, weights, params = self._inputs(seed)
                    sizes = [_hint(_value(s)) for s in self.sizes]
                    x, y = self.module(tokens, ids.clone(), weights.clone(), *params.values(), *sizes)
                    self.results.append((x, ids, weights, params, y))
            for x, ids, weights, params, y in self.results:
                try:
                    got = lowered(x, ids, weights, params)
                except (RuntimeError, ValueError, IndexError):
                    return False
                ref = y.float().reshape(-1)
                err = (got.float().reshape(-1) - ref).norm() / ref.norm().clamp_min(1e-30)
                if got.numel() != y.numel() or not torch.isfinite(err) or err > self.tolerance:
                    return False
        return True


def _leaf_params(gm: GraphModule, region: list[Node]) -> list[Node]:
    seen: list[Node] = []
    for n in region:
        for a in n.all_input_nodes:
            if a not in seen and _param_value(gm, a) is not None:
                seen.append(a)
    return seen
