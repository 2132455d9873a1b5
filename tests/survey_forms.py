"""Survey: how Dynamo captures every MoE form in tests/models.py (not a test).

    python tests/survey_forms.py                 # markdown tables on stdout
    python tests/survey_forms.py --forms mixtral-eager,jetmoe --dtypes fp32
    python tests/survey_forms.py --form2         # evidence for prmc/capture.py (form 2, experts_implementation="eager")

For each form: Dynamo graph count / graph-break count and reasons of the full model under
``torch._dynamo.explain`` (the same as ``torch.compile(backend="eager")``), with default config and with
``capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True``; and the interesting ops (FX targets
of the Dynamo graphs) of the standalone MoE block, for fp32 and bf16.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import warnings

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models as M  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CAPTURE_FLAGS = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)

# substrings of target names worth reporting (everything else is elementwise/view noise)
INTERESTING = (
    "topk", "grouped_mm", "bmm", "nonzero", "where", "index_add", "masked_fill", "itruediv", "truediv_",
    "histc", "sort", "argsort", "cumsum", "scatter", "one_hot", "tolist", "item", "split", "linear",
    "matmul", "softmax", "sigmoid", "silu", "index_put", "repeat_interleave", "bincount", "setitem", "getitem",
    "chunk", "cat", "clamp", "gather", "sum", "mul_", "add_", "div_", "_assert", "sym_size", "iadd", "imul",
)


def target_name(node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return f"module:{t}"
    if isinstance(t, torch._ops.OpOverload) or isinstance(t, torch._ops.OpOverloadPacket):
        return f"torch.ops.{t}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    if mod.startswith("torch._ops"):
        return f"torch.ops.{getattr(t, '_name', name)}"
    if mod == "_operator":
        return f"operator.{name}"
    if mod.startswith("torch._C._nn"):
        mod = "torch._C._nn"
    elif mod.startswith("torch.nn.functional"):
        mod = "F"
    elif mod.startswith("torch._C._VariableFunctions") or mod == "torch":
        mod = "torch"
    name = name.replace("_VariableFunctionsClass.", "")
    if mod in ("", None) and name in dir(torch):
        mod = "torch"
    return f"{mod}.{name}" if mod else name


class Recorder:
    """A Dynamo backend that records the graphs it is given and runs them as they are."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def _short_reason(r: str) -> str:
    lines = [ln.strip() for ln in r.splitlines() if ln.strip()]
    # Dynamo's messages: "Encountered graph break when attempting to trace X:" then the gb title
    keep = [ln for ln in lines if not ln.startswith(("Encountered graph break", "Graph Break", "Unsupported:"))
            and not ln.endswith("e.g. f(x, y):")]
    head = (keep or lines or ["?"])[0]
    expl = next((ln for ln in lines if ln.startswith("Explanation:")), "")
    m = None
    if "Operator `" in expl:
        m = expl.split("Operator `")[1].split("`")[0]
    return head[:90] + (f" [{m}]" if m else "")


