"""One MoE layer's experts on the GPU: prmc ops vs transformers' experts vs a balanced cuBLAS ceiling.

    PYTHONPATH=. python benchmarks/moe_layer.py [--tokens 8192] [--configs qwen3,olmoe] [--out DIR]
    python benchmarks/moe_layer.py --plot benchmarks/results/moe_layer.json     # table + PNG from saved numbers
    PYTHONPATH=. python benchmarks/moe_layer.py --energy --configs qwen3-30b-a3b   # mJ per step and per kernel (NVML)
    PYTHONPATH=. python benchmarks/moe_layer.py --energy --ab --configs olmoe       # the same, for an A/B: fewer lines

Each method gets the same bf16 tokens, the same top-k expert ids and routing weights (the router is not
timed: it is the model's own code either way) and the same expert weights [E, 2I, H] / [E, H, I]:

- prmc:                 torch.ops.prmc.sort_by_expert -> experts (Triton, Gluon and CUTLASS kernels) under
                        ``torch.compile``, as ``backend="prmc"`` lowers a block and hands it to Inductor (the
                        compiled backward frees what the ops' backward no longer reads)
- tf grouped_mm+Inductor: transformers 5.17 ``Qwen3MoeExperts`` (``_experts_implementation="grouped_mm"``)
                        under ``torch.compile``
- tf eager loop:        the same module with ``"eager"`` (a Python loop over experts)
- cuBLAS bmm ceiling:   ``torch.bmm`` on a perfectly balanced batch of the same FLOPs (T*K/E rows each):
                        the six GEMMs in the layouts they need and the gated activation (forward, and backward
                        with h recomputed) fused by Inductor between them; no routing, gather or combine
                        (``BalancedExperts``; until v35 autograd's bmm backward, ~5x its forward).

Times are ``triton.testing.do_bench`` medians, each method and mode timed once per round over ``--rounds``
rounds (3), the table giving the median of the rounds, the speed-up's range over them and the SM clock
sampled during each of prmc's timings (the H200 runs at its power cap: the clock moves). fwd+bwd runs backward to x and both weights (and the
routing weights where the method has them as an input), with ``.grad`` set to None before each step, as
``optimizer.zero_grad()`` does. TFLOP/s counts the expert GEMMs only: 6*T*K*H*I forward, 3x that for
fwd+bwd. Peak memory is the most allocated during one step beyond what was allocated before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from prmc.kernels import reference

CONFIGS = {  # name: (hidden, intermediate, experts, top_k, hot experts)
    "deepseek-v2-lite": (2048, 1408, 64, 6, 0),
    "olmoe": (2048, 1024, 64, 8, 0),
    "qwen3-30b-a3b": (2048, 768, 128, 8, 0),
    "qwen3-30b-a3b skewed": (2048, 768, 128, 8, 8),
    "mixtral-8x7b": (4096, 14336, 8, 2, 0),
}
METHODS = ["prmc", "tf grouped_mm+Inductor", "tf eager loop", "cuBLAS bmm ceiling"]


def make_routing(tokens, experts, top_k, hot, device):
    """Top-k of random logits; with ``hot``, that many experts get a +3 logit bias (about 3/4 of the
    choices then go to them)."""
    logits = torch.randn(tokens, experts, device=device)
    if hot:
        logits[:, :hot] += 3.0
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return ids, (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16)


def prmc_experts(x, ids, weights, w_gate_up, w_down):
    top_k = ids.shape[1]
    order, _, offsets, inverse = torch.ops.prmc.sort_by_expert(ids, w_gate_up.shape[0])
    scale = weights.reshape(-1)  # slot order
    return torch.ops.prmc.experts(x, order, inverse, top_k, offsets, w_gate_up, w_down, scale, "silu", True)[0]


def transformers_experts(hidden, inter, experts, top_k, implementation):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k, hidden_act="silu"
    )  # fmt: skip
    config._experts_implementation = implementation
    return Qwen3MoeExperts(config)


@torch.compile(fullgraph=True, dynamic=False)
def _gated(preact):
    return reference.activate(preact, "silu", True)


@torch.compile(fullgraph=True, dynamic=False)
def _gated_backward(g, preact):
    """(d preact, h) from g = dL/dh: the reference's activation backward as one fused pass, h recomputed (as prmc's
    mlp_grad_rows does)."""
    p = preact.float()
    d_preact = reference.activate_backward(g.float(), p, "silu", True)
    return d_preact.to(preact.dtype), reference.activate(p, "silu", True).to(preact.dtype)


class BalancedExperts(torch.autograd.Function):
    """The ceiling: the layer's six GEMMs on a perfectly balanced batch, ``x`` [E, n, H] -> [E, n, H], each one
    cuBLAS ``bmm`` in the layout it needs (the weight gradients come out in the weights' own [E, 2I, H] / [E, H, I]
    layout), the gated activation and its backward one fused Inductor pass each. Autograd's own bmm backward
    would add transposed weight-gradient copies and unfused activation passes (v34's table: its fwd+bwd took
    ~5x its forward), so the ceiling would measure those, not the GEMMs."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down):
        preact = torch.bmm(x, w_gate_up.transpose(1, 2))
        ctx.save_for_backward(x, w_gate_up, w_down, preact)
        return torch.bmm(_gated(preact), w_down.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, w_gate_up, w_down, preact = ctx.saved_tensors
        d_preact, h = _gated_backward(torch.bmm(grad, w_down), preact)
        grad_w_down = torch.bmm(grad.transpose(1, 2), h)
        del h
        grad_x = torch.bmm(d_preact, w_gate_up)
        return grad_x, torch.bmm(d_preact.transpose(1, 2), x), grad_w_down


class SMClock:
    """Samples the GPU's SM clock (MHz) every ``interval`` s while a timing runs, through NVML (``pynvml``, which
    ``torch.cuda.clock_rate`` uses too), and whether the power cap is holding the clock down at that moment;
    ``median`` is None where NVML is missing. Under the H200's power cap the clock moves during a run, so each
    timing carries the clock it ran at. ``energy_mj()`` reads NVML's energy counter (mJ since the driver loaded)."""

    def __init__(self, device, interval=0.01):
        self.interval, self.samples, self.capped = interval, [], []
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self._read = lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
            # "clocks event reasons" were "throttle reasons" in older nvidia-ml-py; the SW power cap bit is 0x4 in both
            reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons"
            )
            self._capped = lambda: bool(reasons(handle) & 0x4)
            self.energy_mj = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.power_limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3
        except Exception:  # no NVML: timings without clocks (and --energy cannot run)
            self._read = None

    def __enter__(self):
        import threading

        self.samples, self.capped, self._stop = [], [], threading.Event()
        if self._read is not None:
            def poll():
                while not self._stop.wait(self.interval):
                    self.samples.append(self._read())
                    self.capped.append(self._capped())

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._read is not None:
            self._thread.join()

    @property
    def median(self):
        return statistics.median_high(self.samples) if self.samples else None

    @property
    def available(self):
        return self._read is not None

    def now(self):
        """The SM clock (MHz) at this moment."""
        return self._read()

    @property
    def capped_share(self):
        """The share of the samples taken while the power cap (NVML's SW power cap reason) held the clock down."""
        return sum(self.capped) / len(self.capped) if self.capped else None


