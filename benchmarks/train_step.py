"""A full training step of a 4-layer transformers MoE model: eager vs torch.compile vs prmc.

    PYTHONPATH=. python benchmarks/train_step.py [--configs qwen3-30b-a3b,olmoe] [--tokens 8192] [--out DIR]
    PYTHONPATH=. python benchmarks/train_step.py --device cpu --tiny     # smoke run (CI), seconds

One step is ``zero_grad(set_to_none=True)``, forward with ``labels=`` (the model's own next-token
cross-entropy, compiled with the model as a user's training loop has it), backward, ``AdamW.step()``.
The model is built from a config with random weights (nothing is downloaded): 4 decoder layers, attention
included (SDPA), every layer MoE, the MoE sizes of the named model, a 32000 token vocabulary, bf16
parameters. The experts run transformers' default implementation
(``grouped_mm``) in every mode; only the compile differs:

- eager:       the model as transformers runs it
- inductor:    ``torch.compile(model)``
- prmc:        ``torch.compile(model, backend="prmc")``: the MoE blocks become ``torch.ops.prmc.*``

``--cudagraphs`` compiles both compiled modes with ``mode="reduce-overhead"`` (Inductor's CUDA graphs; each
step begins with ``torch.compiler.cudagraph_mark_step_begin()``).

``--profile`` adds, after each mode's timed steps, where its step's GPU time goes: a profile of 3 steps, each
kernel's GPU ms per step (the largest first), the GPU's busy time per step, and the same grouped into MoE experts
(prmc's kernels, or transformers' grouped GEMMs and what runs between them), the rest of the model, and the optimizer
(``train_step_profile.txt`` under ``--out``).

The optimizer step is not compiled (the same fused AdamW in every mode). Times are CUDA-event medians
of ``--steps`` steps after ``--warmup`` steps (the first of which compiles); peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps. Writes ``train_step.md`` and
``train_step.json`` (device and versions included) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

CONFIGS = {  # name: (model type, hidden, moe intermediate, experts, top-k, attention heads, kv heads)
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8, 32, 4),
    "olmoe": ("olmoe", 2048, 1024, 64, 8, 16, 16),
}
TINY = {name: (kind, 64, 32, 8, 2, 4, 2) for name, (kind, *_) in CONFIGS.items()}
MODES = ["eager", "inductor", "prmc"]


def make_config(kind, hidden, inter, experts, top_k, heads, kv_heads, layers, vocab):
    from transformers import OlmoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, num_experts=experts, num_experts_per_tok=top_k, use_cache=False,
        max_position_embeddings=4096,
    )  # fmt: skip
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(**common, moe_intermediate_size=inter, head_dim=hidden // heads, decoder_sparse_step=1)
    return OlmoeConfig(**common, intermediate_size=inter)


def prmc_blocks() -> tuple[int, int, str]:
    """(MoE blocks rewritten, blocks left alone, the reports' text) over every graph compiled so far."""
    import prmc

    reports = prmc.reports()
    return (
        sum(len(r.rewritten) for r in reports),
        sum(len(r.refused) for r in reports),
        "\n".join(str(r) for r in reports),
    )


def run_mode(name, mode, sizes, args, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = make_config(*sizes, layers=args.layers, vocab=args.vocab)
    with device:  # initialised where it runs: 2.6B parameters take minutes to initialise on the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=args.experts).train()
    experts_impl = model.config._experts_implementation
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)
    cudagraphs = {"mode": "reduce-overhead"} if args.cudagraphs else {}  # (main: only with Inductor)
    if mode == "eager":
        fwd = model
    elif mode == "inductor":
        fwd = torch.compile(model, backend=args.compiler, **cudagraphs)
    else:
        import prmc

        prmc.reset_reports()
        try:
            torch._dynamo.lookup_backend("prmc")
        except torch._dynamo.exc.InvalidBackend:
            # Run from a checkout without installing: register what the package's torch_dynamo_backends
            # entry point (pyproject.toml) registers when it is installed.
            torch._dynamo.register_backend(prmc.backend, name="prmc")
        # (torch.compile takes mode or options; with a mode the compiler is Inductor, prmc's default)
        fwd = torch.compile(model, backend="prmc", **(cudagraphs or {"options": {"compiler": args.compiler}}))
    batch = 4 if args.tokens >= 4 * 16 else 1
    ids = torch.randint(0, args.vocab, (batch, args.tokens // batch), device=device)

    def step():
        if args.cudagraphs and mode != "eager":
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    first_loss = step().item()
    first_s = time.perf_counter() - start
    print(f"{name} {mode}: first step (compile included) {first_s:.1f} s, loss {first_loss:.4f}", flush=True)
    for _ in range(args.warmup - 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    if args.profile and device.type == "cuda":
        profile_steps(step, f"{name} {mode}", args.out)
    row = {
        "config": name, "mode": mode, "experts_implementation": experts_impl, "tokens": args.tokens,
        "median_ms": ms, "tokens_per_s": args.tokens / ms * 1e3, "first_step_s": first_s, "first_loss": first_loss,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    if mode == "prmc":
        rewritten, refused, text = prmc_blocks()
        print(text, flush=True)
        row["prmc_blocks_rewritten"], row["prmc_blocks_refused"] = rewritten, refused
        if rewritten < args.layers:
            raise SystemExit(f"prmc rewrote {rewritten} MoE blocks, expected at least {args.layers} (one per layer)")
    print(json.dumps(row), flush=True)
    del fwd, model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def kernel_times(prof, steps: int) -> tuple[dict[str, float], float, float, int]:
    """({kernel: GPU ms per step}, GPU busy ms per step, ms per step from the first kernel's start to the last's end,
    kernels per step) of a CUDA profile of ``steps`` steps: busy counts the union of the kernels' spans, so
    overlapping streams count once and the window's rest is the GPU idle."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    per_kernel: dict[str, float] = {}
    for e in kernels:
        per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.device_time / 1e3 / steps
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for s, t in spans:
        busy += max(0.0, t - max(s, end))
        end = max(end, t)
    return per_kernel, busy / 1e3 / steps, (spans[-1][1] - spans[0][0]) / 1e3 / steps, len(kernels) // steps


# Which part of a training step a kernel belongs to, by name (first match): prmc's expert kernels, the grouped
# GEMMs transformers' grouped_mm experts run (CUTLASS), the fused AdamW; everything else is "model" (attention,
# dense GEMMs, Inductor's fused kernels, among them the routing and the permutes around grouped_mm).
PARTS = [
    ("experts: prmc", ("grouped_gemm_kernel", "weight_grad_kernel", "combine_rows", "mlp_grad_rows", "gather_rows",
                       "segment_counts", "segment_bases", "scatter_kernel")),
    ("experts: grouped GEMM (CUTLASS)", ("cutlass", "grouped", "Grouped")),
    ("optimizer", ("adam", "Adam")),
]  # fmt: skip


def step_part(kernel: str) -> str:
    """The part of PARTS a kernel (its profiler name) belongs to, else "model"."""
    return next((part for part, keys in PARTS if any(key in kernel for key in keys)), "model")


def profile_steps(step, label: str, out_dir: str | None, steps: int = 3) -> None:
    """Print (and append to ``out_dir``/train_step_profile.txt) each kernel's GPU ms per step of ``step``, the parts
    of PARTS, and the GPU's busy and idle time per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel, busy, window, launches = kernel_times(prof, steps)
    parts: dict[str, float] = {}
    for kname, ms in per_kernel.items():
        part = step_part(kname)
        parts[part] = parts.get(part, 0.0) + ms
    lines = [f"## {label}: {window:.2f} ms per step, GPU busy {busy:.2f} ms, idle {window - busy:.2f} ms, "
             f"{launches} kernels"]
    lines += [f"  {p:34s} {ms:8.3f} ms" for p, ms in sorted(parts.items(), key=lambda kv: -kv[1])]
    lines += [f"    {ms:8.3f} ms  {kname[:140]}" for kname, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:60]]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "train_step_profile.txt"), "a") as f:
            f.write(text + "\n")


def environment(device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return env


def table(data) -> str:
    env = data["environment"]
    lines = [
        f"Training step (fwd + bwd + AdamW), {data['layers']}-layer models, {data['tokens']} tokens/step, "
        f"{data['dtype']}, {env['device']}, torch {env['torch']}, triton {env.get('triton', '-')}, "
        f"transformers {env['transformers']}; median of {data['steps']} steps"
        + ("; compiled modes with CUDA graphs (mode=\"reduce-overhead\")." if data.get("cudagraphs") else "."),
        "",
        "| config | mode | step ms | tokens/s | vs eager | vs inductor | peak GB | first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        same = {r["mode"]: r for r in data["rows"] if r["config"] == row["config"]}
        rel = lambda m: f"{same[m]['median_ms'] / row['median_ms']:.2f}x" if m in same else "-"  # noqa: E731
        peak = f"{row['peak_gb']:.1f}" if row["peak_gb"] is not None else "-"
        lines.append(
            f"| {row['config']} | {row['mode']} | {row['median_ms']:.1f} | {row['tokens_per_s']:,.0f} | {rel('eager')} "
            f"| {rel('inductor')} | {peak} | {row['first_step_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default 8192, tiny 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=None, help="default 32000, tiny 128")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--compiler", default="inductor", choices=["inductor", "aot_eager"],
        help="what compiles the graphs in the two compiled modes (aot_eager: no C++/Triton compile, for CPU smoke)",
    )  # fmt: skip
    parser.add_argument(
        "--experts", default=None,
        help="transformers experts_implementation (default: transformers' own, grouped_mm; on CPU in fp32 its "
        "fallback op's backward cannot be compiled by Dynamo, so the CPU smoke run uses eager)",
    )  # fmt: skip
    parser.add_argument(
        "--cudagraphs", action="store_true", help='compile with mode="reduce-overhead" (CUDA graphs; needs Inductor)'
    )
    parser.add_argument("--profile", action="store_true", help="also profile each mode's step: GPU ms per kernel")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if args.cudagraphs and args.compiler != "inductor":
        parser.error("--cudagraphs compiles with Inductor's CUDA graphs: it needs --compiler inductor")
    args.tokens = args.tokens or (64 if args.tiny else 8192)
    args.vocab = args.vocab or (128 if args.tiny else 32000)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = TINY if args.tiny else CONFIGS

    data = {
        "environment": environment(device), "tokens": args.tokens, "layers": args.layers, "steps": args.steps,
        "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny, "compiler": args.compiler,
        "cudagraphs": args.cudagraphs, "rows": [],
        "command": " ".join(sys.argv),
    }  # fmt: skip
    for name in args.configs.split(","):
        for mode in args.modes.split(","):
            data["rows"].append(run_mode(name, mode, sizes[name], args, device, dtype))
            text = table(data)
            if args.out:  # after every row, so that a run cut short keeps what it measured
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "train_step.json"), "w") as f:
                    json.dump(data, f, indent=1)
                with open(os.path.join(args.out, "train_step.md"), "w") as f:
                    f.write(text)
    print(text)


if __name__ == "__main__":
    main()
