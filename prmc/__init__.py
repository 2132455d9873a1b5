"""prmc: compiler passes for Mixture-of-Experts training with ``torch.compile``.

``torch.compile(model, backend="prmc")`` finds the MoE blocks in the graphs Dynamo captures, rewrites
them into prmc ops (permute -> grouped GEMMs -> combine), and hands everything to Inductor.
"""

from prmc import ops  # noqa: F401  (registers torch.ops.prmc.*)
from prmc.backend import backend
from prmc.config import PrmcConfig
from prmc.passes import list_passes
from prmc.report import last_report, reports, reset_reports

__all__ = ["backend", "PrmcConfig", "list_passes", "last_report", "reports", "reset_reports"]
