"""overlap: a communication/compute overlap schedule for the expert-parallel all-to-alls.

Two halves:

* **Chunking** (tokens of a block split in N chunks, chunk i+1's all-to-all issued before chunk i's expert
  GEMMs) is done by the EP code itself (:func:`prmc.distributed.ep.ep_finish`), with N read when the block
  is traced: ``options["overlap"]["chunks"]`` of the prmc compile that traces it (see
  :func:`prmc.distributed.shard.current_overlap_chunks`), else the ``overlap_chunks`` given to
  ``shard_experts``. :func:`run` (the Dynamo-level pass) records what it finds in the report.
* **Placement** of issues and waits in the *compiled* forward and backward graphs: traced functional
  collectives are an ``all_to_all_single`` immediately followed by its ``wait_tensor``; nothing can overlap.
  :class:`OverlapSchedule` is an Inductor post-grad pass (``post_grad_custom_post_pass``, so it runs on the
  forward and on the backward graph after AOT autograd's partition, before Inductor's scheduler) that, for
  every all-to-all of a prmc EP block (or every all-to-all, see ``only_prmc``):

  1. moves the issue right after the last node it depends on;
  2. moves the compute that precedes the issue but does not feed it (a shared expert, the other chunk's
     expert GEMMs, ...) to right after the issue, so it runs while the all-to-all is in flight;
  3. moves the wait down to right before the first node that reads the result, and the compute after it
     that does not read it (up to the next collective) above it (e.g. the shared expert's backward).

  Collectives keep their relative order (no hang), mutations, asserts, scalar reads and other collectives
  are never moved, and the result stays a topological order, which Inductor's ``stable_topological_sort``
  keeps. Each moved wait is also tied (``control_deps``, Inductor's own ordering HOP) to the compute placed
  before it. Inductor's ``reorder_for_peak_memory`` would still delay each *issue* to just before its
  wait, so :func:`inductor_config_patches` turns it off; with that the generated code follows the graph
  (``reorder_for_compute_comm_overlap`` is not needed; tests/test_overlap_schedule.py checks the code).

Wiring: the backend passes ``config_patches=overlap.inductor_config_patches(config)`` to ``compile_fx``.
"""

from __future__ import annotations

import hashlib

import torch
from torch.fx import Graph, Node
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.fx_passes.control_dependencies import preserve_node_ordering
from torch.utils._ordered_set import OrderedSet

__all__ = ["run", "OverlapSchedule", "schedule", "inductor_config_patches"]

_c10d = torch.ops._c10d_functional
_A2A = (_c10d.all_to_all_single.default,)
_WAIT = _c10d.wait_tensor.default


def run(gm: torch.fx.GraphModule, config, report=None) -> None:
    """Dynamo-level half: count the EP all-to-alls of this graph and note the chunking in the report."""
    n = sum(1 for node in gm.graph.nodes if _is_a2a_target(node.target))
    if n and report is not None and hasattr(report, "notes"):
        report.notes.append(f"overlap: {n} all-to-all(s), chunks={getattr(config, 'overlap_chunks', 1)}")


def _is_a2a_target(t) -> bool:
    name = getattr(t, "__name__", "") or str(t)
    return "all_to_all_single" in name or t in _A2A


def inductor_config_patches(config=None) -> dict:
    """What the backend merges into ``compile_fx``'s ``config_patches`` (empty if overlap is off)."""
    if config is not None and getattr(config, "overlap_chunks", 1) < 1:
        return {}
    # Inductor's peak-memory reordering (a greedy topological sort) delays each issue to just before its
    # wait, undoing the overlap; with it off the scheduler follows the graph's order (checked by
    # tests/test_overlap_schedule.py on the generated code).
    return {"post_grad_custom_post_pass": OverlapSchedule(), "reorder_for_peak_memory": False}


class OverlapSchedule(CustomGraphPass):
    """Inductor post-grad pass placing each all-to-all's issue early and its wait late (see module doc)."""

    def __init__(self, only_prmc: bool = False):
        self.only_prmc = only_prmc

    def __call__(self, graph: Graph) -> None:
        schedule(graph)

    def uuid(self) -> bytes:
        with open(__file__, "rb") as f:
            return hashlib.sha256(f.read() + bytes([self.only_prmc])).digest()


def _is_pinned(n: Node) -> bool:
    """Nodes that keep their place: graph boundary, side effects, collectives, scalar syncs, mutations."""
    if n.op in ("placeholder", "output", "get_attr"):
        return True
    if n.op != "call_function":
        return True
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        if t.namespace in ("_c10d_functional", "_c10d_functional_autograd", "c10d", "_dtensor"):
            return True
        if t in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten._assert_scalar.default):
            return True
        if t._schema.is_mutable:
            return True
    elif isinstance(t, torch._ops.HigherOrderOperator):
        return True
    return n.is_impure() if hasattr(n, "is_impure") else False


