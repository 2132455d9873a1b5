"""The prmc pass registry.

Each pass is a module ``prmc/passes/<name>.py`` with one entry point
``run(gm: torch.fx.GraphModule, config: PrmcConfig, report: Report) -> None`` that rewrites the
Dynamo graph in place. Passes talk to each other through ``node.meta["prmc"]`` and the prmc ops they
insert, never through globals. They run in registry order.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    description: str

    @property
    def run(self) -> Callable:
        return importlib.import_module(f"prmc.passes.{self.name}").run


PASSES: dict[str, PassInfo] = {
    p.name: p
    for p in (
        PassInfo("recognise", "find MoE blocks (router, top-k, experts, combine) and describe each as an MoESpec"),
        PassInfo("moe_dispatch", "rewrite each block into sort_by_expert -> experts (dropless)"),
        PassInfo(
            "expert_parallel",
            "EP form of each block: all-to-all dispatch/combine with variable splits (dropless); "
            "checks that all ranks will issue the same collectives",
        ),
        PassInfo(
            "overlap",
            "communication/compute overlap: chunked all-to-alls, shared expert under the dispatch, waits late (fwd+bwd)",
        ),
    )
}

DEFAULT_PASSES: tuple[str, ...] = tuple(PASSES)


def list_passes() -> dict[str, str]:
    """Pass name -> what it does, in the order they run."""
    return {name: info.description for name, info in PASSES.items()}
