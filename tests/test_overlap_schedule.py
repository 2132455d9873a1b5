"""The overlap schedule, in FX graphs and in the code Inductor generates (forward and backward).

* ``schedule()`` on hand-built graphs: issue hoisted, independent compute moved under the all-to-all, wait
  sunk to its first use; collectives keep their order; graphs with mutations are left alone.
* World 2 (gloo): the EP dispatch with 2 chunks and a "shared expert" (a Linear on the same tokens),
  compiled fwd+bwd by Inductor with ``overlap.inductor_config_patches()``; the generated wrapper code shows
  issue -> independent compute -> wait in the forward (shared expert and the next chunk's all-to-all under
  the first chunk's) and in the backward (the second gradient all-to-all issued before the first chunk's
  expert backward GEMMs, and waited after them).
* World 2: tiny Qwen2-MoE with sharded experts, compiled: in the scheduled forward graph the shared
  expert's GEMMs sit between the token dispatch all-to-all's issue and its wait; in the backward graph its
  backward GEMMs sit under the gradient all-to-alls.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import traceback

import pytest
import torch
from torch.fx import Graph

from prmc.passes import overlap

c10d = torch.ops._c10d_functional


def _order(graph: Graph) -> list[str]:
    return [n.name for n in graph.nodes if n.op == "call_function"]


def _graph_with_independent_compute():
    g = Graph()
    x = g.placeholder("x")
    z = g.placeholder("z")
    shared = g.call_function(torch.ops.aten.relu.default, (z,))
    shared.name = "shared"
    a2a = g.call_function(c10d.all_to_all_single.default, (x, [2, 2], [2, 2], "0"))
    a2a.name = "issue"
    w = g.call_function(c10d.wait_tensor.default, (a2a,))
    w.name = "wait"
    other = g.call_function(torch.ops.aten.sin.default, (z,))
    other.name = "other"
    use = g.call_function(torch.ops.aten.mm.default, (w, w))
    use.name = "use"
    out = g.call_function(torch.ops.aten.add.Tensor, (use, shared))
    g.output((out, other))
    return g


def test_schedule_moves_compute_under_the_all_to_all():
    g = _graph_with_independent_compute()
    stats = overlap.schedule(g)
    order = _order(g)
    assert order.index("issue") < order.index("shared") < order.index("wait") < order.index("use"), order
    assert order.index("other") < order.index("wait"), order  # wait sunk past independent compute
    assert stats["a2a"] == 1 and stats["sunk_waits"] == 1


def test_schedule_keeps_collective_order_and_skips_mutations():
    g = Graph()
    x = g.placeholder("x")
    a = g.call_function(c10d.all_to_all_single.default, (x, [2, 2], [2, 2], "0"))
    wa = g.call_function(c10d.wait_tensor.default, (a,))
    b = g.call_function(c10d.all_to_all_single.default, (x, [2, 2], [2, 2], "0"))
    wb = g.call_function(c10d.wait_tensor.default, (b,))
    s = g.call_function(torch.ops.aten.add.Tensor, (wa, wb))
    g.output(s)
    overlap.schedule(g)
    order = [n for n in g.nodes if n.op == "call_function"]
    assert order.index(a) < order.index(b)
    assert order.index(b) < order.index(wa)  # both in flight together

    g2 = _graph_with_independent_compute()
    z = next(n for n in g2.nodes if n.name == "z")
    first = next(n for n in g2.nodes if n.op == "call_function")
    with g2.inserting_before(first):
        g2.call_function(torch.ops.aten.add_.Tensor, (z, 1))
    before = _order(g2)
    assert overlap.schedule(g2)["moved_compute"] == 0
    assert _order(g2) == before


# ----------------------------------------------------------------------------- compiled, world 2
_CODE_KEYS = ("all_to_all_single", "wait_tensor", "prmc.expert", "extern_kernels.addmm", "extern_kernels.mm")


def _code_lines(code: str) -> list[str]:
    keep = []
    for line in code.splitlines():
        s = line.strip()
        if s.startswith("#") or "assert" in s or "import" in s or "async_compile" in s or "= rand_strided" in s:
            continue
        if any(k in s for k in _CODE_KEYS):
            keep.append(s)
    return keep


def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code

    import prmc.distributed.ep as ep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    try:
        g = dist.group.WORLD.group_name
        e, k, h, i, t = 4, 2, 8, 6, 10
        torch.manual_seed(0)
        x = torch.randn(t, h, requires_grad=True)
        ids = torch.randint(0, e, (t, k))
        wt = torch.rand(t, k)
        a = torch.randn(e // world, 2 * i, h, requires_grad=True)
        b = torch.randn(e // world, h, i, requires_grad=True)
        shared = torch.nn.Linear(h, h)

        def f(x, ids, wt, a, b):
            s = shared(x).relu()  # the shared expert: independent of the all-to-alls
            st = ep.ep_start(x, ids, wt, group_name=g, world=world, num_experts=e, chunks=2)
            return ep.ep_finish(st, a, b, "silu", True) + s

        torch._dynamo.config.capture_scalar_outputs = True
        with torch._inductor.config.patch(overlap.inductor_config_patches()):
            fn = torch.compile(f, fullgraph=True)

            def step():
                fn(x, ids, wt, a, b).sum().backward()

            _, codes = run_and_get_code(step)
        result = {"ok": True, "codes": [_code_lines(c) for c in codes], "model_graphs": _model_graphs()}
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    dist.destroy_process_group()


def _model_graphs():
    """Tiny Qwen2-MoE (shared expert) with sharded experts, compiled: the scheduled fwd/bwd graphs, as
    [(node name, kind)] with kind in issue / wait / shared / other."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    import prmc.distributed as pd
    from tests.test_expert_parallel import _ep_backend, _loss, _tiny

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    model = copy.deepcopy(_tiny("qwen2_moe", layers=1))
    pd.shard_experts(model, mesh)
    graphs = []
    orig = overlap.schedule

    def recording(graph):
        stats = orig(graph)
        nodes = []
        for n in graph.nodes:
            if n.op != "call_function":
                continue
            t = str(n.target)
            if "all_to_all_single" in t:
                kind = "issue"
            elif n.name.startswith("wait_tensor"):
                kind = "wait"
            elif n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and "shared_expert" in (
                n.meta.get("stack_trace") or ""
            ):
                kind = "shared"
            else:
                continue
            args = [a.name for a in n.all_input_nodes]
            nodes.append((n.name, kind, args))
        graphs.append(nodes)
        return stats

    overlap.schedule = recording
    try:
        compiled = torch.compile(model, backend=_ep_backend(1))
        _loss(compiled, torch.randint(3, 100, (2, 8))).backward()
    finally:
        overlap.schedule = orig
    return graphs