def _ancestors(n: Node, within: set) -> set:
    seen, stack = set(), [n]
    while stack:
        m = stack.pop()
        for a in m.all_input_nodes:
            if a in within and a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def schedule(graph: Graph) -> dict:
    """Reorder ``graph`` in place (see module doc). Returns counts of what moved (for tests and logs)."""
    stats = {"a2a": 0, "moved_compute": 0, "sunk_waits": 0, "hoisted_compute": 0}
    a2as = [n for n in graph.nodes if n.op == "call_function" and n.target in _A2A]
    if not a2as:
        return stats
    if any(_is_mutation(n) for n in graph.nodes):
        # a mutation makes "independent" depend on position; leave such graphs as they are
        return stats
    sunk: list = []
    prev_var = None  # previous variable-split (token) all-to-all
    placed: set = set()  # compute already put under an earlier all-to-all stays there
    for a in a2as:
        stats["a2a"] += 1
        waits = [u for u in a.users if u.op == "call_function" and u.target is _WAIT]
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        # 1. hoist the issue right after its latest input, never above an earlier collective issue
        floor = max([i for i in range(pos[a]) if _is_collective(nodes[i]) and nodes[i].target is not _WAIT], default=-1)
        last = max([floor] + [pos[x] for x in a.all_input_nodes])
        if last < pos[a] - 1:
            nodes[last].append(a)
            nodes = list(graph.nodes)
            pos = {n: i for i, n in enumerate(nodes)}
        # 2. (token all-to-alls) independent compute since the previous one -> right after the issue
        if _variable_splits(a):
            start = pos[prev_var] + 1 if prev_var is not None else 0
            window = nodes[start : pos[a]]
            wset = set(window)
            keep = _ancestors(a, wset)
            for p in window:
                if _is_pinned(p):
                    keep.add(p)
                    keep |= _ancestors(p, wset)
            movable = [n for n in window if n not in keep and n not in placed]
            # nodes already placed under an earlier all-to-all stay, and so do their inputs
            for n in window:
                if n in placed:
                    movable = [m for m in movable if m not in _ancestors(n, wset)]
            placed.update(movable)
            anchor = a
            for n in movable:
                anchor.append(n)
                anchor = n
            stats["moved_compute"] += len(movable)
            prev_var = a
        # 3. sink each wait to right before its first user
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        for w in waits:
            users = [u for u in w.users]
            if not users:
                continue
            first = min(users, key=pos.__getitem__)
            if pos[first] - 1 > pos[w]:
                first.prepend(w)
                stats["sunk_waits"] += 1
            stats["hoisted_compute"] += _hoist_above_wait(w)
            sunk.append((a, w))
    # 4. pin the waits behind the compute placed before them: Inductor's scheduler (reorder_for_peak_memory)
    #    would otherwise pull each wait up to its collective
    deps = {}
    for a, w in sunk:
        d = _last_compute_before(w, a)
        if d is not None:
            deps[w] = OrderedSet([d])
    if deps and graph.owning_module is not None:
        preserve_node_ordering(graph, deps)
        stats["pinned_waits"] = len(deps)
    graph.lint()
    return stats


def _hoist_above_wait(w: Node) -> int:
    """Move the compute after ``w`` that does not depend on it (up to the next collective) above it."""
    movable, blocked = [], {w}
    n = w.next
    while n.op != "root":
        if n.op == "output" or _is_collective(n):
            break
        if _is_pinned(n) or any(x in blocked for x in n.all_input_nodes):
            blocked.add(n)
        else:
            movable.append(n)
        n = n.next
    for m in movable:
        w.prepend(m)
    return len(movable)


def _last_compute_before(w: Node, a: Node):
    """The tensor-producing compute node right before ``w`` and after ``a``, if any."""
    n = w.prev
    while n is not a and n.op != "root":
        if n.op == "call_function" and not _is_collective(n) and isinstance(n.meta.get("val"), torch.Tensor):
            return n
        n = n.prev
    return None


def _is_collective(n: Node) -> bool:
    t = n.target
    return n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace.startswith(("_c10d", "c10d"))


def _variable_splits(a: Node) -> bool:
    return any(isinstance(x, Node) for lst in a.args[1:3] if isinstance(lst, (list, tuple)) for x in lst)


def _is_mutation(n: Node) -> bool:
    t = n.target
    return n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable and (
        t.namespace not in ("_c10d_functional",)
    )
