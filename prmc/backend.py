"""The ``prmc`` torch.compile backend.

Data flows one way: Dynamo's FX graph -> prmc passes (recognise, moe_dispatch, ...) on that graph
-> AOT autograd (forward and backward) -> Inductor. A graph with no MoE block is handed to Inductor
untouched.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

import prmc.ops
from prmc import capture
from prmc.config import PrmcConfig
from prmc.passes import PASSES, overlap
from prmc.passes.expert_parallel import is_ep_collective
from prmc.report import Report, log, new_report

capture.install()


def run_passes(gm: GraphModule, config: PrmcConfig) -> Report:
    """Run the configured passes on a Dynamo graph, in place; returns (and keeps) the graph's report."""
    report = new_report(config.passes)
    for name in config.passes:
        PASSES[name].run(gm, config, report)
    if report.rewritten:
        gm.graph.lint()
        gm.recompile()
    log.info("%s", report)
    if config.report:
        print(report)
    return report


class OpsVersionTag(CustomGraphPass):
    """A post-grad pass that changes nothing; its uuid, a hash of the prmc op definitions, enters the cache
    keys of Inductor and AOT autograd. Their caches key a graph by its forward; the backward of a prmc op
    comes from its registered autograd, which the key does not see. Without this, a graph cached before a
    change of that autograd (another signature of a backward op, say) is reused after it and fails.
    Set only where the user's Inductor config has no post-grad pre pass of its own."""

    def __call__(self, graph: Graph) -> None:
        pass

    def uuid(self) -> bytes:
        with open(prmc.ops.__file__, "rb") as f:
            return hashlib.sha256(f.read()).digest()


def backend(gm: GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None, mode: str | None = None):
    """``torch.compile(model, backend="prmc", options={...})``; also usable as ``backend=prmc.backend``."""
    config = PrmcConfig.from_options(options)
    report = run_passes(gm, config)
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    # Only graphs with expert-parallel all-to-alls get the overlap schedule: everything else compiles
    # exactly as Inductor would.
    has_a2a = any(is_ep_collective(n) for n in gm.graph.nodes)
    patches = overlap.inductor_config_patches(config) if "overlap" in config.passes and has_a2a else {}
    if report.rewritten and torch._inductor.config.post_grad_custom_pre_pass is None:
        patches = {**patches, "post_grad_custom_pre_pass": OpsVersionTag()}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches = {**list_mode_options(mode), **patches}
    return compile_fx(gm, example_inputs, config_patches=patches)
