"""The ``prmc`` torch.compile backend.

Data flows one way: Dynamo's FX graph -> prmc passes (recognise, moe_dispatch, ...) on that graph
-> AOT autograd (forward and backward) -> Inductor. A graph with no MoE block is handed to Inductor
untouched.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule

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


def backend(gm: GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None, mode: str | None = None):
    """``torch.compile(model, backend="prmc", options={...})``; also usable as ``backend=prmc.backend``."""
    config = PrmcConfig.from_options(options)
    run_passes(gm, config)
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    # Only graphs with expert-parallel all-to-alls get the overlap schedule: everything else compiles
    # exactly as Inductor would.
    has_a2a = any(is_ep_collective(n) for n in gm.graph.nodes)
    patches = overlap.inductor_config_patches(config) if "overlap" in config.passes and has_a2a else {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches = {**list_mode_options(mode), **patches}
    return compile_fx(gm, example_inputs, config_patches=patches)
