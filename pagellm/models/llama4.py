"""Llama 4 (Llama4ForCausalLM; the language model of Llama4ForConditionalGeneration: Scout, Maverick).

LLaMA's block with four differences:

    attention   three layers in four ("chunked_attention" in config.layer_types) turn q and k with RoPE over
                interleaved pairs (x0, x1), (x2, x3), ..., then normalise them per head without a weight (L2 norm,
                config.use_qk_norm), and see only the keys of their own chunk of attention_chunk_size positions
                (AttentionParams.attention_chunk_size: every backend); the fourth layer has no RoPE, sees the whole
                context, and scales q by log1p(floor((position + 1) / floor_scale)) * attn_scale + 1
                (attn_temperature_tuning)
    moe         layers in config.moe_layers: a sigmoid router over top-k logits whose score scales the token
                before its expert (apply_router_weight_on_input), plus an always-on shared expert; the other
                layers are a dense SwiGLU of intermediate_size_mlp

Interleaved RoPE is computed as rotate-half RoPE on q and k with their dimensions reordered (evens, then odds):
the same rotation; q.k is unchanged by reordering both, the per-head L2 norm too, and V is not touched.

Checkpoints: experts.gate_up_proj (E, H, 2I) and experts.down_proj (E, I, H), transposed into FusedMoE's w13 / w2.
Llama4ForConditionalGeneration runs its language model only: prompts with images are refused (the vision encoder
is not implemented) and its vision weights are not loaded.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import LanguageModelOnly
from pagellm.models.layers import FusedMoE, GatedMLP, RotaryEmbedding, set_weight_loader
from pagellm.models.llama import AttentionOptions, LlamaAttention, LlamaForCausalLM
from pagellm.models.moe import _MoEWeights
from pagellm.models.parallel_layers import SINGLE, Linear
from pagellm.models.weight_utils import CheckpointTensor, ckpt_full


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last dimension without a weight, in float32 (transformers' Llama4TextL2Norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Llama4Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, opts: AttentionOptions, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, layer_idx, opts, tp)
        self.use_rope = bool(config.no_rope_layers[layer_idx])  # (1: this layer uses RoPE, despite the name)
        self.use_l2_norm = bool(config.use_qk_norm) and self.use_rope
        self.eps = config.rms_norm_eps
        self.temperature_tuning = bool(config.attn_temperature_tuning) and not self.use_rope
        self.floor_scale, self.attn_scale = config.floor_scale, config.attn_scale
        chunked = config.layer_types[layer_idx] == "chunked_attention"
        self.attn.params = dataclasses.replace(
            self.attn.params, attention_chunk_size=config.attention_chunk_size if chunked else None)
        d = self.head_dim
        self.register_buffer("rope_order", torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2))),
                             persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = self.heads(q, k)
        if self.use_rope:  # in float32, as transformers turns them (complex products)
            q32, k32 = rotary(positions, q[..., self.rope_order].float(), k[..., self.rope_order].float())
            q, k = q32.to(q.dtype), k32.to(k.dtype)
            if self.use_l2_norm:
                q, k = l2_norm(q, self.eps), l2_norm(k, self.eps)
        if self.temperature_tuning:
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, None, None]).to(q.dtype)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))


class Llama4Experts(FusedMoE):
    """FusedMoE loading transformers' Llama 4 layout: gate_up_proj (E, H, 2I), down_proj (E, I, H)."""

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                         config.intermediate_size, config.hidden_act, False, tp, apply_router_weight_on_input=True)
        for p in (self.w13, self.w2):
            set_weight_loader(p, self.load_transposed)

    def load_transposed(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        self.load_expert(param, ckpt_full(tensor).transpose(1, 2), None)


class Llama4MoE(nn.Module):
    """sigmoid(top-k router logits) scale the token into each chosen expert; a shared expert sees every token."""

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=False)  # replicated
        self.experts = Llama4Experts(config, tp)
        self.shared_expert = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp)
        self.top_k = config.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, ids = torch.topk(self.router(x), self.top_k, dim=-1)
        scores = torch.sigmoid(top.float()).to(x.dtype)
        return self.shared_expert(x) + self.experts.dispatch(x, scores, ids)


class Llama4ForCausalLM(_MoEWeights, LlamaForCausalLM):
    attention_cls = Llama4Attention

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        if layer_idx in config.moe_layers:
            return Llama4MoE(config, tp)
        return GatedMLP(config.hidden_size, config.intermediate_size_mlp, config.hidden_act, tp=tp)

    def hf_name(self, name: str) -> str | None:
        return super().hf_name(name.replace(".feed_forward.", ".mlp."))


class Llama4ForConditionalGeneration(LanguageModelOnly):
    """Llama 4's language model from a multimodal checkpoint (language_model.*), without the vision encoder."""

    text_class = Llama4ForCausalLM
    prefixes = (("language_model.", ""),)
