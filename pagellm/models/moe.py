"""Mixture-of-experts LLaMA families: Mixtral, Qwen2-MoE and Qwen3-MoE.

    x (T, H) -> gate (router, T x E logits) -> FusedMoE: top-k experts per token, each a gated MLP
             (+ Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)) -> (T, H)

Checkpoints store one tensor per expert and projection
(`...experts.3.w1.weight`, `...experts.3.gate_proj.weight`); transformers 5 may store them stacked
(`...experts.gate_up_proj`, `...experts.down_proj`). Both land in FusedMoE's w13 / w2 through
their weight loader.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.layers import FusedMoE, GatedMLP
from pagellm.models.llama import AttentionOptions, LlamaForCausalLM
from pagellm.models.parallel_layers import SINGLE, Linear

# experts.<e>.<projection>.weight -> (FusedMoE parameter, shard id); FP8 checkpoints' scales beside each weight
_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"
                     r"\.(weight|weight_scale|weight_scale_inv)$")
_PART = {"w1": ("w13", 0), "gate_proj": ("w13", 0), "w3": ("w13", 1), "up_proj": ("w13", 1),
         "w2": ("w2", None), "down_proj": ("w2", None)}
_STACKED = {"experts.gate_up_proj": "experts.w13", "experts.down_proj": "experts.w2"}


def map_expert_weight(name: str) -> tuple[str, Any] | None:
    """An expert tensor's (parameter, shard), or None if `name` is not an expert tensor."""
    m = _EXPERT.match(name)
    if m:
        prefix, expert, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        param, part = _PART[proj]
        suffix = kind.removeprefix("weight")  # "", "_scale", "_scale_inv"
        return f"{prefix}.experts.{param}{suffix}", (expert, part) if part is not None else expert
    for stacked, ours in _STACKED.items():
        if name.endswith("." + stacked):
            return name[: -len(stacked)] + ours, None
    return None


class SparseMoeBlock(nn.Module):
    """Router + experts (+ an optional gated shared expert, Qwen2-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, act: str,
                 renormalize: bool, shared_intermediate_size: int = 0, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, bias=False)  # the router: replicated
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, act, renormalize, tp)
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, act, tp=tp)
            self.shared_expert_gate = Linear(hidden_size, 1, bias=False)
        self.has_shared = bool(shared_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class SigmoidRoutedMoE(nn.Module):
    """Experts chosen by sigmoid router scores plus a load-balancing bias that only chooses (float32; none without
    `bias`), weighted by the scores (renormalised over the chosen: / (sum + eps)) times `scale`: LFM2-MoE,
    MiniMax-M2. The router's logits come out in its weight's dtype (float32 where the model keeps it so)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, *, bias: bool,
                 renormalize: bool, eps: float = 0.0, scale: float = 1.0, act: str = "silu",
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, bias=False)  # the router: replicated
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, act, False, tp)
        self.renormalize, self.eps, self.scale = renormalize, eps, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate.weight
        scores = self.gate(x.float() if w.dtype == torch.float32 else x).sigmoid()
        k = self.experts.top_k
        if self.e_score_correction_bias is not None:
            experts = torch.topk(scores + self.e_score_correction_bias, k, dim=-1).indices
            weights = scores.gather(1, experts)
        else:
            weights, experts = torch.topk(scores, k, dim=-1)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.eps)
        return self.experts.dispatch(x, weights * self.scale, experts)


def qwen2_moe_mlp(config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
    """Qwen2-MoE's MLP layout (also Qwen3-MoE's and Qwen3-Next's): sparse every `decoder_sparse_step` layers except
    `mlp_only_layers` (with a gated shared expert where shared_expert_intermediate_size is set), dense elsewhere."""
    sparse = (layer_idx not in (config.mlp_only_layers or []) and config.num_experts > 0
              and (layer_idx + 1) % config.decoder_sparse_step == 0)
    if not sparse:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                          config.moe_intermediate_size, config.hidden_act, bool(config.norm_topk_prob),
                          getattr(config, "shared_expert_intermediate_size", 0), tp)


class _MoEWeights:
    """Expert tensors (per expert or stacked) land in FusedMoE's w13 / w2; every other name maps as the next class
    in the MRO maps it."""

    def map_weight(self, name: str) -> tuple[str, Any] | None:
        renamed = self.hf_name(name)
        expert = None if renamed is None else map_expert_weight(renamed)
        return expert if expert is not None else super().map_weight(name)


class MixtralForCausalLM(_MoEWeights, LlamaForCausalLM):
    """Mixtral: every layer's MLP is a top-k (renormalised) mixture of SwiGLU experts."""

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, config.hidden_act, renormalize=True, tp=tp)

    def hf_name(self, name: str) -> str | None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return LlamaForCausalLM.hf_name(self, name)


class Qwen2MoeForCausalLM(_MoEWeights, LlamaForCausalLM):
    """Qwen2-MoE: q/k/v biases; sparse layers every `decoder_sparse_step` (except `mlp_only_layers`) with
    a gated shared expert beside the routed ones; dense gated MLPs elsewhere."""

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        return AttentionOptions(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return qwen2_moe_mlp(config, layer_idx, tp)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE: Qwen3's attention (q/k RMSNorm, biases from config.attention_bias) with Qwen2-MoE's sparse layers,
    without a shared expert."""

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)
