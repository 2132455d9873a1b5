"""GPU check of the whole backend: tiny models through ``torch.compile(backend="prmc")`` (Inductor, Triton
kernels) against eager, forward and every parameter gradient, in bf16 and fp32, beside stock Inductor's
own distance from eager.

    PYTHONPATH=. python benchmarks/check_backend_gpu.py [bf16|fp32] [FORM ...]   # all when none given

The CPU test suite runs the same comparison on the reference implementations; this runs the CUDA ones.
Exits 1 on any mismatch or any block left unrewritten.

bf16 is judged block by block: each MoE block gets the input eager gave it, so prmc's and stock Inductor's
block outputs and gradients are compared on the same routing. The whole-model distance is printed too, but
it is not a verdict: these tiny random models have exact ties between the k-th and (k+1)-th router
probabilities in bf16 (measured on hand_loop's layer 1: gap 0), so any rounding difference in an earlier
layer can swap an expert choice and move the next router's gradient by ~0.4 (it does for stock Inductor on
hand_dense, and for prmc on hand_loop, whose block-level errors match stock Inductor's).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import models  # noqa: E402

import prmc  # noqa: E402

FORMS = ["mixtral-grouped_mm", "qwen2_moe-batched_mm", "qwen3_moe-eager", "olmoe-grouped_mm", "deepseek_v3-grouped_mm", "jetmoe", "hand_loop", "hand_dense"]
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # fp32 on the GPU multiplies in tf32 where allowed


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def step(model, ids):
    model.zero_grad(set_to_none=True)
    out = models.logits_of(model, ids)
    out.float().square().mean().backward()
    return out.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worst_error(compiled, ids, ref, ref_grads) -> tuple[str, float]:
    out, grads = step(compiled, ids)
    errors = {"output": rel(out, ref)} | {n: rel(grads[n], g) for n, g in ref_grads.items()}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def moe_blocks(model) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    return [getattr(layer, "mlp", layer) for layer in inner.layers]


def block_errors(model, ids) -> tuple[float, float]:
    """Worst relative error (output, input gradient, parameter gradients) over the MoE blocks, each run on
    the input eager gave it: (prmc, stock Inductor)."""
    blocks = moe_blocks(model)
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach())) for i, b in enumerate(blocks)]
    with torch.no_grad():
        models.logits_of(model, ids)
    for hook in hooks:
        hook.remove()
    worst = {"prmc": 0.0, "inductor": 0.0}
    for i, block in enumerate(blocks):
        grad = torch.randn_like(inputs[i])
        results = {}
        for label in ("eager", "inductor", "prmc"):
            torch._dynamo.reset()
            fn = block if label == "eager" else torch.compile(block, **({"backend": "prmc"} if label == "prmc" else {}))
            x = inputs[i].clone().requires_grad_()
            block.zero_grad(set_to_none=True)
            out = fn(x)
            (out[0] if isinstance(out, tuple) else out).backward(grad)
            results[label] = [out[0] if isinstance(out, tuple) else out, x.grad] + [
                p.grad for p in block.parameters() if p.grad is not None
            ]
        for label in worst:
            errors = [rel(a, b) for a, b in zip(results[label], results["eager"])]
            worst[label] = max(worst[label], *errors)
    return worst["prmc"], worst["inductor"]


def main(only: list[str]) -> int:
    """``only``: dtypes ("bf16", "fp32") and/or forms to run (all of a kind when none of it is named)."""
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    chosen_dtypes = [dtypes[a] for a in only if a in dtypes] or list(dtypes.values())
    chosen_forms = [a for a in only if a not in dtypes] or FORMS
    try:
        torch._dynamo.lookup_backend("prmc")
    except torch._dynamo.exc.InvalidBackend:  # a checkout on PYTHONPATH, not installed: no entry point
        torch._dynamo.register_backend(prmc.backend, name="prmc")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = []
    for dtype in chosen_dtypes:
        for name, build in models.all_forms():
            if name not in chosen_forms:
                continue
            started = time.time()
            torch._dynamo.reset()
            prmc.reset_reports()
            model = build(seed=0, dtype=dtype).cuda()
            ids = models.make_inputs(model, seed=1, batch=4, seq=64).cuda()
            ref, ref_grads = step(model, ids)
            # bf16 under Inductor rounds differently from eager (fp32 intermediates), which can flip near-tied
            # top-k choices in these tiny models: stock Inductor's own distance from eager is the yardstick.
            baseline = worst_error(torch.compile(model), ids, ref, ref_grads)[1]
            torch._dynamo.reset()
            prmc.reset_reports()
            worst, error = worst_error(torch.compile(model, backend="prmc"), ids, ref, ref_grads)
            rewritten = sum(len(r.rewritten) for r in prmc.reports())
            verdict = f"model: worst rel err {error:.1e} ({worst}); stock Inductor {baseline:.1e}"
            if dtype == torch.float32:
                ok = error < max(TOLERANCE[dtype], 2 * baseline)
            else:
                block_prmc, block_inductor = block_errors(model, ids)
                ok = block_prmc < max(TOLERANCE[dtype], 2 * block_inductor)
                verdict = f"blocks: prmc {block_prmc:.1e}, stock Inductor {block_inductor:.1e}; " + verdict
            ok = ok and rewritten == 2
            failed += [] if ok else [f"{name} {dtype}"]
            print(f"{name:26s} {str(dtype):15s} {verdict}; blocks rewritten {rewritten} {'ok' if ok else 'FAIL'} "
                  f"({time.time() - started:.0f} s)", flush=True)  # (the time: to plan device calls)
    print("ALL OK" if not failed else f"FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
