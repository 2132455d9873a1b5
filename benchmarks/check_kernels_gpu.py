"""Full-size GPU check of the Triton and Gluon kernels against the reference (float64), and of the registered ops.

    PYTHONPATH=. python benchmarks/check_kernels_gpu.py [part of a case's name ...]

About 4 minutes on an H100 with Triton 3.6, compiles and autotuning included (the fp16 and fp32 cases, which run the
autotuned Triton kernels, take 30-60 s each); longer with Triton 3.9, whose compiles are slower. Names given: only
the cases whose names contain one of them, then the sort and ops checks.

The same per-op checks as the CPU interpreter tests (``prmc.kernels.check``), at model sizes and with
the GPU's real bf16/fp16 tensor-core products, then one MoE layer through ``torch.ops.prmc`` (the CUDA
registration and the autograd wiring) against autograd through the reference. Exits 1 on any failure.
"""

from __future__ import annotations

import sys
import time

import torch

import prmc  # noqa: F401  (registers torch.ops.prmc.* and their CUDA kernels)
from prmc.kernels import gluon_gemm, gluon_weight_grad, reference, triton_moe
from prmc.kernels.check import Case, check_case, rel_err

# bf16 operands: the reference op itself, run in bf16, lands near 3e-3 (preact and h are rounded).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

CASES = {
    "qwen3-30b-a3b bf16": Case(8192, 2048, 768, 128, 8, dtype=torch.bfloat16),
    # under torch.use_deterministic_algorithms: the rows go back to their tokens through combine_rows
    "qwen3-30b-a3b bf16, deterministic": Case(8192, 2048, 768, 128, 8, dtype=torch.bfloat16),
    "mixtral bf16 (2048 tokens)": Case(2048, 4096, 14336, 8, 2, dtype=torch.bfloat16),
    "skewed bf16, empty + unrouted": Case(8192, 2048, 1408, 64, 6, dtype=torch.bfloat16, hot=4, unrouted=777),
    "odd fp16 gelu_tanh ungated, transposed": Case(1000, 1000, 700, 10, 3, dtype=torch.float16, activation="gelu_tanh", gated=False, transposed_weights=True),
    "fp32 gelu transposed": Case(1024, 1024, 512, 16, 4, activation="gelu", transposed_weights=True),
    "one group bf16 relu": Case(4096, 1024, 512, 8, 1, dtype=torch.bfloat16, activation="relu", hot=1),
    # the Gluon kernel in fp16 on all four row products
    "fp16 silu, 16 experts": Case(2048, 1024, 512, 16, 4, dtype=torch.float16),
    # ~24 rows per expert: in every row tile only the first warpgroup's rows start within the group
    "tiny groups bf16, 64 experts": Case(768, 1024, 512, 64, 2, dtype=torch.bfloat16),
    # the gated Gluon forward on weights stored [E, H, F] (columns contiguous), partial tiles
    "bf16 gelu_tanh transposed, 1000 tokens": Case(1000, 1024, 384, 12, 2, dtype=torch.bfloat16, activation="gelu_tanh", transposed_weights=True),
    # 4 experts of ~2048 rows (expert 0 empty): both weight gradients on the Gluon kernel
    "few large experts bf16, empty + unrouted": Case(4096, 2048, 2816, 4, 2, dtype=torch.bfloat16, hot=1, unrouted=777),
    # the same with F = 2 * 2776, no whole 128-row tiles: grad_w_gate_up on cuBLAS per expert
    "few large experts bf16, F not whole tiles": Case(4096, 2048, 2776, 4, 2, dtype=torch.bfloat16, hot=1, unrouted=777),
}  # fmt: skip


