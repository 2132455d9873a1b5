"""Tiny MoE models with random weights, for prmc tests (nothing is downloaded).

Every builder is deterministic given ``seed`` (it seeds torch's CPU generator itself), returns a module in
training mode, and is small enough that a 2-layer model compiles in seconds on 2 CPU cores.

API
---
``build(name, seed=0, dtype=torch.float32, experts_implementation="grouped_mm")``
    A full causal-LM model (transformers families) or a tiny wrapper model (hand-written forms).
    ``forward(input_ids) -> logits`` for the hand-written wrappers; for transformers models use
    ``logits_of(model, input_ids)`` to get a plain tensor.
``build_block(name, seed=0, dtype=..., experts_implementation=...)``
    Just one MoE block (``model.model.layers[0].mlp`` for transformers; one ``LoopMoE``/``DenseMoE`` for
    the hand-written forms). ``forward(hidden_states[B, S, H]) -> Tensor[B, S, H]``.
    ``block.prmc_hidden_size`` tells the input size.
``all_forms()``
    ``[(name, builder)]`` over every (family, experts_implementation) pair, ``builder(seed=0,
    dtype=torch.float32) -> model``. ``all_block_forms()`` does the same for standalone blocks.
``make_inputs(model_or_block, seed=0, batch=2, seq=8)``
    token ids for models, hidden states for blocks.
``TRANSFORMERS_FAMILIES``, ``HAND_FAMILIES``, ``EXPERTS_IMPLEMENTATIONS``, ``FORM2_FAMILIES``
    lists of names (JetMoE has no experts_implementation switch: it has one form only).

Sizes: hidden 32, (moe) intermediate 16..48, 2 decoder layers, 8 experts (4 for JetMoE), top-k 2,
vocab 100, 2..4 heads of dim 8..16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 100
HIDDEN = 32
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
TRANSFORMERS_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "jetmoe")
# families whose experts module goes through transformers' ExpertsInterface (has experts_implementation)
FORM2_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
HAND_FAMILIES = ("hand_loop", "hand_dense")


# --------------------------------------------------------------------------------------------------
# transformers configs
# --------------------------------------------------------------------------------------------------
def _common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(kw)
    return base


def config_for(family: str):
    """A tiny transformers config of ``family`` (one of TRANSFORMERS_FAMILIES)."""
    import transformers as T

    if family == "mixtral":
        return T.MixtralConfig(**_common(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2))
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(
            **_common(
                intermediate_size=48,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=40,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        )
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(
            **_common(
                intermediate_size=48,
                moe_intermediate_size=24,
                num_experts=8,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                head_dim=8,
            )
        )
    if family == "olmoe":
        return T.OlmoeConfig(**_common(intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False))
    if family == "deepseek_v3":
        return T.DeepseekV3Config(
            **_common(
                intermediate_size=48,
                moe_intermediate_size=16,
                n_shared_experts=1,
                n_routed_experts=8,
                routed_scaling_factor=2.5,
                n_group=4,  # 2 experts per group (group score = sum of the top-2 in the group)
                topk_group=2,
                num_experts_per_tok=2,
                first_k_dense_replace=0,  # both layers are MoE
                norm_topk_prob=True,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                num_key_value_heads=4,
                rope_interleave=True,
            )
        )
    if family == "jetmoe":
        # num_attention_heads = num_key_value_heads * num_experts_per_tok (set by the config itself)
        kw = _common(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            kv_channels=8,
            tie_word_embeddings=True,
        )
        kw.pop("num_attention_heads")
        return T.JetMoeConfig(**kw)
    raise ValueError(f"unknown transformers family {family!r}; valid: {TRANSFORMERS_FAMILIES}")


def _randomise_buffers(model: nn.Module) -> None:
    """Make zero-initialised routing buffers non-trivial (DeepSeek-V3's e_score_correction_bias)."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                buf.copy_(torch.randn(buf.shape, dtype=torch.float32) * 0.05)
    # JetMoE's MoE/MoA `bias` parameters are torch.empty: _init_weights zeroes them; make them nonzero.
    for name, p in model.named_parameters():
        if name.endswith("mlp.bias") or name.endswith("experts.bias"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, dtype=torch.float32).to(p.dtype) * 0.02)