def prepare(fn, params, grad_out, backward: bool):
    """(step, peak extra GB): one step of fn() or fn().backward(grad_out), run once to compile and autotune
    and once more for the memory peak."""

    def step():
        for p in params:
            p.grad = None
        out = fn()
        if backward:
            out.backward(grad_out)

    step()  # compile / autotune outside the timing and the memory peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return step, (torch.cuda.max_memory_allocated() - base) / 1e9


def time_step(step, clock: SMClock, quick: bool):
    """(median ms, median SM MHz) of ``step``."""
    import triton

    # Half a second of steps before the timing: after the autotuner's or the compiler's work the H200's clocks
    # under its power cap take a while to settle (the same Mixtral forward read 10.39 then 9.37 ms in two
    # do_bench calls with 25 ms of warm-up, benchmarks/results/mixtral_fwd_profile_v9.log).
    with clock:
        ms = triton.testing.do_bench(step, warmup=5 if quick else 500, rep=20 if quick else 100, return_mode="median")
    return ms, clock.median


def method_runs(name, tokens, device):
    """({method: (fn, params, grad_out)}, {mode: GEMM FLOPs}): one layer's inputs and the four methods on them."""
    hidden, inter, experts, top_k, hot = CONFIGS[name]
    gemm_flops = 6 * tokens * top_k * hidden * inter
    flops = {"fwd": gemm_flops, "fwd+bwd": 3 * gemm_flops}  # the backward's GEMMs: twice the forward's
    torch.manual_seed(0)
    tf_grouped = transformers_experts(hidden, inter, experts, top_k, "grouped_mm").to(device, torch.bfloat16)
    tf_eager = transformers_experts(hidden, inter, experts, top_k, "eager").to(device, torch.bfloat16)
    with torch.no_grad():
        tf_grouped.gate_up_proj.normal_(0, hidden**-0.5)
        tf_grouped.down_proj.normal_(0, inter**-0.5)
    tf_eager.gate_up_proj, tf_eager.down_proj = tf_grouped.gate_up_proj, tf_grouped.down_proj
    w_gate_up, w_down = tf_grouped.gate_up_proj, tf_grouped.down_proj
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    ids, weights = make_routing(tokens, experts, top_k, hot, device)
    weights.requires_grad_()
    grad_out = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    rows_per_expert = tokens * top_k // experts
    x_balanced = torch.randn(experts, rows_per_expert, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_balanced = torch.randn(experts, rows_per_expert, hidden, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(tf_grouped)
    prmc_compiled = torch.compile(prmc_experts, dynamic=False)

    runs = {
        "prmc": (lambda: prmc_compiled(x, ids, weights, w_gate_up, w_down), [x, weights, w_gate_up, w_down], grad_out),
        "tf grouped_mm+Inductor": (lambda: compiled(x, ids, weights), [x, weights, w_gate_up, w_down], grad_out),
        "tf eager loop": (lambda: tf_eager(x, ids, weights), [x, weights, w_gate_up, w_down], grad_out),
        "cuBLAS bmm ceiling": (lambda: BalancedExperts.apply(x_balanced, w_gate_up, w_down), [x_balanced, w_gate_up, w_down], grad_balanced),
    }  # fmt: skip
    return runs, flops


def bench_config(name, tokens, device, rounds):
    runs, flops = method_runs(name, tokens, device)
    # Each method and mode is timed once per round, the rounds one after another, so that a change of clocks
    # during the run reaches every method alike; the table gives the median over the rounds (the eager loop,
    # 10-250 ms a step, is timed in the first round only).
    steps, results = {}, {}
    for method, (fn, params, g) in runs.items():
        for mode, backward in [("fwd", False), ("fwd+bwd", True)]:
            try:
                step, peak = prepare(fn, params, g, backward)
            except Exception as err:  # a failing baseline is reported, not fatal
                print(f"  {name} {method} {mode}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            steps[method, mode] = step
            results[f"{method}|{mode}"] = {"peak_gb": peak, "ms_rounds": [], "mhz_rounds": []}
    clock = SMClock(device)
    for round_ in range(rounds):
        for (method, mode), step in steps.items():
            quick = method == "tf eager loop"
            if quick and round_ > 0:
                continue
            ms, mhz = time_step(step, clock, quick)
            r = results[f"{method}|{mode}"]
            r["ms_rounds"].append(ms)
            r["mhz_rounds"].append(mhz)
            print(f"  {name:22s} {method:24s} {mode:8s} round {round_}: {ms:8.3f} ms {flops[mode] / ms / 1e9:6.0f} TFLOP/s "
                  f"{r['peak_gb']:6.2f} GB  SM {mhz} MHz", flush=True)  # fmt: skip
    for key, r in results.items():
        r["ms"] = statistics.median_high(r["ms_rounds"])
        r["tflops"] = flops[key.split("|")[1]] / r["ms"] / 1e9
    return results


def layer_inputs(name, tokens, device):
    """(x, w_gate_up, w_down, ids, weights, grad_out) of one layer, bf16, seeded: what --breakdown and
    --profile run on."""
    hidden, inter, experts, top_k, hot = CONFIGS[name]
    torch.manual_seed(0)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, **bf16)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, **bf16) * hidden**-0.5
    w_down = torch.randn(experts, hidden, inter, **bf16) * inter**-0.5
    ids, weights = make_routing(tokens, experts, top_k, hot, device)
    return x, w_gate_up, w_down, ids, weights, torch.randn(tokens, hidden, **bf16)


def breakdown_parts(name, tokens, device) -> dict:
    """{label: (run, GEMM FLOPs)}: each kernel launch of the prmc layer (fwd and bwd), in the layer's order, on
    the layer's own operands. Labels starting with "  alt" are other kernels for the product above them (what
    the layer chose against; not part of the step)."""
    from prmc.kernels import cublas, cutlass, gluon_gemm, gluon_weight_grad
    from prmc.kernels.combine import combine_rows
    from prmc.kernels.gather_rows import gather_rows
    from prmc.kernels.grouped_gemm import grouped_gemm
    from prmc.kernels.mlp_grad_rows import mlp_grad_rows
    from prmc.kernels.triton_moe import _combined_in_epilogue, gathered_row_weight, weight_grad_gathers
    from prmc.kernels.weight_grad import weight_grad

    hidden, inter, experts, top_k, _ = CONFIGS[name]
    bf16 = dict(device=device, dtype=torch.bfloat16)
    x, w_gate_up, w_down, ids, weights, grad_out = layer_inputs(name, tokens, device)
    order, _, offsets, inverse = torch.ops.prmc.sort_by_expert(ids, experts)
    rows, scale = order // top_k, weights.reshape(-1)
    m = rows.shape[0]
    h, preact = torch.empty(m, inter, **bf16), torch.empty(m, 2 * inter, **bf16)
    grad_out_rows = gather_rows(grad_out, rows)
    x_rows = gather_rows(x, rows)
    grouped_gemm("gate_up", x_rows, offsets, w_gate_up.transpose(1, 2), preact, n=inter, h=h, gated=True)
    g = cutlass.row_grouped_mm(grad_out_rows, w_down, offsets)
    dpre, _, hs = mlp_grad_rows(g, preact, offsets, scale, order, "silu", True)
    y = torch.empty(m, hidden, **bf16)
    g_alt = torch.empty_like(h)
    grad_w_down, grad_w_gate_up = torch.empty_like(w_down), torch.empty_like(w_gate_up)
    gemm = 2 * m * hidden * inter  # one [M, H] x [H, I] product
    few_large, bounds = cublas.takes(offsets, m, dpre, x, w_gate_up), cublas.group_bounds(offsets)

    def ranked(*choices):
        """(label, part) choices for one product, the one the layer runs first; the others are marked alt."""
        (label, part), *others = choices
        return {label: part, **{"  alt " + other: alt for other, alt in others}}

    def row_choices(product, a, b, c, flops, h=None, src=None):
        """The Gluon and Triton kernels for a row product (``h``: the gated gate_up epilogue; ``src``: ``a`` is
        ``src[rows]``, and the Gluon kernel gathering src's rows comes first where the layer runs it), the one the
        layer runs first (_row_product)."""
        if h is None:
            triton_run = lambda: grouped_gemm("store", a, offsets, b, c, n=c.shape[1])  # noqa: E731
        else:
            triton_run = lambda: grouped_gemm("gate_up", a, offsets, b, c, n=h.shape[1], h=h, gated=True)  # noqa: E731
        kind = "" if h is None else ", act"
        choices = [(f"{product} (Triton TMA{kind})", (triton_run, flops))]
        weight = gluon_gemm.weight_operand(a, b, c, h)
        if weight is not None:
            run = lambda: gluon_gemm.grouped_gemm(a, offsets, weight, c, h)  # noqa: E731
            choices.insert(0, (f"{product} (Gluon{kind})", (run, flops)))
        gathered = gathered_row_weight(src, rows, b, c, h) if src is not None else None
        if gathered is not None:
            run = lambda: gluon_gemm.grouped_gemm(src, offsets, gathered, c, h, "silu", rows)  # noqa: E731
            choices.insert(0, (f"{product} (Gluon{kind}, gathered)", (run, flops)))
        return choices

    def k_choices(product, left, right, shape, flops, per_expert=False, gathered=None):
        """A weight gradient's kernels in the layer's order (_weight_grad, experts_backward_*): the Gluon kernel on
        ``gathered`` (its operands: left, right, left_rows, right_rows; the routed one's rows gathered by cp.async)
        where the layer runs it, the Gluon kernel where it takes the operands, with ``per_expert`` cuBLAS per expert,
        then CUTLASS."""
        gathers = gathered is not None and weight_grad_gathers(*gathered[:2], shape, *gathered[2:])
        gather_run = lambda: gluon_weight_grad.k_grouped_mm(*gathered[:2], offsets, *gathered[2:])  # noqa: E731
        gluon = [(f"{product} (Gluon)", (lambda: gluon_weight_grad.k_grouped_mm(left, right, offsets), flops))]
        cublas_mm = [(f"{product} (cuBLAS per expert)", (lambda: cublas.k_mm(left, right, bounds), flops))]
        return (
            ([(f"{product} (Gluon, gathered)", (gather_run, flops))] if gathers else [])
            + (gluon if gluon_weight_grad.takes(left, right, shape) else [])
            + (cublas_mm if per_expert else [])
            + [(f"{product} (CUTLASS)", (lambda: cutlass.k_grouped_mm(left, right, offsets), flops))]
        )

    def combined(product, a, b, c, flops, combine_label, row_scale=None):
        """A product that goes back to token order: its combine in the Gluon epilogue where the layer runs that
        (_combined_in_epilogue; the output's allocation and zeroing included), the stored product and the combine
        pass then alt lines; else those two, in the sum."""
        stored = {
            **ranked(*row_choices(product, a, b, c, flops)),
            f"{product} combine{combine_label}": (lambda: combine_rows(c, inverse, top_k, offsets, row_scale), 0),
        }
        run = lambda: _combined_in_epilogue(a, offsets, b, rows, order, top_k, row_scale)  # noqa: E731
        if run() is None:
            return stored
        alts = {(label if label.startswith("  alt") else "  alt " + label): part for label, part in stored.items()}
        return {f"{product} (Gluon, combined)": (run, flops), **alts}

    def gather(src, label, copied):
        """src[rows] as its own pass: in the sum where the layer makes the copy, else an alt line (the copy that the
        lines "(Gluon)" and "(Triton TMA)" below it read)."""
        return {("" if copied else "  alt ") + label: (lambda: gather_rows(src, rows), 0)}

    # Where the layer gathers in the GEMMs instead of copying (_row_product, _weight_grad): x's rows in the forward
    # unless the gate_up forward reads a copy, in the backward unless its weight gradient does; grad_out's unless the
    # down weight gradient reads a copy (grad_h gathers either way).
    x_copied = gathered_row_weight(x, rows, w_gate_up.transpose(1, 2), preact, h) is None
    x_copied_bwd = not weight_grad_gathers(dpre, x, w_gate_up.shape, None, rows)
    grad_out_copied = gathered_row_weight(grad_out, rows, w_down, g_alt) is None or not weight_grad_gathers(
        grad_out, hs, w_down.shape, rows
    )
    parts = {
        "sort_by_expert": (lambda: torch.ops.prmc.sort_by_expert(ids, experts), 0),
        **gather(x, "gather x rows (fwd)", x_copied),
        **ranked(*row_choices("gate_up fwd", x_rows, w_gate_up.transpose(1, 2), preact, 2 * gemm, h, src=x)),
        "  alt gate_up fwd (Triton, gather on load)": (lambda: grouped_gemm("gate_up", x, offsets, w_gate_up.transpose(1, 2), preact, n=inter, a_rows=rows, h=h, gated=True), 2 * gemm),
        "  alt gate_up fwd (gather on load, no TMA)": (lambda: grouped_gemm("gate_up", x, offsets, w_gate_up.transpose(1, 2), preact, n=inter, a_rows=rows, h=h, gated=True, tma=False), 2 * gemm),
        **combined("down fwd", h, w_down.transpose(1, 2), y, gemm, " (scale)", scale),
        "  alt down fwd (CUTLASS)": (lambda: cutlass.row_grouped_mm(h, w_down.transpose(1, 2), offsets), gemm),
        **gather(grad_out, "gather grad_out rows", grad_out_copied),
        **ranked(*row_choices("down grad_h", grad_out_rows, w_down, g_alt, gemm, src=grad_out)),
        "  alt down grad_h (CUTLASS)": (lambda: cutlass.row_grouped_mm(grad_out_rows, w_down, offsets), gemm),
        "  alt down grad_h (Triton, gather on load)": (lambda: grouped_gemm("store", grad_out, offsets, w_down, g_alt, n=inter, a_rows=rows), gemm),
        "mlp_grad_rows (d preact, grad_scale, scale*h)": (lambda: mlp_grad_rows(g, preact, offsets, scale, order, "silu", True), 0),
        **ranked(*k_choices("down grad_w", grad_out_rows, hs, w_down.shape, gemm, gathered=(grad_out, hs, rows, None))),
        "  alt down grad_w (Triton TMA)": (lambda: weight_grad(grad_out_rows, hs, offsets, grad_w_down), gemm),
        "  alt down grad_w (Triton, gather on load)": (lambda: weight_grad(grad_out, hs, offsets, grad_w_down, left_rows=rows), gemm),
        **combined("gate_up grad_x", dpre, w_gate_up, y, 2 * gemm, ""),
        "  alt grad_x (CUTLASS)": (lambda: cutlass.row_grouped_mm(dpre, w_gate_up, offsets), 2 * gemm),
        **gather(x, "gather x rows", x_copied_bwd),
        **ranked(*k_choices("gate_up grad_w", dpre, x_rows, w_gate_up.shape, 2 * gemm, per_expert=few_large,
                            gathered=(dpre, x, None, rows))),
        "  alt gate_up grad_w (Triton TMA)": (lambda: weight_grad(dpre, x_rows, offsets, grad_w_gate_up), 2 * gemm),
        "  alt gate_up grad_w (Triton, gather on load)": (lambda: weight_grad(dpre, x, offsets, grad_w_gate_up, right_rows=rows), 2 * gemm),
    }  # fmt: skip
    return parts


def breakdown(name, tokens, device) -> None:
    """Time each kernel launch of the prmc layer (fwd and bwd) on its own: where the time goes. Lines marked
    "alt" are other kernels for the product above them (the choice, measured; not in the sum)."""
    import triton

    from prmc.kernels.grouped_gemm import grouped_gemm_kernel
    from prmc.kernels.weight_grad import weight_grad_kernel

    def tile(config):
        kw = config.kwargs
        rows, cols = (kw["BLOCK_M"], kw["BLOCK_N"]) if "BLOCK_M" in kw else (kw["BLOCK_P"], kw["BLOCK_Q"])
        return f"{rows}x{cols}x{kw['BLOCK_K']}/w{config.num_warps}s{config.num_stages}"

    total = 0.0
    for part, (fn, flops) in breakdown_parts(name, tokens, device).items():
        tuned_before = {kernel: kernel.cache.copy() for kernel in (grouped_gemm_kernel, weight_grad_kernel)}
        compiled = fn()
        ms = triton.testing.do_bench(fn, return_mode="median")
        tuned = [
            (kernel, c) for kernel, before in tuned_before.items() for key, c in kernel.cache.items() if key not in before
        ]  # fmt: skip
        total += 0.0 if part.startswith("  alt") else ms
        asm = getattr(compiled, "asm", {}) or {}
        ptx = asm.get("ptx", "")
        mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma" in ptx else "-")
        mma += "+tma" if "cp.async.bulk.tensor" in ptx else ""
        regs = f"regs {getattr(compiled, 'n_regs', '?')} spills {getattr(compiled, 'n_spills', '?')}" if asm else ""
        rate = f"{flops / ms / 1e9:6.0f} TFLOP/s" if flops else " " * 13
        print(f"  {name:22s} {part:42s} {ms:8.3f} ms {rate}  {mma:9s} {regs}", flush=True)
        if tuned:  # the tile the autotuner chose for this product, and what it measured for each
            kernel, config = tuned[0]
            timings = ", ".join(f"{tile(c)} {t[0] if isinstance(t, list) else t:.3f}" for c, t in getattr(kernel, "configs_timings", {}).items())
            print(f"  {name:22s}     autotuned {tile(config)} of: {timings}", flush=True)
    print(f"  {name:22s} {'sum of the parts used (fwd+bwd)':42s} {total:8.3f} ms", flush=True)


def energy(name, tokens, device, ab: bool = False) -> None:
    """Energy in steady state, read from NVML's energy counter: each prmc kernel of the layer
    (``breakdown_parts``; "alt" lines, the kernels the layer chose against, are not in the sum) and each
    method's fwd+bwd step, run back to back for ~2 s after ~1 s of warm-up, with the time per launch, the power
    drawn, the SM clock and the share of the clock samples taken while the power cap held the clock down. Back to
    back means no L2 flush between launches (unlike ``do_bench``), and launches shorter than the host's ~10-30 us
    per call leave the GPU idle between them. First, each method's step in a burst from idle (3 s asleep, then 10
    steps timed by CUDA events, the clock sampled every millisecond), which is what a profile of a few steps
    sees. ``ab`` (an A/B of a kernel change): only prmc's and transformers' steps, and only the kernels the
    layer runs. First of all, a dense 8192^3 cuBLAS product back to back: the energy per FLOP a bf16 GEMM reaches on
    this chip at its power cap, against which the last line sets what 1.4x over transformers would take. Printed
    only: keep the log (``| tee``)."""
    import triton

    clock = SMClock(device)
    if not clock.available:
        raise SystemExit("--energy needs NVML (pip install nvidia-ml-py)")
    print(f"  {name:22s} power limit {clock.power_limit_w:.0f} W", flush=True)

    def steady(fn, seconds=2.0):
        """(ms per launch, mJ per launch, W, median SM MHz, share under the power cap) of fn() back to back."""
        n = max(1, int(seconds / (triton.testing.do_bench(fn, warmup=5, rep=20) * 1e-3)))
        for _ in range(n // 2):
            fn()
        torch.cuda.synchronize()
        clock.interval = 0.01  # sampling faster would take the GIL from the launching thread
        with clock:
            e0, t0 = clock.energy_mj(), time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            e1, t1 = clock.energy_mj(), time.perf_counter()
        return (t1 - t0) / n * 1e3, (e1 - e0) / n, (e1 - e0) / (t1 - t0) / 1e3, clock.median, clock.capped_share

    def line(label, ms, mj, watts, mhz, capped, flops):
        rate = f"{flops / ms / 1e9:5.0f} TFLOP/s {flops / mj / 1e9:5.2f} TFLOP/J" if flops else " " * 29
        print(f"  {name:22s} {label:42s} {ms:8.3f} ms {mj:8.2f} mJ {watts:5.0f} W  SM {mhz} MHz  "
              f"power-capped {capped:4.0%}  {rate}", flush=True)  # fmt: skip

    # The chip's best bf16 GEMM energy as a yardstick: one large dense product through cuBLAS, back to back.
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    dense = steady(lambda: a @ b)
    line(f"dense cuBLAS {n}^3 mm (no routing)", *dense, 2 * n**3)
    dense_tflop_per_j = 2 * n**3 / dense[1] / 1e9
    del a, b

    runs, flops = method_runs(name, tokens, device)
    runs.pop("tf eager loop")
    if ab:
        runs.pop("cuBLAS bmm ceiling")
    step_mj = {}
    for method, (fn, params, grad_out) in runs.items():
        step, _ = prepare(fn, params, grad_out, backward=True)
        time.sleep(3)
        idle = clock.now()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(11)]
        clock.interval = 0.001
        with clock:
            events[0].record()
            for i in range(10):
                step()
                events[i + 1].record()
            torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
        print(f"  {name:22s} {method + ' fwd+bwd, burst':42s} first {ms[0]:.3f} ms, median {statistics.median(ms):.3f} ms; "
              f"SM {idle} MHz idle, {min(clock.samples)}-{max(clock.samples)} (median {clock.median}) during, "
              f"power-capped {clock.capped_share:.0%}", flush=True)  # fmt: skip
        result = steady(step)
        step_mj[method] = result[1]
        line(method + " fwd+bwd, steady", *result, flops["fwd+bwd"])
    # Steady, every method draws the power cap (within a few percent), so a speed-up is about an energy ratio
    # (results/energy_v27.md): 1.4x over transformers means the whole step at about 1.4x its FLOP per joule.
    tf_tflop_per_j = flops["fwd+bwd"] / step_mj["tf grouped_mm+Inductor"] / 1e9
    need, have = 1.4 * tf_tflop_per_j, flops["fwd+bwd"] / step_mj["prmc"] / 1e9
    print(f"  {name:22s} 1.4x steady needs the step at {need:.2f} TFLOP/J ({need / dense_tflop_per_j:.0%} of the dense "
          f"product's {dense_tflop_per_j:.2f}); prmc's step: {have:.2f} ({have / dense_tflop_per_j:.0%}); the GEMMs at the "
          f"dense product's TFLOP/J with no other pass would give {dense_tflop_per_j / tf_tflop_per_j:.2f}x", flush=True)
    if "cuBLAS bmm ceiling" in step_mj:  # the same six GEMMs at the layer's own shapes, balanced, no routing
        ceiling = flops["fwd+bwd"] / step_mj["cuBLAS bmm ceiling"] / 1e9
        print(f"  {name:22s} the balanced cuBLAS ceiling's step: {ceiling:.2f} TFLOP/J ({ceiling / dense_tflop_per_j:.0%} of "
              f"the dense product's), {ceiling / tf_tflop_per_j:.2f}x transformers' energy per FLOP", flush=True)
    total_ms = total_mj = 0.0
    for part, (fn, part_flops) in breakdown_parts(name, tokens, device).items():
        alt = part.startswith("  alt")
        if ab and alt:
            continue
        fn()  # compile / autotune
        ms, mj, *rest = steady(fn)
        if not alt:
            total_ms, total_mj = total_ms + ms, total_mj + mj
        line(part, ms, mj, *rest, part_flops)
    print(f"  {name:22s} {'sum of the parts (fwd+bwd)':42s} {total_ms:8.3f} ms {total_mj:8.2f} mJ", flush=True)


def profile(name, tokens, device) -> None:
    """One prmc fwd+bwd step under torch.profiler: GPU time per kernel, and the GPU's idle share of the step
    (launch gaps the per-kernel breakdown cannot see)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from train_step import kernel_times  # (benchmarks/ is the script's own directory, first on sys.path)

    x, w_gate_up, w_down, ids, weights, grad_out = layer_inputs(name, tokens, device)
    params = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down)]

    def step():
        for p in params:
            p.grad = None
        prmc_experts(x, ids, weights, w_gate_up, w_down).backward(grad_out)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = 5
    start = time.perf_counter()
    for _ in range(steps):
        step()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    print(f"  {name:22s} host: {(issued - start) / steps * 1e3:.3f} ms per step to issue, "
          f"{(done - start) / steps * 1e3:.3f} ms per step to finish", flush=True)
    with torch_profile(activities=[ProfilerActivity.CPU]) as cpu_prof:
        step()
        torch.cuda.synchronize()
    print(cpu_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel, busy, window, launches = kernel_times(prof, steps)
    for kname, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {ms:8.3f} ms  {kname[:110]}", flush=True)
    print(f"  {name:22s} step {window:.3f} ms, GPU busy {busy:.3f} ms, {launches} kernels per step", flush=True)


def _speedups(prmc, tf) -> str:
    """The speed-up of the medians, and its range over the rounds (each round's tf time over prmc's)."""
    text = f"{tf['ms'] / prmc['ms']:.2f}x"
    rounds = [t / p for t, p in zip(tf.get("ms_rounds", []), prmc.get("ms_rounds", []))]
    return text + (f" ({min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else "")


def table(data) -> str:
    rounds = data.get("rounds", 1)
    lines = [
        f"# One MoE layer (experts only), bf16, {data['tokens']} tokens",
        "",
        f"{data['device']}; torch {data['torch']}, triton {data['triton']}, transformers {data['transformers']}. "
        f"do_bench median ms (the median over {rounds} rounds; the eager loop: one) / TFLOP/s (expert GEMM FLOPs) / "
        "peak extra memory GB. Speed-up: of the medians, and (in brackets) its range over the rounds. "
        "SM MHz: the median clock during each of prmc's rounds, and during each of transformers grouped_mm's (the "
        "clock follows each workload's power draw under the GPU's power cap).",
        "",
    ]
    for mode in ["fwd", "fwd+bwd"]:
        header = " | ".join(METHODS) + " | prmc speed-up vs tf grouped_mm | prmc / ceiling TFLOP/s | ceiling speed-up vs tf grouped_mm | SM MHz prmc; tf grouped_mm |"
        lines += [f"## {mode}", "", "| config (H, I, E, k) | " + header]
        lines.append("|---" * (len(METHODS) + 5) + "|")
        for name, res in data["results"].items():
            hidden, inter, experts, top_k, hot = CONFIGS[name]
            cells = []
            for method in METHODS:
                r = res.get(f"{method}|{mode}")
                cells.append(f"{r['ms']:.2f} ms / {r['tflops']:.0f} / {r['peak_gb']:.2f} GB" if r else "n/a")
            prmc, tf, ceil = (res.get(f"{m}|{mode}") for m in ("prmc", "tf grouped_mm+Inductor", "cuBLAS bmm ceiling"))
            speedup = _speedups(prmc, tf) if prmc and tf else "n/a"
            frac = f"{prmc['tflops'] / ceil['tflops']:.0%}" if prmc and ceil else "n/a"
            ceil_speedup = f"{tf['ms'] / ceil['ms']:.2f}x" if tf and ceil else "n/a"
            clocks = "; ".join("/".join(str(c) for c in (r or {}).get("mhz_rounds", []) if c) or "n/a" for r in (prmc, tf))
            label = f"{name} ({hidden}, {inter}, {experts}, {top_k}{', ' + str(hot) + ' hot' if hot else ''})"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {speedup} | {frac} | {ceil_speedup} | {clocks} |")
        lines.append("")
    return "\n".join(lines)


def plot(data, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (the table and JSON are written)")
        return
    names = list(data["results"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, mode in zip(axes, ["fwd", "fwd+bwd"]):
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            values = [data["results"][n].get(f"{method}|{mode}", {}).get("tflops", 0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=method)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=20, fontsize=8)
        ax.set_ylabel("TFLOP/s (expert GEMMs)")
        ax.set_title(f"{mode}, bf16, {data['tokens']} tokens, {data['device']}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write(data, out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "moe_layer.json"), "w") as f:
        json.dump(data, f, indent=1)
    text = table(data)
    with open(os.path.join(out_dir, "moe_layer.md"), "w") as f:
        f.write(text + "\n")
    plot(data, os.path.join(out_dir, "moe_layer.png"))
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--rounds", type=int, default=3, help="timings of each method and mode (median taken)")
    parser.add_argument("--plot", help="rewrite the table and plot from a saved moe_layer.json")
    parser.add_argument("--breakdown", action="store_true", help="time each prmc kernel on its own instead")
    parser.add_argument("--profile", action="store_true", help="profile one prmc fwd+bwd step instead")
    parser.add_argument("--energy", action="store_true", help="energy per step and per prmc kernel instead (NVML)")
    parser.add_argument("--ab", action="store_true", help="--energy for an A/B: prmc and tf steps, no alt kernels")
    args = parser.parse_args()
    if args.ab and not args.energy:
        parser.error("--ab selects what --energy measures: add --energy")
    if args.plot:
        with open(args.plot) as f:
            write(json.load(f), os.path.dirname(args.plot))
        return

    import transformers
    import triton

    import prmc  # noqa: F401  (registers torch.ops.prmc.* and their CUDA kernels)

    device = torch.device("cuda")
    if args.breakdown or args.profile or args.energy:
        for name in args.configs.split(","):
            if args.energy:
                energy(name, args.tokens, device, ab=args.ab)
            else:
                (breakdown if args.breakdown else profile)(name, args.tokens, device)
        return
    os.makedirs(args.out, exist_ok=True)
    data = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "results": {},
    }
    for name in args.configs.split(","):
        data["results"][name] = bench_config(name, args.tokens, device, args.rounds)
        torch._dynamo.reset()  # each config compiles afresh, as a new model would
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "moe_layer.partial.json"), "w") as f:  # survives a time-out
            json.dump(data, f)
    write(data, args.out)


if __name__ == "__main__":
    main()