def check_ops_autograd(tokens=2048, hidden=1024, inter=768, experts=16, top_k=4) -> dict[str, float]:
    """One bf16 layer through torch.ops.prmc (Triton on CUDA) vs autograd through the float64 reference."""
    dev = torch.device("cuda")
    x = torch.randn(tokens, hidden, device=dev)
    w1 = torch.randn(experts, 2 * inter, hidden, device=dev) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device=dev) / inter**0.5
    weights = torch.rand(tokens * top_k, device=dev)
    expert_ids = torch.rand(tokens, experts, device=dev).topk(top_k, dim=-1).indices
    order, _, offsets, inverse = torch.ops.prmc.sort_by_expert(expert_ids, experts)  # the Triton counting sort
    grad_out = torch.randn(tokens, hidden, device=dev)

    results = []
    for layer, dtype in [(torch.ops.prmc.experts, torch.bfloat16), (reference.experts, torch.float64)]:
        inputs = [t.to(dtype).requires_grad_() for t in (x, w1, w2, weights)]
        out, _ = layer(inputs[0], order, inverse, top_k, offsets, inputs[1], inputs[2], inputs[3], "silu", True)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        results.append((out, *grads))
    names = ["out", "grad_x", "grad_w_gate_up", "grad_w_down", "grad_scale"]
    return {f"ops autograd.{n}": rel_err(a, b) for n, a, b in zip(names, *results)}


def check_sort_by_expert() -> list[str]:
    """The CUDA sort_by_expert (Triton counting sort) against the reference (torch.sort), bitwise: the names of
    the cases where any output differs."""
    dev = torch.device("cuda")
    skewed = torch.randint(0, 4, (8192, 6), device=dev, dtype=torch.int32)
    skewed.view(-1)[:1000] = 64  # ids past E route nowhere
    cases = {  # name: (expert ids, E)
        "qwen3 65536 slots, 128 experts": (torch.rand(8192, 128, device=dev).topk(8, dim=-1).indices, 128),
        "skewed, 1000 unrouted, int32": (skewed, 64),
        "256 experts": (torch.rand(4096, 256, device=dev).topk(8, dim=-1).indices, 256),
        "odd: 1001 x 3 of 7 experts": (torch.randint(-1, 8, (1001, 3), device=dev), 7),
    }
    failed = []
    for name, (ids, e) in cases.items():
        got, want = torch.ops.prmc.sort_by_expert(ids, e), reference.sort_by_expert(ids, e)
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        print(f"sort_by_expert {name:36s} {'ok' if same else 'FAIL'}")
        failed += [] if same else [f"sort_by_expert {name}"]
    return failed


def gluon_runs(case: Case) -> bool:
    """Whether the Gluon kernels can run the case at all: on Hopper, in 16 bits."""
    return torch.cuda.get_device_capability() == (9, 0) and gluon_gemm.gluon is not None and case.dtype != torch.float32


def _gluon_row_products(case: Case) -> dict[str, bool]:
    """Which row products of the case take the Gluon kernel (gluon_gemm.weight_operand): on Hopper in 16 bits, each
    product whose weight view no tile can leave an expert in (columns whole tiles of 256, or 128 per half when
    gated, where K is contiguous; K whole steps of 64 where the columns are): down fwd (W_down.T), grad_h (W_down),
    the gated gate_up forward (W_gate_up.T) and grad_x (W_gate_up)."""
    if not gluon_runs(case):
        return dict.fromkeys(["down_fwd", "grad_h", "gate_up", "grad_x"], False)
    h, i, f = case.hidden, case.inter, case.inter * (2 if case.gated else 1)
    if case.transposed_weights:  # storage [E, I, H] and [E, H, F]
        down_fwd, grad_h, gate_up, grad_x = i % 64 == 0, i % 256 == 0, h % 64 == 0 and i % 128 == 0, h % 256 == 0
    else:  # storage [E, H, I] and [E, F, H]
        down_fwd, grad_h, gate_up, grad_x = h % 256 == 0, h % 64 == 0, i % 128 == 0, f % 64 == 0
    return dict(down_fwd=down_fwd, grad_h=grad_h, gate_up=gate_up and case.gated, grad_x=grad_x)


def gluon_products(case: Case) -> int:
    """How many products of the case's two passes (scaled, unscaled) must take the Gluon kernel."""
    return 2 * sum(_gluon_row_products(case).values())


def combined_products(case: Case, deterministic: bool) -> int:
    """How many of those add their rows into their tokens' rows in the epilogue (triton_moe._combined_in_epilogue):
    the down forward and grad_x, each where its columns (H) are whole 256-wide tiles, unless deterministic algorithms
    are asked for."""
    takes = _gluon_row_products(case)
    whole_tiles = case.hidden % gluon_gemm.BLOCK_N[False] == 0
    return 0 if deterministic else 2 * whole_tiles * (takes["down_fwd"] + takes["grad_x"])