def build_transformers(
    family: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    experts_implementation: str | None = "grouped_mm",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A tiny ``AutoModelForCausalLM.from_config`` model of ``family``, training mode."""
    from transformers import AutoModelForCausalLM

    cfg = config_for(family)
    kw = dict(dtype=dtype, attn_implementation=attn_implementation)
    if family in FORM2_FAMILIES:
        if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}")
        kw["experts_implementation"] = experts_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, **kw)
    torch.manual_seed(seed + 1)
    _randomise_buffers(model)
    if family in FORM2_FAMILIES:
        assert model.config._experts_implementation == experts_implementation, (
            model.config._experts_implementation,
            experts_implementation,
        )
    return model.train()


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Plain-tensor forward for both transformers models and the hand-written wrappers."""
    out = model(input_ids)
    return out.logits if hasattr(out, "logits") else out


# --------------------------------------------------------------------------------------------------
# hand-written forms
# --------------------------------------------------------------------------------------------------
class ExpertMLP(nn.Module):
    """SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _HandWrittenMoE(nn.Module):
    """A router Linear and an ``nn.ModuleList`` of SwiGLU experts; subclasses spell the forward."""

    def __init__(self, hidden: int = HIDDEN, inter: int = 48, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(hidden, inter) for _ in range(num_experts))


class LoopMoE(_HandWrittenMoE):
    """Classic Mixtral form: router -> softmax -> topk -> normalise; loop over experts with where + index_add_."""

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        w, selected = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            idx, pos = torch.where(selected == e)
            out.index_add_(0, idx, self.experts[e](x[idx]) * w[idx, pos, None])
        return out.reshape(shape)


class DenseMoE(_HandWrittenMoE):
    """Dense form: every expert runs on every token; a top-k-sparse gate matrix weights the sum."""

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        topk_w, topk_idx = torch.topk(probs, self.top_k, dim=-1)
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(1, topk_idx, topk_w).to(x.dtype)  # [T, E], k nonzeros per row
        out = 0
        for e in range(self.num_experts):
            out = out + gates[:, e : e + 1] * self.experts[e](x)
        return out.reshape(shape)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class TinyMoEModel(nn.Module):
    """embedding -> 2 x (norm -> MoE -> residual) -> norm -> head. ``forward(input_ids) -> logits``."""

    def __init__(self, moe_cls, num_layers: int = 2, hidden: int = HIDDEN, vocab: int = VOCAB, **moe_kw):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(num_layers))
        self.layers = nn.ModuleList(moe_cls(hidden=hidden, **moe_kw) for _ in range(num_layers))
        self.final_norm = RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for norm, moe in zip(self.norms, self.layers):
            h = h + moe(norm(h))
        return self.head(self.final_norm(h))


_HAND = {"hand_loop": LoopMoE, "hand_dense": DenseMoE}


def build_hand(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, block: bool = False, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cls = _HAND[family]
    m = cls(**kw) if block else TinyMoEModel(cls, **kw)
    return m.to(dtype).train()


# --------------------------------------------------------------------------------------------------
# uniform entry points
# --------------------------------------------------------------------------------------------------
def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, experts_implementation: str = "grouped_mm"):
    if name in _HAND:
        return build_hand(name, seed=seed, dtype=dtype)
    return build_transformers(name, seed=seed, dtype=dtype, experts_implementation=experts_implementation)


def build_block(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, experts_implementation: str = "grouped_mm"):
    """One MoE block standalone (training mode); ``block.prmc_hidden_size`` is its input size."""
    if name in _HAND:
        blk = build_hand(name, seed=seed, dtype=dtype, block=True)
    else:
        model = build_transformers(name, seed=seed, dtype=dtype, experts_implementation=experts_implementation)
        blk = model.model.layers[0].mlp
    blk.prmc_hidden_size = HIDDEN
    return blk.train()


def make_inputs(module: nn.Module, seed: int = 0, batch: int = 2, seq: int = 8, dtype: torch.dtype | None = None):
    """Token ids for a model, or hidden states [batch, seq, hidden] (requires_grad) for a block."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(module, "prmc_hidden_size"):
        if dtype is None:
            dtype = next(module.parameters()).dtype
        return torch.randn(batch, seq, module.prmc_hidden_size, generator=g).to(dtype).requires_grad_(True)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


def _form_names():
    names = []
    for fam in FORM2_FAMILIES:
        for impl in EXPERTS_IMPLEMENTATIONS:
            names.append((f"{fam}-{impl}", fam, impl))
    names.append(("jetmoe", "jetmoe", None))
    for fam in HAND_FAMILIES:
        names.append((fam, fam, None))
    return names


def all_forms():
    """[(name, builder)] for every full-model form; ``builder(seed=0, dtype=torch.float32) -> model``.

    Names: "<family>-<experts_implementation>" for the transformers families with an ExpertsInterface
    (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3 x grouped_mm, batched_mm, eager), "jetmoe",
    "hand_loop", "hand_dense".
    """
    out = []
    for name, fam, impl in _form_names():
        out.append((name, functools.partial(_builder, fam, impl, False)))
    return out


def all_block_forms():
    """Like ``all_forms`` but each builder returns one standalone MoE block."""
    return [(name, functools.partial(_builder, fam, impl, True)) for name, fam, impl in _form_names()]


def _builder(fam, impl, block, seed: int = 0, dtype: torch.dtype = torch.float32):
    fn = build_block if block else build
    return fn(fam, seed=seed, dtype=dtype, experts_implementation=impl or "grouped_mm")


def form_info(name: str) -> dict:
    """{'family': ..., 'experts_implementation': ... or None} for a name from all_forms()."""
    for n, fam, impl in _form_names():
        if n == name:
            return {"family": fam, "experts_implementation": impl}
    raise KeyError(name)
