"""Make transformers' ``experts_implementation="eager"`` experts capturable as one graph under prmc.

Problem (measured, torch 2.13 / transformers 5.17): the "eager" experts forward of every
``@use_experts_implementation`` experts class (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...) loops in Python
over ``expert_hit = (...).nonzero()``. Dynamo breaks at ``nonzero`` (default config), and even with
``capture_dynamic_output_shape_ops``/``capture_scalar_outputs`` it cannot iterate a tensor of unbacked length
(``for expert_idx in expert_hit``) nor branch on ``if expert_idx == self.num_experts``: the loop frame is
skipped and runs uncompiled, so the block is split into ~5 graphs and its expert GEMMs never appear in any
graph. No Dynamo config fixes that, and a backend cannot set Dynamo config for its own trace anyway: the
backend is called after tracing, and ``torch.compile(backend=...)`` wraps every non-Inductor backend in
``torch._TorchCompileWrapper``, which has no ``backend_ctx_ctor`` attribute, so a backend's context manager is
never entered (only ``torch._dynamo.optimize(backend)`` honours it).

What ``install()`` does: it puts a substitute under the key ``"eager"`` into transformers'
``ALL_EXPERTS_FUNCTIONS`` (the instance-local mapping of the ``ExpertsInterface`` registry that
``use_experts_implementation`` consults on every call). The substitute:

* outside Dynamo (eager execution, ``torch.compiler.is_compiling()`` is False): calls the class's own original
  forward (``type(self).forward.__wrapped__``, which ``functools.wraps`` in ``use_experts_implementation`` set)
  -- the exact code that ran before, so eager behaviour is unchanged;
* while Dynamo traces for a compile whose backend is prmc: calls transformers' own
  ``grouped_mm_experts_forward`` (the default ``experts_implementation``), which computes the same function
  (same weights, same routing; only the summation order differs) and traces as one graph -- the form prmc's
  recogniser handles anyway (``torch.ops.transformers.grouped_mm_fallback`` in fp32, ``F.grouped_mm`` in bf16);
* while Dynamo traces for any other backend (inductor, eager, aot_eager, explain, ...): the original forward,
  so those compiles are unchanged (same graph breaks as without prmc).

Which backend is compiling is read at trace time from ``InstructionTranslator.current_tx().output.compiler_fn``
inside a ``torch._dynamo.assume_constant_result`` function (Dynamo runs it once while tracing and bakes the
result in as a constant). Dynamo's cache entries are guarded on the backend, so a frame traced for prmc is
never reused for another backend and vice versa.

The prmc backend is recognised by ``is_prmc_backend(fn)``: a callable with attribute ``_prmc_backend = True``,
or one defined in the ``prmc`` package, after unwrapping ``torch._TorchCompileWrapper`` (``compiler_fn``),
Dynamo's debug wrapper (``_torchdynamo_orig_backend``), ``functools.partial`` and ``__wrapped__``.
"""

from __future__ import annotations

import sys

import torch

_INSTALLED_KEY = "eager"
_MARK = "_prmc_capture_substitute"


def _unwrap_backend(fn):
    """Yield fn and everything it wraps (TorchCompileWrapper, WrapBackendDebug, partial, __wrapped__)."""
    seen = set()
    stack = [fn]
    while stack and len(seen) < 32:
        f = stack.pop()
        if f is None or id(f) in seen:
            continue
        seen.add(id(f))
        yield f
        for attr in ("compiler_fn", "_torchdynamo_orig_backend", "func", "__wrapped__"):
            try:
                inner = getattr(f, attr, None)
            except Exception:
                inner = None
            if inner is not None and callable(inner):
                stack.append(inner)


def is_prmc_backend(fn) -> bool:
    """True if the Dynamo compiler_fn ``fn`` is (a wrapper of) the prmc backend."""
    for f in _unwrap_backend(fn):
        if getattr(f, "_prmc_backend", False) is True:
            return True
        mod = getattr(f, "__module__", None) or getattr(type(f), "__module__", "") or ""
        if mod == "prmc" or mod.startswith("prmc."):
            return True
    return False


@torch._dynamo.assume_constant_result
def _tracing_for_prmc() -> bool:
    """Run by Dynamo at trace time (its result becomes a constant): is the current compile prmc's?"""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return is_prmc_backend(tx.output.compiler_fn)
    except Exception:  # not tracing, or Dynamo internals moved: never substitute
        return False