def gathered_products(case: Case) -> int:
    """How many of those gather their rows by cp.async (triton_moe.gathered_row_weight): the gate_up forward up to
    MAX_GATHERED_COLUMNS, grad_h always, each where its K (H) is whole 64-deep k-steps."""
    takes = _gluon_row_products(case)
    whole_steps = case.hidden % 64 == 0
    gate_up = takes["gate_up"] and 2 * case.inter <= triton_moe.MAX_GATHERED_COLUMNS
    return 2 * whole_steps * (gate_up + takes["grad_h"])


def gluon_weight_grads(case: Case) -> int:
    """How many weight gradients of the case's two passes must take the Gluon kernel (gluon_weight_grad.takes):
    on Hopper in 16 bits, each whose gradient's rows are whole 128-row tiles (P: H for W_down, F for W_gate_up)."""
    if not gluon_runs(case):
        return 0
    f = case.inter * (2 if case.gated else 1)
    return 2 * ((case.hidden % 128 == 0) + (f % 128 == 0))


def gathered_weight_grads(case: Case) -> int:
    """How many of those gather their rows by cp.async (triton_moe.weight_grad_gathers), each up to
    MAX_WEIGHT_GRAD_GATHERED_COLUMNS of its other operand: the down one (grad_out's rows, L) over untransposed
    tiles, the gate_up one (x's rows, R) over transposed ones."""
    if not gluon_runs(case):
        return 0
    f = case.inter * (2 if case.gated else 1)
    down = case.hidden % 128 == 0 and case.inter <= triton_moe.MAX_WEIGHT_GRAD_GATHERED_COLUMNS
    down = down and not gluon_weight_grad._transposed(case.hidden, case.inter)
    gate_up = f % 128 == 0 and f <= triton_moe.MAX_WEIGHT_GRAD_GATHERED_COLUMNS
    gate_up = gate_up and gluon_weight_grad._transposable(f, case.hidden)
    return 2 * (down + gate_up)


def main(only: list[str]) -> int:
    """``only``: run just the cases whose names contain one of these strings (all when empty)."""
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = []
    launch, launch_k = gluon_gemm.grouped_gemm, gluon_weight_grad.k_grouped_mm
    for name, case in CASES.items():
        if only and not any(part in name for part in only):
            continue
        start = time.perf_counter()
        ran, ran_k, combined = [], [], []  # the Gluon row products and weight gradients of the case
        # (each launch noted with whether it gathers its rows by cp.async, and whether it combines them)
        gluon_gemm.grouped_gemm = lambda *args, **kw: (
            ran.append(len(args) > 6 and args[6] is not None) or combined.append("combine" in kw) or launch(*args, **kw)
        )  # fmt: skip
        gluon_weight_grad.k_grouped_mm = lambda *args: ran_k.append(any(r is not None for r in args[3:])) or launch_k(
            *args
        )
        deterministic = "deterministic" in name
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            errors = check_case(case, "cuda")
        finally:
            gluon_gemm.grouped_gemm, gluon_weight_grad.k_grouped_mm = launch, launch_k
            torch.use_deterministic_algorithms(False)
        worst = max(errors, key=errors.get)
        bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[case.dtype]}
        if len(ran) != gluon_products(case):
            bad["gluon products"] = len(ran)
        if len(ran_k) != gluon_weight_grads(case):
            bad["gluon weight grads"] = len(ran_k)
        if sum(combined) != combined_products(case, deterministic):
            bad["combined products"] = sum(combined)
        if sum(ran) != gathered_products(case):
            bad["gathered products"] = sum(ran)
        if sum(ran_k) != gathered_weight_grads(case):
            bad["gathered weight grads"] = sum(ran_k)
        failed += [f"{name}: {k}" for k in bad]
        status = "ok" if not bad else f"FAIL {bad}"
        print(f"{name:42s} worst {worst} {errors[worst]:.2e} ({time.perf_counter() - start:.1f} s, "
              f"{len(ran)} Gluon products ({sum(ran)} gathered, {sum(combined)} combined), "
              f"{len(ran_k)} weight grads ({sum(ran_k)} gathered)) "
              f"{status}")  # fmt: skip
    failed += check_sort_by_expert()
    errors = check_ops_autograd()
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[torch.bfloat16]}
    failed += list(bad)
    print("ops autograd (bf16):", {k: f"{v:.1e}" for k, v in errors.items()}, "ok" if not bad else "FAIL")
    print("ALL OK" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
