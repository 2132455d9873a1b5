"""Checks of the Triton launchers against :mod:`prmc.kernels.reference`, shared by the CPU interpreter
tests (``tests/test_kernels.py``) and the full-size GPU check (``benchmarks/check_kernels_gpu.py``); and
``compile_for_hopper``, which builds a Gluon kernel for sm90a on a machine without a GPU.

Every check draws fresh random inputs (never zeros) and compares each output of each op, forward and
backward, with the reference computed in float64: ``|out - ref| / |ref|`` over the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prmc.kernels import reference


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64; NaN or a shape mismatch counts as infinitely wrong."""
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.double(), ref.double()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if err == err else float("inf")


def random_routing(
    tokens: int, experts: int, top_k: int, device, *, hot: int = 0, unrouted: int = 0, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order [T*K] int64, inverse [T*K] int64, offsets [E] int32) of a random top-k routing, as
    ``sort_by_expert`` gives them.

    ``hot``: that many experts (at the end of the list) take ~90% of the choices, the rest share ~10%,
    and the first expert gets none (an empty group). ``unrouted``: that many routed rows are dropped from
    the groups (``offsets[-1] < M``), the rows no expert owns.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = torch.rand(tokens, experts, generator=gen)
    if hot:
        logits[:, -hot:] += 1.0
        logits[:, 0] = -1.0
    expert_ids = logits.topk(top_k, dim=-1).indices.to(device)
    order, counts, _, inverse = reference.sort_by_expert(expert_ids, experts)
    if unrouted:
        counts = counts.clone()
        drop = unrouted
        for e in reversed(range(experts)):  # take them off the last non-empty groups
            take = min(drop, int(counts[e]))
            counts[e] -= take
            drop -= take
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return order, inverse, offsets


@dataclass
class Case:
    tokens: int
    hidden: int
    inter: int
    experts: int
    top_k: int
    dtype: torch.dtype = torch.float32
    activation: str = "silu"
    gated: bool = True
    hot: int = 0
    unrouted: int = 0
    transposed_weights: bool = False  # weights as transposed views of [E, H, F] / [E, I, H] storage


def _backward(impl, grad_out, grad_preact, x, order, inverse, top_k, offsets, w_gate_up, w_down, preact, scale, case):
    """(grad_x, grad_w_gate_up, grad_w_down, grad_scale) from ``impl``'s two backward functions (triton_moe's or the
    reference's), chained as the op's autograd chains them."""
    dpre, grad_w_down, grad_scale = impl.experts_backward_down(
        grad_out, grad_preact, order, top_k, offsets, w_down, preact, scale, case.activation, case.gated
    )  # fmt: skip
    grad_x, grad_w_gate_up = impl.experts_backward_gate_up(dpre, x, order, inverse, top_k, offsets, w_gate_up)
    return grad_x, grad_w_gate_up, grad_w_down, grad_scale


def check_case(case: Case, device) -> dict[str, float]:
    """Relative error of every output of the expert ops, forward and backward, Triton launchers vs reference."""
    from prmc.kernels import triton_moe

    dev = torch.device(device)
    order, inverse, offsets = random_routing(
        case.tokens, case.experts, case.top_k, dev, hot=case.hot, unrouted=case.unrouted
    )  # fmt: skip
    k = case.top_k
    m, f = order.shape[0], (2 if case.gated else 1) * case.inter

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(case.dtype)

    x = randn(case.tokens, case.hidden)
    if case.transposed_weights:
        w_gate_up = randn(case.experts, case.hidden, f, scale=case.hidden**-0.5).transpose(1, 2)
        w_down = randn(case.experts, case.inter, case.hidden, scale=case.inter**-0.5).transpose(1, 2)
    else:
        w_gate_up = randn(case.experts, f, case.hidden, scale=case.hidden**-0.5)
        w_down = randn(case.experts, case.hidden, case.inter, scale=case.inter**-0.5)
    scale = torch.rand(m, device=dev, dtype=case.dtype) + 0.1
    grad_out = randn(case.tokens, case.hidden)

    def d(t):  # float64 copy for the reference
        return t.double() if t is not None else None

    errors = {}
    for name, s in [("scaled", scale), ("unscaled", None)]:
        args = (order, inverse, k, offsets)
        out, preact = triton_moe.experts(x, *args, w_gate_up, w_down, s, case.activation, case.gated)
        out_ref, preact_ref = reference.experts(d(x), *args, d(w_gate_up), d(w_down), d(s), case.activation, case.gated)
        errors[f"{name}.out"] = rel_err(out, out_ref)
        errors[f"{name}.preact"] = rel_err(preact, preact_ref)
        # The backward takes the kernel's preact (rounded as the op saves it) so both sides see one input;
        # the unscaled pass also sends a gradient into preact itself (differentiable, never used by prmc).
        grad_preact = randn(m, f) if s is None else None
        grads = _backward(triton_moe, grad_out, grad_preact, x, *args, w_gate_up, w_down, preact, s, case)
        grads_ref = _backward(
            reference, d(grad_out), d(grad_preact), d(x), *args, d(w_gate_up), d(w_down), d(preact), d(s), case
        )  # fmt: skip
        names = ["grad_x", "grad_w_gate_up", "grad_w_down"] + (["grad_scale"] if s is not None else [])
        for grad_name, grad, grad_ref in zip(names, grads, grads_ref):
            errors[f"{name}.{grad_name}"] = rel_err(grad, grad_ref)
    return errors


