"""``PrmcConfig``: the typed, validated form of ``torch.compile(..., options={...})``."""

from __future__ import annotations

import dataclasses
from typing import Any

from prmc.passes import PASSES, DEFAULT_PASSES

COMPILERS = ("inductor", "aot_eager")


@dataclasses.dataclass(frozen=True)
class PrmcConfig:
    """Options of the prmc backend.

    Attributes:
        passes: the passes to run, by name (``prmc.list_passes()``); ``recognise`` always runs first.
        report: print each graph's report when it is compiled (it is always kept: ``prmc.last_report()``).
        expert_parallel: a 1-D ``DeviceMesh`` over which experts are sharded (``prmc.distributed``).
        overlap_chunks: token chunks per block for the communication/compute overlap schedule.
        compiler: what compiles the rewritten graph: ``"inductor"`` (default), or ``"aot_eager"``
            (AOT autograd without Inductor; for debugging a rewrite).
    """

    passes: tuple[str, ...] = DEFAULT_PASSES
    report: bool = False
    expert_parallel: Any = None
    overlap_chunks: int = 1
    compiler: str = "inductor"

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "PrmcConfig":
        """Validate ``options`` once; every problem is named with its fix."""
        options = dict(options or {})
        if not isinstance(options, dict):
            raise TypeError(f"prmc: options must be a dict, got {type(options).__name__}")
        valid = ("passes", "report", "expert_parallel", "overlap", "compiler")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"prmc: unknown option(s) {unknown}; valid options are {list(valid)}")
        kwargs: dict[str, Any] = {}
        if "passes" in options:
            passes = options["passes"]
            if isinstance(passes, str) or not all(isinstance(p, str) for p in passes):
                raise TypeError(f"prmc: option 'passes' must be a list of pass names, got {passes!r}")
            bad = [p for p in passes if p not in PASSES]
            if bad:
                raise ValueError(f"prmc: unknown pass(es) {bad}; valid passes are {list(PASSES)} (prmc.list_passes())")
            kwargs["passes"] = tuple(p for p in PASSES if p in passes or p == "recognise")
        if "report" in options:
            if not isinstance(options["report"], bool):
                raise TypeError(f"prmc: option 'report' must be True or False, got {options['report']!r}")
            kwargs["report"] = options["report"]
        if "compiler" in options:
            if options["compiler"] not in COMPILERS:
                raise ValueError(f"prmc: option 'compiler' must be one of {list(COMPILERS)}, got {options['compiler']!r}")
            kwargs["compiler"] = options["compiler"]
        if "expert_parallel" in options and options["expert_parallel"] is not None:
            mesh = options["expert_parallel"]
            from torch.distributed.device_mesh import DeviceMesh

            if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
                raise TypeError(
                    "prmc: option 'expert_parallel' must be a 1-D DeviceMesh (e.g. mesh['ep'] of "
                    f"init_device_mesh(..., mesh_dim_names=('dp', 'ep'))), got {mesh!r}"
                )
            kwargs["expert_parallel"] = mesh
        if "overlap" in options:
            overlap = options["overlap"]
            if not isinstance(overlap, dict) or set(overlap) - {"chunks"}:
                raise TypeError(f"prmc: option 'overlap' must be a dict like {{'chunks': 2}}, got {overlap!r}")
            chunks = overlap.get("chunks", 1)
            if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
                raise ValueError(f"prmc: overlap 'chunks' must be a positive int, got {chunks!r}")
            kwargs["overlap_chunks"] = chunks
        return cls(**kwargs)
