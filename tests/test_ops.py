"""The prmc custom ops themselves (CPU, reference implementation): registration, fake tensors, autograd.

``torch.library.opcheck`` checks the schema, the fake implementation against the real one, the autograd
registration and AOT dispatch with dynamic shapes; ``gradcheck`` checks the backward ops
(``experts_backward_down``, then ``experts_backward_gate_up``) against numerical gradients in float64.
"""

from __future__ import annotations

import re

import pytest
import torch

import prmc.ops  # noqa: F401  (registers torch.ops.prmc.*)


def _layer(tokens=6, hidden=5, inter=4, experts=3, top_k=2, gated=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[0] = torch.arange(top_k) + experts - top_k  # the last experts see at least one token
    order, _, offsets, inverse = torch.ops.prmc.sort_by_expert(ids, experts)
    f = 2 * inter if gated else inter

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "x": rand(tokens, hidden),
        "order": order,
        "inverse": inverse,
        "top_k": top_k,
        "offsets": offsets,
        "w_gate_up": rand(experts, f, hidden) * hidden**-0.5,
        "w_down": rand(experts, hidden, inter) * inter**-0.5,
        "scale": torch.rand(tokens * top_k, generator=gen, dtype=torch.float64) + 0.1,
    }


def _args(layer, activation="silu", gated=True, scale=True):
    return (
        layer["x"], layer["order"], layer["inverse"], layer["top_k"], layer["offsets"], layer["w_gate_up"], layer["w_down"],
        layer["scale"] if scale else None, activation, gated,
    )  # fmt: skip


def test_sort_by_expert_opcheck():
    ids = torch.tensor([[2, 0], [1, 2], [2, 1], [-1, 4]])  # -1 and 4 route nowhere (4 experts)
    torch.library.opcheck(torch.ops.prmc.sort_by_expert.default, (ids, 4))
    order, counts, offsets, inverse = torch.ops.prmc.sort_by_expert(ids, 4)
    assert order.tolist() == [1, 2, 5, 0, 3, 4, 6, 7]  # stable: ties keep slot order; unrouted slots last
    assert counts.tolist() == [1, 2, 3, 0] and offsets.tolist() == [1, 3, 6, 6]
    assert inverse.tolist() == [3, 0, 1, 4, 5, 2, 6, 7]


@pytest.mark.parametrize("gated,scale", [(True, True), (False, False)])
def test_experts_opcheck(gated, scale):
    layer = _layer(gated=gated)
    for key in ("x", "w_gate_up", "w_down", "scale"):
        layer[key].requires_grad_()
    torch.library.opcheck(torch.ops.prmc.experts.default, _args(layer, "gelu", gated, scale))


@pytest.mark.parametrize("activation,gated,scale", [("silu", True, True), ("gelu_tanh", False, True), ("relu", True, False)])
def test_experts_gradcheck(activation, gated, scale):
    layer = _layer(gated=gated)
    if activation == "relu":  # keep pre-activations away from relu's kink, where numerical gradients jump
        layer["w_gate_up"] = layer["w_gate_up"] * 0.5
    inputs = [layer[k].requires_grad_() for k in ("x", "w_gate_up", "w_down", "scale")]

    def fn(x, w_gate_up, w_down, s):
        args = (x, layer["order"], layer["inverse"], layer["top_k"], layer["offsets"], w_gate_up, w_down)
        args = (*args, s if scale else None)
        return torch.ops.prmc.experts(*args, activation, gated)  # both outputs: preact is differentiable too

    assert torch.autograd.gradcheck(fn, inputs)


def test_experts_rejects_mismatched_weights():
    layer = _layer()
    layer["w_down"] = layer["w_down"][:, :, :3]  # intermediate 3, gate_up says 4
    with pytest.raises(RuntimeError, match="w_down .* does not match w_gate_up"):
        torch.ops.prmc.experts(*_args(layer))


@pytest.mark.parametrize("scale", [True, False])
def test_backward_ops_opcheck(scale):
    layer = _layer()
    x, order, inverse, top_k, offsets, w_gate_up, w_down, s, activation, gated = _args(layer, scale=scale)
    _, preact = torch.ops.prmc.experts(*_args(layer, scale=scale))
    grad_out = torch.randn_like(x)
    down_args = (grad_out, None, order, top_k, offsets, w_down, preact, s, activation, gated)
    torch.library.opcheck(torch.ops.prmc.experts_backward_down.default, down_args)
    dpre, _, grad_scale = torch.ops.prmc.experts_backward_down(*down_args)
    assert grad_scale.shape == (order.shape if scale else (0,))
    torch.library.opcheck(
        torch.ops.prmc.experts_backward_gate_up.default, (dpre, x, order, inverse, top_k, offsets, w_gate_up)
    )  # fmt: skip


def test_compiled_backward_frees_preact_between_its_two_ops():
    """The backward's two ops let the compiled backward free preact (the [M, F] tensor the forward keeps) once the
    down projection's op has read it, before the gate_up projection's op allocates its gradients."""
    from torch._inductor.utils import run_and_get_code

    layer = _layer()
    inputs = [layer[k].float().requires_grad_() for k in ("x", "w_gate_up", "w_down", "scale")]

    def forward(x, w_gate_up, w_down, s):
        args = (x, layer["order"], layer["inverse"], layer["top_k"], layer["offsets"], w_gate_up, w_down, s)
        return torch.ops.prmc.experts(*args, "silu", True)[0]

    compiled = torch.compile(forward)
    _, codes = run_and_get_code(lambda: compiled(*inputs).sum().backward())
    backward = next(code for code in codes if "experts_backward_down" in code).splitlines()
    down = next(i for i, line in enumerate(backward) if "prmc.experts_backward_down.default(" in line)
    gate_up = next(i for i, line in enumerate(backward) if "prmc.experts_backward_gate_up.default(" in line)
    preact = re.search(r"experts_backward_down\.default\((.*)\)", backward[down]).group(1).split(", ")[6]
    freed = [i for i, line in enumerate(backward) if re.fullmatch(rf"\s*del {preact}", line)]
    assert freed and down < freed[0] < gate_up, "\n".join(backward)