def _original_forward(module):
    """The experts class's own forward, as ``use_experts_implementation`` wrapped it."""
    for cls in type(module).__mro__:
        fwd = cls.__dict__.get("forward")
        if fwd is not None:
            return getattr(fwd, "__wrapped__", fwd)
    raise AttributeError(f"{type(module).__name__} has no forward")


def _can_substitute(module) -> bool:
    needed = ("num_experts", "down_proj", "has_gate", "has_bias", "is_transposed")
    if not all(hasattr(module, a) for a in needed):
        return False
    return hasattr(module, "gate_up_proj") if module.has_gate else hasattr(module, "up_proj")


def eager_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """Registered as ``ALL_EXPERTS_FUNCTIONS["eager"]`` by ``install()``."""
    if torch.compiler.is_compiling() and not args and not kwargs and _can_substitute(self) and _tracing_for_prmc():
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _original_forward(self)(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)


setattr(eager_experts_forward, _MARK, True)


# Hand-written expert loops (``torch.where`` per expert) and JetMoE (``.tolist()`` split sizes) are one
# graph only with these Dynamo settings (measured: 4 and 17 graphs without, 1 with). A backend cannot set
# Dynamo config for its own trace (see the module docstring), so prmc sets them from Dynamo's
# compile-start callback, for compiles whose backend is prmc only, and restores them when it ends.
_PRMC_DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
_saved_config: list[dict] = []


def _compiling_backend():
    """The backend of the Dynamo compile under way: ``_compile``'s ``compiler_fn`` on the call stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_compile" and "compiler_fn" in frame.f_locals:
            return frame.f_locals["compiler_fn"]
        frame = frame.f_back
    return None


def _on_compile_start(_args) -> None:
    if is_prmc_backend(_compiling_backend()):
        _saved_config.append({k: getattr(torch._dynamo.config, k) for k in _PRMC_DYNAMO_CONFIG})
        for k, v in _PRMC_DYNAMO_CONFIG.items():
            setattr(torch._dynamo.config, k, v)
    else:
        _saved_config.append({})


def _on_compile_end(_args) -> None:
    if _saved_config:
        for k, v in _saved_config.pop().items():
            setattr(torch._dynamo.config, k, v)


class _CallbacksKeepingPrmc(list):
    """Dynamo's callback list; ``torch._dynamo.reset()`` clears it, but prmc's callbacks stay, as they
    would in the fresh process that reset() imitates (where importing prmc registered them)."""

    def clear(self) -> None:
        kept = [f for f in self if f in (_on_compile_start, _on_compile_end)]
        super().clear()
        self.extend(kept)


def _install_callbacks() -> None:
    handler = torch._dynamo.callback_handler
    for attr, callback in (("start_callbacks", _on_compile_start), ("end_callbacks", _on_compile_end)):
        callbacks = getattr(handler, attr)
        if not isinstance(callbacks, _CallbacksKeepingPrmc):
            callbacks = _CallbacksKeepingPrmc(callbacks)
            setattr(handler, attr, callbacks)
        if callback not in callbacks:
            callbacks.append(callback)


def install() -> bool:
    """Register the substitute and the prmc-only Dynamo settings (idempotent). Returns False when
    transformers (or its ExpertsInterface) is absent; the Dynamo settings are installed regardless."""
    _install_callbacks()
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception:
        return False
    current = ALL_EXPERTS_FUNCTIONS._local_mapping.get(_INSTALLED_KEY)
    if current is not None and getattr(current, _MARK, False):
        return True
    if current is not None or _INSTALLED_KEY in ALL_EXPERTS_FUNCTIONS._global_mapping:
        # someone else registered an "eager" experts function: leave theirs alone
        return False
    ALL_EXPERTS_FUNCTIONS[_INSTALLED_KEY] = eager_experts_forward  # instance-local mapping only
    return True


def uninstall() -> None:
    """Remove the substitute (for tests)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception:
        return
    current = ALL_EXPERTS_FUNCTIONS._local_mapping.get(_INSTALLED_KEY)
    if current is not None and getattr(current, _MARK, False):
        del ALL_EXPERTS_FUNCTIONS[_INSTALLED_KEY]


def installed() -> bool:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception:
        return False
    return getattr(ALL_EXPERTS_FUNCTIONS._local_mapping.get(_INSTALLED_KEY), _MARK, False)
