"""Expert-parallel MoE layer benchmark: tokens/s, time in all-to-all, exposed communication, overlap on/off.

Run under torchrun (gloo on CPU, NCCL on GPUs)::

    torchrun --nproc-per-node 2 benchmarks/expert_parallel.py                      # CPU, gloo
    torchrun --nproc-per-node 8 benchmarks/expert_parallel.py --tokens 8192 --hidden 2048 \\
        --intermediate 768 --experts 128 --topk 8 --dtype bf16 --compile           # GPUs, NCCL

One MoE layer (routed experts sharded over the EP group + a shared expert), forward + backward per step,
on each rank's own ``--tokens`` tokens (router: softmax top-k of a random linear gate). Variants:

* ``off``: 1 chunk, shared expert computed before the dispatch, waits right after each issue (no overlap);
* ``on-cN``: N token chunks, shared expert between the dispatch issue and its wait (the prmc schedule);
  compiled (``--compile``) with ``prmc.passes.overlap``'s Inductor patches, eager otherwise (eager functional
  collectives wait at first use, which gives the same schedule).

Reported per variant (median over ``--steps`` after ``--warmup``, max over ranks): step time, tokens/s
(global tokens / step time), ``a2a_ms`` (the same token all-to-alls, same split sizes, run alone: time in
all-to-all), ``compute_ms`` (the step with the token all-to-alls replaced by local buffers of the same size),
``exposed_comm_ms`` = step - compute (communication not hidden by compute). Results go to
``benchmarks/results/expert_parallel_<device>_w<world>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

# NOTE: imported before init_process_group on purpose (README, "Expert parallelism": imported after it, the gloo
# group outlives destroy_process_group and its worker threads can abort the process at exit).
import prmc.distributed.ep as ep
from prmc.passes import overlap


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--shared-intermediate", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile (Inductor + prmc overlap schedule)")
    p.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/...)")
    p.add_argument("--small", action="store_true", help="tiny sizes for a smoke test")
    return p.parse_args()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _no_token_comm():
    """Replace the token all-to-alls by local buffers of the received size (compute-only timing)."""
    orig = ep.all_to_all

    def local(x, out_splits, in_splits, group_name):
        n = sum(int(s) for s in out_splits)
        base = x.reshape(-1)[:1].sum() * 0  # keeps the autograd edge, costs nothing
        return x.new_zeros((n,) + tuple(x.shape[1:])) + base

    ep.all_to_all = local
    try:
        yield
    finally:
        ep.all_to_all = orig


def main():
    args = _parse()
    if args.small:
        args.tokens, args.hidden, args.intermediate, args.shared_intermediate = 64, 32, 16, 32
        args.steps, args.warmup, args.chunks = 3, 1, [2]
    use_cuda = torch.cuda.is_available() and os.environ.get("PRMC_BENCH_CPU") != "1"
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if args.experts % world:
        raise SystemExit(f"--experts {args.experts} must be divisible by the world size {world}")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    group_name = dist.group.WORLD.group_name
    e, k, h, i, t = args.experts, args.topk, args.hidden, args.intermediate, args.tokens
    el = e // world
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = torch.randn(t, h, generator=g).to(device, dtype).requires_grad_()
    gate = (torch.randn(e, h, generator=torch.Generator().manual_seed(0)) / h**0.5).to(device, dtype)
    w13 = (torch.randn(el, 2 * i, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(el, h, i, generator=g) / i**0.5).to(device, dtype).requires_grad_()
    shared = torch.nn.Sequential(
        torch.nn.Linear(h, args.shared_intermediate, bias=False),
        torch.nn.SiLU(),
        torch.nn.Linear(args.shared_intermediate, h, bias=False),
    ).to(device, dtype)

    def route(x):
        probs = torch.softmax((x @ gate.t()).float(), -1)
        wts, ids = probs.topk(k, -1)
        return ids, (wts / wts.sum(-1, keepdim=True)).to(x.dtype)

    def layer_off(x):
        ids, wts = route(x)
        s = shared(x)
        st = ep.ep_start(x, ids, wts, group_name=group_name, world=world, num_experts=e, chunks=1)
        for ch in st.chunks:  # wait right away: nothing overlaps
            ch.issued = ch.issued + 0
        return ep.ep_finish(st, w13, w2, "silu", True) + s

    def layer_on(x, chunks):
        ids, wts = route(x)
        st = ep.ep_start(x, ids, wts, group_name=group_name, world=world, num_experts=e, chunks=chunks)
        s = shared(x)  # under the first dispatch all-to-all
        return ep.ep_finish(st, w13, w2, "silu", True) + s

    variants = {"off": layer_off}
    for c in args.chunks:
        variants[f"on-c{c}"] = lambda x, c=c: layer_on(x, c)
    if args.compile:
        torch._dynamo.config.capture_scalar_outputs = True
        patches = overlap.inductor_config_patches()
        compiled = {}
        for name, fn in variants.items():
            if name == "off":
                compiled[name] = torch.compile(fn)
            else:
                with torch._inductor.config.patch(patches):
                    compiled[name] = torch.compile(fn)
        variants = compiled

    grad = torch.randn(t, h, generator=g).to(device, dtype)

    def step(fn):
        out = fn(x)
        out.backward(grad)
        x.grad = None
        w13.grad = None
        w2.grad = None

    def timed(fn, n):
        times = []
        for _ in range(n):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            step(fn)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def max_over_ranks(v):
        tv = torch.tensor([v], dtype=torch.float64)
        dist.all_reduce(tv, op=dist.ReduceOp.MAX)
        return tv.item()

    # the split sizes of this routing, for the all-to-all-only timing
    with torch.no_grad():
        ids, wts = route(x)
        st = ep.ep_start(x.detach(), ids, wts, group_name=group_name, world=world, num_experts=e, chunks=1)
    ch = st.chunks[0]
    in_splits, out_splits = [int(v) for v in ch.in_splits], [int(v) for v in ch.out_splits]
    _ = ch.issued * 1  # wait

    def a2a_only():
        send = torch.randn(sum(in_splits), h, device=device, dtype=dtype)
        recv = torch.empty(sum(out_splits), h, device=device, dtype=dtype)
        back = torch.empty(sum(in_splits), h, device=device, dtype=dtype)
        for _ in range(2):  # forward: dispatch + combine; backward: their transposes
            dist.all_to_all_single(recv, send, out_splits, in_splits)
            dist.all_to_all_single(back, recv, in_splits, out_splits)

    def time_a2a(n):
        times = []
        for _ in range(n):
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            a2a_only()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    time_a2a(args.warmup)
    a2a_ms = max_over_ranks(time_a2a(args.steps)) * 1e3
    results = {}
    for name, fn in variants.items():
        timed(fn, args.warmup)
        step_s = max_over_ranks(timed(fn, args.steps))
        with _no_token_comm():
            if args.compile:
                torch._dynamo.reset()
            base = layer_off if name == "off" else (lambda x, c=int(name.split("c")[-1]): layer_on(x, c))
            if args.compile:
                base = torch.compile(base)
            timed(base, args.warmup)
            comp_s = max_over_ranks(timed(base, args.steps))
        if args.compile:
            torch._dynamo.reset()
        results[name] = {
            "step_ms": step_s * 1e3,
            "tokens_per_s": world * t / step_s,
            "a2a_ms": a2a_ms,
            "compute_ms": comp_s * 1e3,
            "exposed_comm_ms": max(0.0, (step_s - comp_s) * 1e3),
        }
    routed = {"rows_sent": sum(in_splits), "rows_received": sum(out_splits)}
    rows = torch.tensor([routed["rows_received"]], dtype=torch.float64)
    gathered = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(gathered, rows)
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if use_cuda else "cpu"
        report = {
            "device": dev,
            "backend": backend,
            "world": world,
            "compiled": args.compile,
            "config": {k_: v for k_, v in vars(args).items() if k_ != "out"},
            "rows_received_per_rank": [int(r.item()) for r in gathered],
            "variants": results,
        }
        out = args.out or os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results",
            f"expert_parallel_{'cuda' if use_cuda else 'cpu'}_w{world}{'_compiled' if args.compile else ''}.json",
        )
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"expert parallel, {backend} on {dev}, world {world}, {t} tokens/rank, H={h} I={i} E={e} k={k}")
        print(f"{'variant':10} {'step ms':>9} {'tokens/s':>11} {'a2a ms':>8} {'compute ms':>11} {'exposed ms':>11}")
        for name, r in results.items():
            print(
                f"{name:10} {r['step_ms']:9.2f} {r['tokens_per_s']:11.0f} {r['a2a_ms']:8.2f} "
                f"{r['compute_ms']:11.2f} {r['exposed_comm_ms']:11.2f}"
            )
        print(f"wrote {out}")
    dist.barrier()  # nobody tears down gloo while another rank still talks
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
