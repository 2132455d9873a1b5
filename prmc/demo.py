"""``python -m prmc.demo``: compile a small MoE model with prmc, check it against eager, time both.

Builds a 2-layer transformers Mixtral with random weights (nothing is downloaded) whose experts run
the way transformers runs them without kernels (``experts_implementation="eager"``: a Python loop
over the experts that were hit), compiles it with ``torch.compile(backend="prmc")``, compares the
loss and every parameter gradient with eager, prints prmc's report and a timing table of training
steps (forward + backward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prmc


def build_model(hidden: int, experts: int, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, experts_implementation="eager").train()


def train_step(model, input_ids) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids).logits.float().square().mean()
    loss.backward()
    return loss.detach()


def median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="batch x sequence (4 sequences)")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build_model(args.hidden, args.experts)
    input_ids = torch.randint(0, 512, (4, args.tokens // 4), generator=torch.Generator().manual_seed(1))

    ref_loss = train_step(model, input_ids)
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    prmc.reset_reports()
    compiled = torch.compile(model, backend="prmc")
    start = time.perf_counter()
    loss = train_step(compiled, input_ids)
    compile_s = time.perf_counter() - start
    worst = max(
        ((p.grad - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item()
        for n, p in model.named_parameters()
        if p.grad is not None
    )
    print("\n".join(str(r) for r in prmc.reports()))
    print(f"\nloss eager {ref_loss.item():.6f}  prmc {loss.item():.6f}; worst relative gradient difference {worst:.1e}")
    if abs(loss.item() - ref_loss.item()) > 1e-4 * abs(ref_loss.item()) or worst > 1e-4:
        raise SystemExit("prmc does not match eager")

    eager_ms = median_ms(lambda: train_step(model, input_ids), args.steps)
    prmc_ms = median_ms(lambda: train_step(compiled, input_ids), args.steps)
    print(f"\ntraining step (forward + backward), {args.tokens} tokens, CPU, median of {args.steps}:")
    print("| model | ms | speed-up |\n|---|---|---|")
    print(f"| eager (transformers experts loop) | {eager_ms:.1f} | 1.00x |")
    print(f"| torch.compile(backend='prmc') | {prmc_ms:.1f} | {eager_ms / prmc_ms:.2f}x |")
    print(f"(first prmc step, compile included: {compile_s:.1f} s)")


if __name__ == "__main__":
    main()
