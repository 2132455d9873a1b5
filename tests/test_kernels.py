"""Triton kernels vs the reference, on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before the kernels are defined, and other test modules use real
Inductor in this process (and ``prmc.ops`` has already defined the kernels for the GPU), so the checks
run in child processes: this file, run as a script, checks the cases it is given and prints their errors
as JSON. Two children share the cases, one per core.

The interpreter multiplies in fp32 (its bf16 ``tl.dot`` is broken in Triton 3.9) and truncates when it
rounds fp32 to bf16/fp16 (the GPU rounds to nearest), so half-precision tolerances here are looser than
on the GPU (``benchmarks/check_kernels_gpu.py`` runs the same checks at full size there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from prmc.kernels import reference
from prmc.kernels.check import Case, accumulator_reads_in_flight, check_case, compile_for_hopper, cuobjdump

pytest.importorskip("triton")

CASES = {
    "fp32-silu": Case(37, 48, 40, 5, 2),
    "bf16-silu": Case(37, 48, 40, 5, 2, dtype=torch.bfloat16),
    # expert 0 empty, one hot expert, 5 rows past offsets[-1], weights as transposed views
    "fp32-gelu-skewed-unrouted-transposed": Case(29, 40, 24, 4, 3, activation="gelu", hot=1, unrouted=5, transposed_weights=True),
    "fp32-gelu_tanh-ungated-odd": Case(23, 33, 17, 3, 2, activation="gelu_tanh", gated=False),
    # top-1 routing with one hot expert: one group holds every row, the others are empty
    "fp32-relu-one-group": Case(40, 32, 24, 4, 1, activation="relu", hot=1),
    "fp16-silu-ungated": Case(31, 40, 24, 6, 3, dtype=torch.float16, gated=False),
    "bf16-gelu_tanh-unrouted-transposed": Case(29, 40, 24, 4, 2, dtype=torch.bfloat16, activation="gelu_tanh", unrouted=3, transposed_weights=True),
    # the Hopper bf16 composition (torch._grouped_mm, here its CPU implementation, + gather/combine/mlp_grad_rows)
    "bf16-silu-cutlass-unrouted-transposed": Case(37, 48, 40, 5, 2, dtype=torch.bfloat16, unrouted=3, transposed_weights=True),
    "bf16-relu-cutlass-ungated-one-group": Case(40, 32, 24, 4, 1, dtype=torch.bfloat16, activation="relu", gated=False, hot=1),
    # few large experts: CUTLASS and one cuBLAS mm per expert (here torch.mm on CPU); expert 0 empty
    "bf16-silu-cublas-skewed-unrouted": Case(37, 48, 40, 5, 2, dtype=torch.bfloat16, hot=2, unrouted=3),
    # the Hopper bf16 composition around the Gluon kernels (here torch stand-ins): rows gathered in the GEMMs where
    # the layer does, else copies read through TMA (MAX_*GATHERED_COLUMNS exceeded: Mixtral-class widths)
    "bf16-silu-gluon-gathered-unrouted": Case(37, 48, 40, 5, 2, dtype=torch.bfloat16, unrouted=3),
    "bf16-gelu-gluon-wide-skewed": Case(29, 40, 24, 4, 3, dtype=torch.bfloat16, activation="gelu", hot=1, unrouted=5),
    # H whole 256-wide tiles: the down forward and grad_x add their rows into the tokens' in the epilogue, unless
    # deterministic algorithms are asked for
    "bf16-silu-gluon-combined-unrouted": Case(37, 256, 40, 5, 2, dtype=torch.bfloat16, unrouted=3),
    "bf16-silu-gluon-combined-deterministic": Case(37, 256, 40, 5, 2, dtype=torch.bfloat16, unrouted=3),
}  # fmt: skip

# fp32 products are exact; half precision pays the interpreter's truncating rounding (see above).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# The children's count of launches without LAUNCH_OPTIONS, per kernel (_count_unpinned_launches).
UNPINNED = "unpinned launches"


@pytest.fixture(scope="module")
def interpreter_errors() -> dict[str, dict[str, float]]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    names = [*CASES, *EXTRA_CHECKS]
    children = [
        subprocess.Popen([sys.executable, __file__, *names[i::2]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    errors, unpinned = {}, {}
    for child in children:
        out, err = child.communicate(timeout=600)
        assert child.returncode == 0, f"interpreter checks failed:\n{err[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        for kernel, count in result.pop(UNPINNED).items():
            unpinned[kernel] = unpinned.get(kernel, 0) + count
        errors.update(result)
    return {**errors, UNPINNED: unpinned}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_reference(name, interpreter_errors):
    case = CASES[name]
    errors = interpreter_errors[name]
    # every output and gradient, with and without routing weights (and, with Gluon stand-ins, the launches)
    assert len(errors) == 11 + ("gluon" in name), sorted(errors)
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[case.dtype]}
    assert not bad, f"{name}: relative errors over {TOLERANCE[case.dtype]:g}: {bad}"


def test_launches_pin_compile_options(interpreter_errors):
    """Every Triton kernel launch passes ``LAUNCH_OPTIONS`` (FP fusion on, as the kernels were measured and checked
    with; left to Triton's default, 3.9 warns at the first compile and 3.10 turns fusion off), counted over all the
    interpreter checks, which launch each kernel. (The Gluon kernels have no interpreter: ``compile_for_hopper``
    builds them with the same options.)"""
    unpinned = interpreter_errors[UNPINNED]
    kernels = {"grouped_gemm_kernel", "weight_grad_kernel", "mlp_grad_rows_kernel", "gather_rows_kernel",
               "combine_rows_kernel", "segment_counts_kernel", "segment_bases_kernel", "scatter_kernel"}  # fmt: skip
    assert set(unpinned) == kernels and not any(unpinned.values()), unpinned


@pytest.mark.parametrize("name", ["grouped_gemm_loads", "weight_grad_loads", "gather_rows", "combine_rows", "sort_by_expert"])
def test_row_kernels(name, interpreter_errors):
    """The two load paths (TMA descriptors, pointers) of the grouped GEMM and of the weight gradient, the
    gather feeding CUTLASS and TMA on Hopper, the per-token combine (exact sums in fp32 inputs), and the
    dispatch's counting sort (its errors are counts of wrong integers, so any mismatch fails)."""
    errors = interpreter_errors[name]
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE[torch.float32]}
    assert len(errors) >= 2 and not bad, errors