@pytest.fixture(scope="module")
def worker_results():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True, start_method="spawn")
        with open(os.path.join(d, "rank0.pkl"), "rb") as fh:
            res = pickle.load(fh)
    assert res["ok"], res.get("error")
    return res


def _window(nodes, issue_index):
    """Kinds between the issue of the ``issue_index``-th variable all-to-all and its wait."""
    issues = [i for i, n in enumerate(nodes) if n[1] == "issue"]
    i = issues[issue_index]
    name = nodes[i][0]
    w = next(j for j, n in enumerate(nodes) if n[1] == "wait" and name in n[2])
    return [n[1] for n in nodes[i + 1 : w]]


def test_shared_expert_under_dispatch_all_to_all_in_model_graphs(worker_results):
    fwd, bwd = worker_results["model_graphs"][:2]
    # forward: [count exchange, token dispatch, combine]; the shared expert's GEMMs under the dispatch
    assert _window(fwd, 1).count("shared") >= 3, fwd
    # backward: the shared expert's backward GEMMs under the gradient all-to-alls
    assert _window(bwd, 0).count("shared") + _window(bwd, 1).count("shared") >= 3, bwd


@pytest.fixture(scope="module")
def generated_code(worker_results):
    res = worker_results
    fwd, bwd = res["codes"][0], res["codes"][1]
    return fwd, bwd


def _index(lines, pattern, nth=0):
    hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
    assert len(hits) > nth, f"{pattern!r} (#{nth}) not in:\n" + "\n".join(lines)
    return hits[nth]


def _a2a_buf(lines, nth):
    line = lines[_index(lines, r"all_to_all_single.default\(.*\[u", nth)]
    return line.split("=")[0].strip()


def test_forward_schedule_in_generated_code(generated_code):
    fwd, _ = generated_code
    text = "\n".join(fwd)
    d0, d1 = _a2a_buf(fwd, 0), _a2a_buf(fwd, 1)  # the two chunks' token all-to-alls
    issue0 = _index(fwd, rf"^{d0} = .*all_to_all_single")
    issue1 = _index(fwd, rf"^{d1} = .*all_to_all_single")
    wait0 = _index(fwd, rf"wait_tensor.default\({d0}\)")
    wait1 = _index(fwd, rf"wait_tensor.default\({d1}\)")
    shared = _index(fwd, r"extern_kernels.addmm")
    gemm0 = _index(fwd, r"prmc.experts.default\(" + d0)
    gemm1 = _index(fwd, r"prmc.experts.default\(" + d1)
    assert issue0 < shared < wait0, text  # shared expert under the dispatch all-to-all
    assert issue1 < wait0 < gemm0, text  # chunk 1 travels while chunk 0 computes
    assert gemm0 < wait1 < gemm1, text
    back0 = _index(fwd, r"all_to_all_single.default\(.*\[u", 2)  # chunk 0's return all-to-all
    assert back0 < wait1, text  # issued before chunk 1's GEMMs


def test_backward_schedule_in_generated_code(generated_code):
    _, bwd = generated_code
    text = "\n".join(bwd)
    g0, g1 = _a2a_buf(bwd, 0), _a2a_buf(bwd, 1)
    issue1 = _index(bwd, rf"^{g1} = .*all_to_all_single")
    wait0 = _index(bwd, rf"wait_tensor.default\({g0}\)")
    wait1 = _index(bwd, rf"wait_tensor.default\({g1}\)")
    first_bwd = _index(bwd, r"prmc.experts_backward")
    assert issue1 < wait0 < first_bwd, text  # both gradient all-to-alls in flight
    assert first_bwd < wait1, text  # the second waited after the first chunk's backward GEMMs
    disp_back = _index(bwd, r"all_to_all_single.default\(.*\[u", 2)
    assert first_bwd < disp_back < wait1, text  # first chunk's result sent back under the second