def tolerance(dtype: torch.dtype) -> float:
    """fp32 products are exact (ieee), so only summation order differs; bf16/fp16 round operands."""
    return 1e-5 if dtype == torch.float32 else 1.5e-2


def compile_for_hopper(kernel, signature: dict, constants: dict, **options):
    """A Gluon kernel compiled for sm90a with the installed Triton, on any machine (no GPU needed): Gluon has no
    interpreter, so the tests check what it compiles to and benchmarks/check_kernels_gpu.py its numbers on the GPU.
    A Triton kernel too (its autotuner and heuristics unwrapped, ``constants`` giving what they would): the
    interpreter runs its Hopper paths without compiling them. ``signature``: its arguments' types, where a tensor
    descriptor is given by (dtype, block); ``constants``: its constexpr arguments; ``options``: the compiler's
    (``num_warps`` defaults to the constant of that name; the launches' ``LAUNCH_OPTIONS`` apply unless given).
    Pointers and strides are taken 16-aligned, as the launcher's specialization finds them at the model's sizes (the
    cp.async gathers need 16-byte source rows)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    from prmc.kernels._triton_common import LAUNCH_OPTIONS
    from prmc.kernels.gluon_gemm import gl

    def descriptor(dtype, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, getattr(gl, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
        return f"tensordesc<{dtype}[{block[0]}, {block[1]}],{layout!r}>"

    while not isinstance(kernel, triton.runtime.JITFunction):  # an autotuner's or heuristics' kernel
        kernel = kernel.fn
    signature = {name: descriptor(*kind) if isinstance(kind, tuple) else kind for name, kind in signature.items()}
    aligned = {
        (kernel.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items() if kind.startswith("*") or name.startswith("stride")
    }  # fmt: skip
    source_type = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    source = source_type(kernel, {**signature, **{name: "constexpr" for name in constants}}, constants, aligned)
    options = {**LAUNCH_OPTIONS, "num_warps": constants.get("num_warps", 4), **options}
    return triton.compile(source, target=GPUTarget("cuda", 90, 128), options=options)


def cuobjdump(kernel, flag: str) -> str:
    """Triton's bundled ``cuobjdump <flag>`` (``-sass``, ``--dump-resource-usage``) on a compiled kernel's cubin."""
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def accumulator_reads_in_flight(sass: str) -> list[str]:
    """The instructions of ``sass`` (``cuobjdump -sass``) that touch a wgmma accumulator register while a wgmma
    (HGMMA) writing it may still be in flight, which reads or clobbers partial sums; [] when there are none.

    In program order: an HGMMA's accumulator (its first operand, N / 2 fp32 registers per thread of a 64 x N
    product) is in flight until a ``WARPGROUP.DEPBAR.LE gsb0, n`` leaves no HGMMA group pending; warp-specialized
    partitions (``SETMAXREG``) and ``EXIT`` start afresh. Branches are not followed, so a read reached only by a
    jump is not seen: a check of what ptxas scheduled, not a proof."""
    import re

    pending, in_flight, found = 0, set(), []
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if not match:
            continue
        instruction = match.group(1)
        hgmma = re.search(r"HGMMA\.64x(\d+)x\d+\.F32\S*\s+R(\d+),", instruction)
        if hgmma:
            base = int(hgmma.group(2))
            in_flight |= set(range(base, base + int(hgmma.group(1)) // 2))
            pending += "gsb0" in instruction
            continue
        wait = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\d+)", instruction)
        if wait:
            pending = min(pending, int(wait.group(1)))
            in_flight = in_flight if pending else set()
        elif "SETMAXREG" in instruction or instruction.startswith("EXIT"):
            pending, in_flight = 0, set()
        elif in_flight and {int(r) for r in re.findall(r"\bR(\d+)\b", instruction)} & in_flight:
            found.append(instruction)
    return found