def run_explain(module, inp, flags: dict | None):
    """graph count, graph-break count, reasons: torch._dynamo.explain plus Dynamo's "unimplemented" counters
    (frames Dynamo gave up on and ran eagerly, which explain does not list)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(**(flags or {})):
        ex = torch._dynamo.explain(module)(inp)
    reasons = []
    for br in ex.break_reasons:
        loc = ""
        if br.user_stack:
            fr = br.user_stack[-1]
            loc = f" @{os.path.basename(fr.filename)}:{fr.lineno}"
        reasons.append(_short_reason(br.reason or "?") + loc)
    for r, n in counters["unimplemented"].items():
        reasons += ["skipped frame: " + _short_reason(r)] * n
    return ex.graph_count, ex.graph_break_count, reasons


def block_ops(block, inp, flags: dict | None):
    torch._dynamo.reset()
    rec = Recorder()
    with torch._dynamo.config.patch(**(flags or {})):
        out = torch.compile(block, backend=rec)(inp)
    out.float().sum().backward()
    counts = collections.Counter()
    for gm in rec.graphs:
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method", "call_module"):
                counts[target_name(n)] += 1
    return len(rec.graphs), counts


def interesting(counts) -> str:
    keep = []
    for k, v in sorted(counts.items()):
        short = k.split(".")[-1]
        if any(s in k for s in INTERESTING) and short not in ("size", "dim"):
            keep.append(f"{k}×{v}" if v > 1 else k)
    return ", ".join(keep)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--forms", default="", help="comma-separated names from tests/models.py all_forms()")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--form2", action="store_true", help="only the prmc.capture evidence for the eager experts forms")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--reasons", action="store_true", help="print every break reason")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    if args.form2:
        return form2_evidence([d for d in args.dtypes.split(",") if d], [s for s in args.forms.split(",") if s])

    wanted = [s for s in args.forms.split(",") if s]
    forms = [(n, b) for n, b in M.all_forms() if not wanted or n in wanted]
    blocks = dict(M.all_block_forms())
    dtypes = [d for d in args.dtypes.split(",") if d]

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print()
    print("| form | dtype | graphs (breaks), default | graphs (breaks), capture flags | block graphs default / flags |"
          " block ops (flags) |")
    print("|---|---|---|---|---|---|")
    all_reasons = {}
    for name, builder in forms:
        for dn in dtypes:
            dt = DTYPES[dn]
            model = builder(seed=0, dtype=dt)
            ids = M.make_inputs(model)
            g0, b0, r0 = run_explain(model, ids, None)
            g1, b1, r1 = run_explain(model, ids, CAPTURE_FLAGS)
            all_reasons[(name, dn, "default")] = r0
            all_reasons[(name, dn, "flags")] = r1
            ops = ""
            bg = ""
            if not args.no_ops:
                blk = blocks[name](seed=0, dtype=dt)
                x = M.make_inputs(blk)
                nb0, _ = block_ops(blk, x, None)
                blk = blocks[name](seed=0, dtype=dt)
                nb1, counts = block_ops(blk, M.make_inputs(blk), CAPTURE_FLAGS)
                ops = interesting(counts)
                bg = f"{nb0} / {nb1}"
            print(f"| {name} | {dn} | {g0} ({b0}) | {g1} ({b1}) | {bg} | {ops} |", flush=True)
    print()
    print("Distinct graph-break reasons (full model):")
    print()
    for (name, dn, mode), rs in all_reasons.items():
        if not rs:
            continue
        c = collections.Counter(rs)
        print(f"- {name} {dn} {mode}: " + "; ".join(f"{n}× {r}" for r, n in c.items()))


def _stand_in_prmc_backend():
    """A recording backend that prmc.capture.is_prmc_backend() recognises (the real prmc backend may not exist
    yet): module "prmc.survey" and ``_prmc_backend = True``; it runs the Dynamo graphs as they are."""
    rec = Recorder()

    def backend(gm, example_inputs, **options):
        return rec(gm, example_inputs)

    backend.__module__ = "prmc.survey"
    backend._prmc_backend = True
    return backend, rec


def _run(model, ids, backend):
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend) if backend is not None else model
    y = M.logits_of(fn, ids)
    y.float().square().mean().backward()
    return y.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}


def form2_evidence(dtypes, wanted):
    """For each family with experts_implementation="eager": Dynamo graphs under a prmc(-marked) backend without and
    with prmc.capture.install(), output/grad error of that compile vs uncompiled eager, eager bit-identity with
    the substitute installed, and graph counts under torch._dynamo.explain (a non-prmc backend) with it installed."""
    import prmc.capture as C

    fams = [f for f in M.FORM2_FAMILIES if not wanted or f in wanted or f"{f}-eager" in wanted]
    print("| model (experts_implementation=eager) | dtype | prmc graphs before | prmc graphs after | grouped-mm op in graph"
          " | max abs err out | max abs err grads | eager bit-identical with install | explain graphs with install |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fam in fams:
        for dn in dtypes:
            dt = DTYPES[dn]
            build = lambda: M.build(fam, seed=0, dtype=dt, experts_implementation="eager")  # noqa: E731
            ids = M.make_inputs(build(), seed=0)
            C.uninstall()
            y_ref, g_ref = _run(build(), ids, None)
            be, rec = _stand_in_prmc_backend()
            _run(build(), ids, be)
            before = len(rec.graphs)
            C.install()
            y_e2, g_e2 = _run(build(), ids, None)
            same = torch.equal(y_ref, y_e2) and all(torch.equal(g_ref[k], g_e2[k]) for k in g_ref)
            be, rec = _stand_in_prmc_backend()
            y_c, g_c = _run(build(), ids, be)
            after = len(rec.graphs)
            ops = sorted({target_name(n) for g in rec.graphs for n in g.graph.nodes
                          if n.op == "call_function" and "grouped_mm" in target_name(n)})
            gerr = max((g_c[k] - g_ref[k]).abs().max().item() for k in g_ref)
            torch._dynamo.reset()
            ex = torch._dynamo.explain(build())(ids)
            C.uninstall()
            print(f"| {fam} | {dn} | {before} | {after} | {', '.join(ops)} | {(y_c - y_ref).abs().max().item():.1e} "
                  f"| {gerr:.1e} | {same} | {ex.graph_count} |", flush=True)


if __name__ == "__main__":
    main()
