"""benchmarks/train_step.py runs end to end (CPU, tiny sizes): eager, compiled, and prmc with its blocks rewritten.

The numbers come from the GPU (benchmarks/results/train_step.md); this proves the script still runs.
fp32 on CPU: transformers' grouped_mm fallback op cannot be compiled there (its backward guards on a
data-dependent size), so the experts run transformers' eager loop, and aot_eager stands in for Inductor.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (the folder is not a package)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_train_step_smoke(tmp_path):
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "train_step.py"), "--device", "cpu", "--tiny",
        "--configs", "qwen3-30b-a3b", "--compiler", "aot_eager", "--experts", "eager",
        "--steps", "1", "--warmup", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "train_step.json").read_text())
    assert [r["mode"] for r in data["rows"]] == ["eager", "inductor", "prmc"]
    prmc_row = data["rows"][-1]
    assert prmc_row["prmc_blocks_rewritten"] >= 4 and prmc_row["prmc_blocks_refused"] == 0
    losses = [r["first_loss"] for r in data["rows"]]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0]), losses
    assert (tmp_path / "train_step.md").read_text().count("| qwen3-30b-a3b |") == 3


def test_train_step_profile_parts():
    """--profile's grouping of a step's kernels, on names seen in an H100 profile (results/train_step_profile_v30.txt):
    prmc's kernels before the CUTLASS ones (the Gluon row kernel's name holds "grouped"), the fused AdamW, the rest."""
    step_part = benchmark_module("train_step").step_part
    cutlass = "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversal"
    adam = "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>, FusedAdamMathFunctor<bf16>>"
    prmc_kernels = ("grouped_gemm_kernel", "weight_grad_kernel", "combine_rows_kernel", "scatter_kernel")
    assert [step_part(k) for k in prmc_kernels] == ["experts: prmc"] * len(prmc_kernels)
    assert step_part(cutlass) == "experts: grouped GEMM (CUTLASS)"
    assert step_part(adam) == "optimizer"
    assert step_part("triton_poi_fused_index_put_masked_fill_new_zeros_scalar_tensor_8") == "model"
    assert step_part("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64") == "model"


def test_moe_layer_ceiling_matches_autograd():
    """The layer table's cuBLAS ceiling (benchmarks/moe_layer.py's BalancedExperts: the six GEMMs written out, the
    gated activation fused) computes what autograd computes on the plain expression, and returns the weight
    gradients in the weights' own layout (no transposed copies for the step to pay)."""
    import torch

    BalancedExperts = benchmark_module("moe_layer").BalancedExperts
    torch.manual_seed(0)
    experts, rows, hidden, inter = 3, 5, 16, 12
    x = torch.randn(experts, rows, hidden, requires_grad=True)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, requires_grad=True)
    w_down = torch.randn(experts, hidden, inter, requires_grad=True)
    grad = torch.randn(experts, rows, hidden)
    gate, up = torch.bmm(x, w_gate_up.transpose(1, 2)).chunk(2, dim=-1)
    expected = torch.bmm(torch.nn.functional.silu(gate) * up, w_down.transpose(1, 2))
    expected_grads = torch.autograd.grad(expected, (x, w_gate_up, w_down), grad)
    out = BalancedExperts.apply(x, w_gate_up, w_down)
    grads = torch.autograd.grad(out, (x, w_gate_up, w_down), grad)
    torch.testing.assert_close(out, expected)
    for got, want, param in zip(grads, expected_grads, (x, w_gate_up, w_down)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.stride() == param.stride()