def _row_products(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a[r] @ b[e(r)]`` per group in float64; rows past offsets[-1] zero."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    for e, (s, t) in enumerate(reference.group_bounds(offsets)):
        out[s:t] = a[s:t].double() @ b[e].double()
    return out


def _k_products(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``left[g_e].T @ right[g_e]`` per group g_e in float64: [E, P, Q]."""
    out = torch.zeros(offsets.shape[0], left.shape[1], right.shape[1], dtype=torch.float64)
    for e, (s, t) in enumerate(reference.group_bounds(offsets)):
        out[e] = left[s:t].double().t() @ right[s:t].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublas_per_expert_weight_grad(dtype):
    """The per-expert mm weight gradient (plain torch, so in this process) against float64 per group: an empty
    group, odd sizes, unrouted rows past offsets[-1] (left out); the bounds as the backward reads them."""
    from prmc.kernels import cublas
    from prmc.kernels.check import random_routing, rel_err

    order, _, offsets = random_routing(31, 5, 2, "cpu", hot=2, unrouted=3, seed=1)
    m, bounds = order.shape[0], cublas.group_bounds_later(offsets)()
    assert bounds[1] == 0 and bounds[-1] == m - 3  # expert 0 empty, 3 rows unrouted
    a, left = torch.randn(m, 37, dtype=dtype), torch.randn(m, 19, dtype=dtype)
    grad = cublas.k_mm(left, a, bounds)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(grad, _k_products(left, a, offsets)) < tolerance and not grad[0].any()


def test_gluon_weight_grad_gathers_only_its_l_tile(monkeypatch):
    """The Gluon weight gradient gathers rows only into its L tile, 128 columns (R's 256 columns gathered ran 17-26%
    slower): the left operand's over untransposed tiles, the right one's over transposed ones (where the transposed
    tile fits), never both, with an index of int32/int64 rows on the operand's device. The device checks (``fits``,
    TMA alignment) stand in here for the GPU's."""
    from prmc.kernels import gluon_weight_grad as wg

    monkeypatch.setattr(wg, "fits", lambda shape, dtype, device: dtype == torch.bfloat16 and shape[1] % wg.BLOCK_P == 0)
    monkeypatch.setattr(wg, "tma_reads", lambda t: True)
    tokens, m, experts, p = 64, 128, 4, 256
    src, rows = torch.randn(tokens, p, dtype=torch.bfloat16), torch.randint(0, tokens, (m,))
    for q, transposed in [(256, False), (384, True)]:  # 384: no whole 256-wide tiles, but whole transposed ones
        right, shape = torch.randn(m, q, dtype=torch.bfloat16), torch.Size([experts, p, q])
        assert wg._transposed(p, q) == transposed
        assert wg.takes(src[rows], right, shape)  # the copy, either way
        assert wg.takes(src, right, shape, rows) == (not transposed)
    # The right operand gathered: over out[e].T, whose tile needs Q of 128 rows and P of 256 columns.
    left = torch.randn(m, p, dtype=torch.bfloat16)
    for q, transposable in [(256, True), (384, True), (320, False)]:
        right_src, shape = torch.randn(tokens, q, dtype=torch.bfloat16), torch.Size([experts, p, q])
        assert wg.takes(left, right_src, shape, None, rows) == transposable
    narrow = torch.randn(m, 128, dtype=torch.bfloat16)  # P = 128: no 256-wide transposed column tile
    assert not wg.takes(narrow, right_src[:, :256], torch.Size([experts, 128, 256]), None, rows)
    assert not wg.takes(src, right_src[:, :256], torch.Size([experts, p, 256]), rows, rows)  # both gathered
    right, shape = torch.randn(m, 256, dtype=torch.bfloat16), torch.Size([experts, p, 256])
    assert not wg.takes(src, right, shape, rows.float())
    assert not wg.takes(src, right, shape, rows[:-1])  # one index per row of right


def test_accumulator_reads_in_flight_finds_a_read_before_the_wait():
    """The SASS check behind the compile tests: an accumulator register (R24.. of a 64 x 256 HGMMA: 128 of them)
    read between the HGMMA and the wait that retires it is found, also with a second HGMMA group pending; other
    registers, reads after the wait, and reads in a new warp-specialized partition are not."""
    hgmma = "HGMMA.64x256x16.F32 R24, gdesc[UR16], R24, gsb0 ;"

    def sass(*instructions):
        return "\n".join(f"        /*{16 * i:04x}*/                   {ins}" for i, ins in enumerate(instructions))

    read, other = "F2FP.F16.F32.PACK_AB R0, R86, R87 ;", "F2FP.F16.F32.PACK_AB R0, R152, R153 ;"
    wait0, wait1 = "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;", "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;"
    assert accumulator_reads_in_flight(sass(hgmma, wait1, read, wait0)) == ["F2FP.F16.F32.PACK_AB R0, R86, R87"]
    assert accumulator_reads_in_flight(sass(hgmma, hgmma, wait1, read)) == ["F2FP.F16.F32.PACK_AB R0, R86, R87"]
    assert accumulator_reads_in_flight(sass(hgmma, other, wait0, read)) == []
    assert accumulator_reads_in_flight(sass(hgmma, wait1, "USETMAXREG.DEALLOC.CTAPOOL 0x78 ;", read)) == []


# (dtype, k_contig, gated, activation, gather, combine) of the Gluon row kernel: each with claimed tiles (CLAIM, the
# fine-grained experts'), and the layer's four products also with fixed shares (experts larger than half the L2)
GLUON_GEMM_CASES = (
    [("bf16", k_contig, gated, "silu", False, None) for k_contig in (True, False) for gated in (False, True)]
    + [("bf16", True, True, activation, False, None) for activation in ("gelu", "gelu_tanh", "relu")]
    + [("bf16", False, False, "silu", True, None), ("bf16", True, True, "silu", True, None)]  # grad_h, gate_up fwd: gathered
    + [("fp16", True, True, "silu", False, None), ("fp16", True, True, "silu", True, None), ("fp16", False, True, "relu", False, None)]
    + [("bf16", False, False, "silu", False, "scaled"), ("bf16", True, False, "silu", False, "unscaled")]  # down fwd, grad_x
    + [("fp16", False, False, "silu", False, "scaled")]
)  # fmt: skip
# (gate_up fwd and grad_h gathered, down fwd and grad_x combined)
LAYER_PRODUCTS = [case for case in GLUON_GEMM_CASES if case[0] == "bf16" and (case[4] or case[5])]


@pytest.mark.parametrize(
    "dtype, k_contig, gated, activation, gather, combine, claim",
    [(*case, True) for case in GLUON_GEMM_CASES] + [(*case, False) for case in LAYER_PRODUCTS],
)
def test_gluon_gemm_compiles_for_hopper(dtype, k_contig, gated, activation, gather, combine, claim):
    """The Gluon row-grouped kernel as the store product and as the gated one (every activation), reading A through
    TMA or gathering its rows, and adding its rows into their tokens' (``combine``, with and without routing
    weights): a Gluon API change fails in CI, not on a user's GPU. Its PTX must hold the TMA copies (gathered: 16-byte
    cp.async copies, waited for before the wgmma, each with a source size, so that rows past their group's end are
    zero-filled without being read; combined: 16-byte reductions, no TMA store; claimed tiles: one 32-bit atomic add)
    and 256-wide wgmma products (gated: the gate and up tiles in one), its three warpgroups must meet only among
    themselves (128-thread named barriers: between them only mbarriers), its shared memory must fit a Hopper
    multiprocessor, and its SASS must never touch an accumulator while a wgmma may still write it (ptxas once hoisted
    the fp16 gated epilogue's reads: v20)."""
    from prmc.kernels import gluon_gemm as gg

    if gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    block_n = gg.BLOCK_N[gated]
    b_block = [block_n, gg.BLOCK_K] if k_contig else [gg.BLOCK_K, block_n]
    constants = dict(
        K_CONTIG=k_contig, GATED=gated, ACTIVATION=activation, GATHER=gather, COMBINE=combine is not None,
        SCALED=combine == "scaled", CLAIM=claim, STAGES=gg.STAGES, GROUP=gg.GROUP, REGISTERS=gg.REGISTERS,
    )  # fmt: skip
    c_block = (dtype, [gg.SUB_M, gg.PIECE])
    signature = dict(
        a_desc=(dtype, [gg.SUB_M, gg.BLOCK_K]), b_desc=(dtype, b_block), c_desc=c_block, h_desc=c_block,
        a_ptr=f"*{dtype}", stride_am="i32", a_rows_ptr="*i64", c_ptr=f"*{dtype}", stride_cm="i32", h_ptr=f"*{dtype}",
        stride_hm="i32", tokens_ptr="*i64", scale_ptr=f"*{dtype}", offsets_ptr="*i32", M="i32", N="i32",
        K="i32", E="i32", next_tile_ptr="*i32",
    )  # fmt: skip
    kernel = compile_for_hopper(gg.grouped_gemm_kernel, signature, constants, maxnreg=gg.REGISTERS)
    assert accumulator_reads_in_flight(cuobjdump(kernel, "-sass")) == []
    ptx = kernel.asm["ptx"]
    assert set(re.findall(r"bar\.sync\s+\w+, (\w+);", ptx)) == {"128"}
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async.sync.aligned.m64n256k16" in ptx  # gated: both halves
    assert ("cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx) == gather
    if gather:  # 16 bytes per copy, and a source size (0 past the group's end: ZERO_PAST)
        copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)(, %r\w+)?;", ptx)
        assert {size for size, _ in copies} == {"0x10"} and all(src_size for _, src_size in copies)
    atomics = re.findall(r"(?:red|atom)\.global\.\S*add\S*", ptx)  # (Triton 3.6 writes the reductions as atom, 3.9 red)
    claims = [a for a in atomics if a.endswith(".u32")]
    assert len(claims) == claim  # (CLAIM: the claim of the next tile by CLAIMING_WARPGROUP, _claim_tile)
    reductions = set(atomics) - set(claims)
    suffix = {"bf16": ".add.noftz.v8.bf16", "fp16": ".add.noftz.v8.f16"}[dtype]  # 16 bytes per reduction
    assert bool(reductions) == bool(combine) and all(r.endswith(suffix) for r in reductions), reductions
    assert ("cp.async.bulk.tensor.2d.global.shared" in ptx) != bool(combine)  # (combined: no TMA store)
    assert kernel.metadata.shared <= 232448  # bytes of shared memory a Hopper block may have


@pytest.mark.parametrize("dtype, epilogue, gather, k_contig", [("bf16", "gate_up", True, True), ("fp32", "store", False, False)])
def test_triton_grouped_gemm_compiles_for_hopper(dtype, epilogue, gather, k_contig):
    """The Triton row-grouped kernel where it runs on Hopper (fp32, and what the Gluon kernel does not take), at a tile
    its autotuner offers there: its TMA descriptors are made on the device (``tensormap.replace``, for B and for an A
    that is not gathered), so that no config needs a pre-hook and the autotuner keeps its pick on disk
    (``_triton_common.AUTOTUNE``), and it loads through them (``cp.async.bulk.tensor``). The interpreter runs these
    descriptors without compiling them."""
    from prmc.kernels import grouped_gemm as gg

    signature = dict(
        a_ptr=f"*{dtype}", a_rows_ptr="*i64", offsets_ptr="*i32", b_ptr=f"*{dtype}", c_ptr=f"*{dtype}", h_ptr=f"*{dtype}",
        M="i32", N="i32", K="i32", E="i32", NUM_PROGRAMS="i32", stride_am="i32", stride_ak="i32", stride_be="i32",
        stride_bk="i32", stride_bn="i32", stride_cm="i32", stride_cn="i32", stride_hm="i32", stride_hn="i32",
    )  # fmt: skip
    gated = epilogue == "gate_up"
    constants = dict(
        EPILOGUE=epilogue, GATHER_A=gather, ACTIVATION="silu", GATED=gated, FP32_DOT=dtype == "fp32", A_DESC=not gather,
        B_DESC=True, B_K_CONTIG=k_contig, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP=8, EVEN_K=True, EVEN_N=True,
    )  # fmt: skip
    assert gg.grouped_gemm_kernel.fn.fn.arg_names == [*signature, *constants]  # every argument named, in order
    ptx = compile_for_hopper(gg.grouped_gemm_kernel, signature, constants, num_warps=8, num_stages=3).asm["ptx"]
    descriptors = len(re.findall(r"tensormap\.replace\.tile\.global_address", ptx))
    assert descriptors == 2 - gather and "cp.async.bulk.tensor" in ptx


@pytest.mark.parametrize(
    "dtype, transposed, gather", [("bf16", False, False), ("fp16", False, False), ("bf16", True, False), ("bf16", False, True), ("bf16", True, True)]
)  # fmt: skip
def test_gluon_weight_grad_compiles_for_hopper(dtype, transposed, gather):
    """The Gluon K-grouped weight-gradient kernel, as above (also with its tiles over the transposed product, and
    with L's rows gathered): TMA copies (gathered, 16-byte cp.async copies of L), 256-wide wgmma products with the L
    tile transposed, the last k-step's L tile read into registers transposed (``ldmatrix .trans``) to zero the next
    group's rows, shared memory that fits, and no accumulator touched while a wgmma may write it."""
    from prmc.kernels import gluon_weight_grad as wg

    if wg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    signature = dict(
        l_desc=(dtype, [wg.BLOCK_K, wg.BLOCK_P]), r_desc=(dtype, [wg.BLOCK_K, wg.BLOCK_Q]),
        o_desc=(dtype, [wg.BLOCK_Q, wg.BLOCK_P] if transposed else [wg.BLOCK_P, wg.BLOCK_Q]), o_ptr=f"*{dtype}",
        offsets_ptr="*i32", l_ptr=f"*{dtype}", stride_l="i32", rows_ptr="*i64", M="i32", P="i32", Q="i32", E="i32",
    )  # fmt: skip
    constants = dict(TRANSPOSED=transposed, GATHER=gather, STAGES=wg.STAGES, GROUP=wg.GROUP, num_warps=wg.NUM_WARPS)
    kernel = compile_for_hopper(wg.weight_grad_kernel, signature, constants)
    assert accumulator_reads_in_flight(cuobjdump(kernel, "-sass")) == []
    ptx = kernel.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "ldmatrix.sync.aligned.m8n8.x4.trans" in ptx
    assert ("cp.async.cg.shared.global" in ptx and "cp.async.wait_group" in ptx) == gather
    if gather:  # 16 bytes per copy
        assert set(re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)) == {"0x10"}
    assert f"wgmma.mma_async.sync.aligned.m64n256k16.f32.{dtype[0]}" in ptx
    assert kernel.metadata.shared <= 232448


