"""What prmc found and did in each compiled graph: ``prmc.last_report()``, ``prmc.reports()``.

Logged through ``torch._logging`` under the name ``prmc`` (``TORCH_LOGS=prmc``).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging

import torch._logging._internal

torch._logging._internal.register_log("prmc", "prmc")
log = logging.getLogger("prmc")


@dataclasses.dataclass
class BlockReport:
    """One MoE block (or a top-k that looked like one): what it is and what happened to it."""

    name: str
    rewritten: bool = False
    form: str = ""
    num_experts: int | None = None
    top_k: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    routing: str = ""
    activation: str = ""
    shared_expert: bool = False
    reason: str = ""
    rewrites: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        if not self.rewritten:
            return f"  {self.name}: left as it was: {self.reason}"
        details = [self.form]
        if self.num_experts is not None:
            details.append(f"E={self.num_experts} k={self.top_k} H={self.hidden} I={self.intermediate}")
        if self.routing:
            details.append(f"routing {self.routing}")
        if self.activation:
            details.append(self.activation + (", shared expert kept" if self.shared_expert else ""))
        return f"  {self.name}: {', '.join(details)} -> {' + '.join(self.rewrites)}"


@dataclasses.dataclass
class Report:
    """One Dynamo graph's report."""

    graph: int
    blocks: list[BlockReport] = dataclasses.field(default_factory=list)
    graph_breaks: list[str] = dataclasses.field(default_factory=list)
    passes: tuple[str, ...] = ()
    notes: list[str] = dataclasses.field(default_factory=list)  # what passes other than recognise add

    @property
    def rewritten(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.rewritten]

    @property
    def refused(self) -> list[BlockReport]:
        return [b for b in self.blocks if not b.rewritten]

    def block(self, name: str) -> BlockReport:
        for b in self.blocks:
            if b.name == name:
                return b
        b = BlockReport(name)
        self.blocks.append(b)
        return b

    def __str__(self) -> str:
        head = f"prmc graph {self.graph}: {len(self.rewritten)} MoE block(s) rewritten, {len(self.refused)} left alone"
        lines = [head, *(b.line() for b in self.blocks)]
        if not self.blocks:
            lines.append("  no MoE block (no top-k routing) in this graph: compiled as Inductor would")
        lines += [f"  {note}" for note in self.notes]
        if self.graph_breaks:
            lines.append("  Dynamo graph breaks so far in this process:")
            lines += [f"    {r}" for r in self.graph_breaks]
        return "\n".join(lines)


_REPORTS: collections.deque[Report] = collections.deque(maxlen=256)
_GRAPH_IDS = itertools.count()


def new_report(passes: tuple[str, ...]) -> Report:
    from torch._dynamo.utils import counters

    report = Report(graph=next(_GRAPH_IDS), passes=passes)
    report.graph_breaks = [f"{reason} (x{n})" for reason, n in counters["graph_break"].items()]
    _REPORTS.append(report)
    return report


def last_report() -> Report | None:
    """The report of the graph prmc compiled last (``None`` before the first)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[Report]:
    """Reports of the graphs compiled since the last ``reset_reports()``, oldest first."""
    return list(_REPORTS)


def reset_reports() -> None:
    _REPORTS.clear()