def check_gather_rows() -> dict[str, float]:
    from prmc.kernels.check import rel_err
    from prmc.kernels.gather_rows import gather_rows

    src = torch.randn(23, 40, dtype=torch.bfloat16)
    rows = torch.randint(0, 23, (37,))
    return {"gather": rel_err(gather_rows(src, rows), src[rows]), "empty": float(gather_rows(src, rows[:0]).shape != (0, 40))}


def check_combine_rows() -> dict[str, float]:
    """A random permutation of the slots, unrouted rows (a token with all its rows unrouted gets zero),
    top-1 (the expert-parallel un-permute); deterministic."""
    from prmc.kernels.check import rel_err
    from prmc.kernels.combine import combine_rows

    tokens, top_k = 13, 4
    m, routed = tokens * top_k, (tokens - 1) * top_k
    slots = torch.randperm(m)
    order = torch.cat([slots[slots // top_k != 3], torch.arange(3 * top_k, 4 * top_k)])  # token 3: unrouted
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(m)
    y, scale = torch.randn(m, 33), torch.rand(m) + 0.1  # scale in slot order
    offsets = torch.tensor([20, 20, routed], dtype=torch.int32)  # an empty group

    def expected(k, s):
        contrib = y[:routed].double() * (s[order[:routed]].double()[:, None] if s is not None else 1.0)
        return torch.zeros(m // k, 33, dtype=torch.float64).index_add_(0, order[:routed] // k, contrib)

    out = combine_rows(y, inverse, top_k, offsets, scale)
    return {
        "scaled": rel_err(out, expected(top_k, scale)),
        "unscaled": rel_err(combine_rows(y, inverse, top_k, offsets), expected(top_k, None)),
        "top-1": rel_err(combine_rows(y, inverse, 1, offsets, scale), expected(1, scale)),
        "bitwise repeatable": float(not torch.equal(out, combine_rows(y, inverse, top_k, offsets, scale))),
        "unrouted token is zero": out[3].abs().max().item(),
    }


def check_sort_by_expert() -> dict[str, float]:
    """Each output element for element against a stable torch.sort (errors: how many differ)."""
    from prmc.kernels.sort_by_expert import blocking, sort_by_expert

    def mismatches(ids, experts):
        flat = ids.reshape(-1).long()
        keys = torch.where((flat >= 0) & (flat < experts), flat, experts)
        order = torch.sort(keys, stable=True).indices
        counts = torch.bincount(keys, minlength=experts + 1)[:experts]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.shape[0])
        expected = (order, counts, counts.cumsum(0).to(torch.int32), inverse)
        return sum(
            float((got != want).sum()) if got.shape == want.shape and got.dtype == want.dtype else float("inf")
            for got, want in zip(sort_by_expert(ids, experts), expected)
        )

    skipped = torch.randint(0, 5, (31, 3))
    skipped += skipped >= 2  # expert 2 of 6 gets nothing
    # several segments of several chunks, the last one short
    _, chunk, seg = blocking(150, 7)
    layout_ok = seg > chunk and 150 // seg >= 2 and 150 % seg
    return {
        "random": mismatches(torch.randint(0, 5, (37, 3)), 5),
        "out of range both sides": mismatches(torch.randint(-3, 8, (37, 3)), 5),
        "one expert": mismatches(torch.randint(-1, 2, (29, 2)), 1),
        "empty expert, 6 experts": mismatches(skipped, 6),
        "int32": mismatches(torch.randint(-2, 7, (37, 3), dtype=torch.int32), 5),
        "uint8": mismatches(torch.randint(0, 8, (37, 3), dtype=torch.uint8), 6),
        "no slots": mismatches(torch.zeros(0, 3, dtype=torch.int64), 4),
        "segments": mismatches(torch.randint(-1, 8, (150, 1)), 7) if layout_ok else float("inf"),
        "40 experts: several programs scan the counts": mismatches(torch.randint(-1, 41, (53, 4)), 40),
        "past MAX_EXPERTS (torch path)": mismatches(torch.randint(-1, 700, (37, 3)), 600),
    }


def check_grouped_gemm_loads() -> dict[str, float]:
    """The grouped GEMM reading through TMA descriptors and through pointers, each against the float64
    product: the gate_up product on pre-gathered rows and gathering on load, the store product with
    K-contiguous and N-contiguous weights, with an empty group and unrouted rows; and descriptors refused
    where TMA cannot read (a stride that is not a multiple of 16 bytes)."""
    from prmc.kernels.check import random_routing, rel_err
    from prmc.kernels._triton_common import tma_reads
    from prmc.kernels.grouped_gemm import grouped_gemm

    tokens, hidden, inter, experts, top_k = 29, 48, 40, 5, 2
    order, _, offsets = random_routing(tokens, experts, top_k, "cpu", hot=2, unrouted=3)
    rows, m = order // top_k, order.shape[0]

    # the hot experts' groups hold the same tokens in the same order, so the pre-gathered A is not x[rows]:
    # a load from the wrong group would go unseen
    x, a_sorted = torch.randn(tokens, hidden), torch.randn(m, hidden)
    w_gate_up = torch.randn(experts, 2 * inter, hidden) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter) / inter**0.5
    errors = {}
    for tma in (True, False):
        for name, a, a_rows, a_ref in [("pre-gathered", a_sorted, None, a_sorted), ("gather on load", x, rows, x[rows])]:
            preact, h = torch.empty(m, 2 * inter), torch.empty(m, inter)
            grouped_gemm("gate_up", a, offsets, w_gate_up.transpose(1, 2), preact, n=inter, a_rows=a_rows, h=h, gated=True, tma=tma)
            preact_ref = _row_products(a_ref, w_gate_up.transpose(1, 2), offsets)
            errors[f"gate_up {name}, tma={tma}"] = rel_err(preact, preact_ref)
            errors[f"gate_up {name} h, tma={tma}"] = rel_err(h, reference.activate(preact_ref, "silu", True))
        for name, b in [("K-contiguous weight", w_down.transpose(1, 2)), ("N-contiguous weight", w_down)]:
            a = torch.randn(m, b.shape[1])
            c = torch.empty(m, b.shape[2])
            grouped_gemm("store", a, offsets, b, c, n=b.shape[2], tma=tma)
            errors[f"store {name}, tma={tma}"] = rel_err(c, _row_products(a, b, offsets))
    errors["descriptors where aligned"] = float(not tma_reads(x))
    errors["no descriptor for a 132-byte stride"] = float(tma_reads(torch.randn(7, 33)))
    return errors


def check_weight_grad_loads() -> dict[str, float]:
    """The weight gradient reading through device-side TMA descriptors (one per group, bounded by its end) and
    through pointers, each against the float64 product per group: sorted operands, either one gathered on
    load, an empty group, unrouted rows past offsets[-1], and a layout TMA cannot read (pointer fallback)."""
    from prmc.kernels.check import random_routing, rel_err
    from prmc.kernels.weight_grad import weight_grad

    tokens, p, q, experts, top_k = 29, 48, 40, 5, 2
    order, _, offsets = random_routing(tokens, experts, top_k, "cpu", hot=2, unrouted=3)
    rows, m = order // top_k, order.shape[0]

    # A row past a group's end changes a sum only where both operands hold it (TMA zero-fills each one past
    # the group's end); random rows in both make any such row show.
    left, right, x = torch.randn(m, p), torch.randn(m, q), torch.randn(tokens, q)
    unaligned = torch.randn(m, q + 1)[:, :q]  # a 164-byte row stride: no descriptor
    errors = {}
    for tma in (True, False):
        for name, args, kwargs, ref in [
            ("sorted", (left, right), {}, (left, right)),
            ("right gathered on load", (left, x), {"right_rows": rows}, (left, x[rows])),
            ("left gathered on load", (x, left), {"left_rows": rows}, (x[rows], left)),
            ("unaligned right", (left, unaligned), {}, (left, unaligned)),
        ]:
            out = torch.full((experts, *(a.shape[1] for a in args)), float("nan"))
            weight_grad(*args, offsets, out, tma=tma, **kwargs)
            errors[f"{name}, tma={tma}"] = rel_err(out, _k_products(*ref, offsets))
    return errors


EXTRA_CHECKS = {
    "grouped_gemm_loads": check_grouped_gemm_loads,
    "weight_grad_loads": check_weight_grad_loads,
    "gather_rows": check_gather_rows,
    "combine_rows": check_combine_rows,
    "sort_by_expert": check_sort_by_expert,
}


def _gluon_stand_ins(name: str) -> dict[str, float]:
    """check_case with the Gluon launchers replaced by torch products of the same contract, and TMA taken to read
    every operand: the layer's choice of gathering in the GEMM or reading one copy (triton_moe._Routed), which
    operand each GEMM gathers, by which rows. Counts the launches that gathered and the copies made."""
    from prmc.kernels import gluon_gemm, gluon_weight_grad, triton_moe

    def weight_operand(a, b, c, h=None, a_rows=None):
        return (b, a_rows is not None) if a.dtype == torch.bfloat16 else None

    def row_product(a, offsets, weight, c, h=None, activation="silu", a_rows=None, combine=None):
        b, gathered = weight
        assert gathered == (a_rows is not None)
        ran.append("row gathered" if gathered else "row combined" if combine is not None else "row")
        a = a[a_rows] if gathered else a
        products = _row_products(a, b, offsets)
        if combine is not None:  # each routed row, times its weight and rounded, added into its token's row
            routed = int(offsets[-1])
            weights = combine.scale[:routed, None].double() if combine.scale is not None else 1.0
            rows = (products[:routed] * weights).to(c.dtype).double()
            c.copy_(c.double().index_add_(0, combine.tokens[:routed], rows))
            return
        c.copy_(products)
        if h is not None:
            h.copy_(reference.activate(c.float(), activation, True))

    def k_grouped_mm(left, right, offsets, left_rows=None, right_rows=None):
        ran.append("k gathers left" if left_rows is not None else "k gathers right" if right_rows is not None else "k")
        left = left[left_rows] if left_rows is not None else left
        right = right[right_rows] if right_rows is not None else right
        return _k_products(left, right, offsets).to(left.dtype)

    def gather_rows(src, rows):
        ran.append("copy")
        return saved["gather_rows"](src, rows)

    stand_ins = dict(
        weight_operand=(gluon_gemm, weight_operand), grouped_gemm=(gluon_gemm, row_product),
        takes=(gluon_weight_grad, lambda left, right, shape, *rows: left.dtype == torch.bfloat16),
        k_grouped_mm=(gluon_weight_grad, k_grouped_mm), tma_reads=(triton_moe, lambda t: True),
        gather_rows=(triton_moe, gather_rows),
        MAX_GATHERED_COLUMNS=(triton_moe, 0 if "wide" in name else triton_moe.MAX_GATHERED_COLUMNS),
        MAX_WEIGHT_GRAD_GATHERED_COLUMNS=(triton_moe, 0 if "wide" in name else triton_moe.MAX_WEIGHT_GRAD_GATHERED_COLUMNS),
    )  # fmt: skip
    saved = {key: getattr(module, key) for key, (module, _) in stand_ins.items()}
    ran = []
    for key, (module, value) in stand_ins.items():
        setattr(module, key, value)
    torch.use_deterministic_algorithms("deterministic" in name)
    try:
        errors = check_case(CASES[name], "cpu")
    finally:
        torch.use_deterministic_algorithms(False)
        for key, (module, _) in stand_ins.items():
            setattr(module, key, saved[key])
    # Per pass (scaled, unscaled). Gathered in the GEMMs: the gate_up forward, grad_h, both weight gradients (the down
    # one's left operand grad_out[rows], the gate_up one's right operand x[rows]): no copy. Past the MAX_*GATHERED_COLUMNS
    # only grad_h gathers: three copies, grad_out's read by the down weight gradient alone.
    # The down forward and grad_x (the "row" products) add their rows into the tokens' where H is whole tiles.
    combined = "combined" in name and "deterministic" not in name
    row = "row combined" if combined else "row"
    gathered = ["row gathered", row, "row gathered", "k gathers left", row, "k gathers right"]
    wide = ["copy", "row", "row", "row gathered", "copy", "k", "row", "copy", "k"]
    expected = 2 * (wide if "wide" in name else gathered)
    errors["launches as expected"] = float(ran != expected)
    return errors


def run_case(name: str) -> dict[str, float]:
    if name in EXTRA_CHECKS:
        return EXTRA_CHECKS[name]()
    if "gluon" in name:
        return _gluon_stand_ins(name)
    if "cutlass" not in name and "cublas" not in name:
        return check_case(CASES[name], "cpu")
    from prmc.kernels import cublas, cutlass

    saved = cutlass.takes, cublas.takes, cublas.k_mm
    cutlass.takes = lambda *tensors: all(t.dtype == torch.bfloat16 and t.numel() for t in tensors)
    cublas.takes = lambda offsets, rows, *tensors: "cublas" in name and cutlass.takes(*tensors)
    ran = []  # the cuBLAS products that ran: the case must reach them
    cublas.k_mm = lambda *args: ran.append("k_mm") or saved[2](*args)
    try:
        errors = check_case(CASES[name], "cpu")
    finally:
        cutlass.takes, cublas.takes, cublas.k_mm = saved
    assert ("cublas" in name) == ("k_mm" in ran), (name, ran)
    return errors


def _count_unpinned_launches() -> dict[str, int]:
    """{kernel: its launches without ``LAUNCH_OPTIONS``}, kept up to date by every interpreted launch from now on."""
    from triton.runtime.interpreter import InterpretedFunction

    from prmc.kernels._triton_common import LAUNCH_OPTIONS

    counts = {}
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        name = self.fn.__name__
        counts[name] = counts.get(name, 0) + any(kwargs.get(k) != v for k, v in LAUNCH_OPTIONS.items())
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    return counts


if __name__ == "__main__":
    torch.manual_seed(0)
    unpinned = _count_unpinned_launches()
    print(json.dumps({**{name: run_case(name) for name in sys.argv[1:]}, UNPINNED: unpinned}))
