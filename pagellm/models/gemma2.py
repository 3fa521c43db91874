"""Gemma (GemmaForCausalLM), Gemma 2 (Gemma2ForCausalLM) and Gemma 3 (Gemma3ForCausalLM, text): LLaMA's blocks
with Gemma's details.

    input_ids -> embed_tokens * sqrt(hidden) -> [GemmaRMSNorm -> attention (soft-capped scores, scale
        query_pre_attn_scalar ** -0.5, sliding window on alternate layers) -> GemmaRMSNorm -> + residual
        GemmaRMSNorm -> GeGLU MLP -> GemmaRMSNorm -> + residual] x L -> GemmaRMSNorm
    compute_logits: tied LM head, then cap * tanh(logits / cap) (final_logit_softcapping)

GemmaRMSNorm scales by (1 + w). Sliding and global layers alternate (config.layer_types), so no
KV block can be freed early: the global layers still read every token.

Gemma (1) is LLaMA's block with GemmaRMSNorm, the scaled embedding and GeGLU. Gemma 3 is Gemma 2's block with
GemmaRMSNorm on q and k (per head) and its own RoPE per kind of layer (rope_parameters["sliding_attention"],
local base 10k; ["full_attention"], 1M and possibly scaled); five sliding layers to one global by default;
no soft-capping unless the config sets it.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.layers import GatedMLP, GemmaRMSNorm, RotaryEmbedding
from pagellm.models.llama import AttentionOptions, LlamaAttention, LlamaForCausalLM
from pagellm.models.parallel_layers import SINGLE


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, family: type[LlamaForCausalLM], tp: TPGroup) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(config, layer_idx, family.attention_options(config), tp)
        self.mlp = family.make_mlp(config, layer_idx, tp)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        h = self.self_attn(positions, self.input_layernorm(x), rotary, kv_cache, meta, backend)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2ForCausalLM(LlamaForCausalLM):
    decoder_layer = Gemma2DecoderLayer
    norm_cls = GemmaRMSNorm

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, scale=config.query_pre_attn_scalar ** -0.5,
                                logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_activation, tp=tp)

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, max_model_len, tp)
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)  # normaliser in the model's dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        cap = self.final_soft_cap
        return logits if cap is None or logits is None else torch.tanh(logits / cap) * cap


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma (1): LLaMA's two-norm block with GemmaRMSNorm, the scaled embedding and GeGLU; no soft-capping, no
    sliding window."""

    norm_cls = GemmaRMSNorm
    embed = Gemma2ForCausalLM.embed

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        return GatedMLP(config.hidden_size, config.intermediate_size, act, tp=tp)



class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 (text): Gemma 2's block, q/k GemmaRMSNorm, a RoPE table per kind of layer."""

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True, qk_norm_cls=GemmaRMSNorm,
                                scale=config.query_pre_attn_scalar ** -0.5,
                                logits_soft_cap=getattr(config, "attn_logit_softcapping", None))

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__(config, max_model_len, tp)
        params = getattr(config, "rope_parameters", None) or {}
        types = list(config.layer_types)
        if set(types) <= set(params):  # one RoPE per kind of layer
            self.rotaries = nn.ModuleDict({t: RotaryEmbedding(config, max_model_len, t) for t in sorted(set(types))})
            self.layer_rotary = types
        else:
            self.rotaries = None

    def forward(self, input_ids, positions, kv_caches, meta, backend, inputs_embeds=None, intermediate=None):
        if self.rotaries is None:
            return super().forward(input_ids, positions, kv_caches, meta, backend, inputs_embeds=inputs_embeds,
                                   intermediate=intermediate)
        if intermediate is not None:
            x = intermediate
        else:
            x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        layers = self.model.layers
        for i in self.model.held_layers:
            x = layers[i](positions, x, self.rotaries[self.layer_rotary[i]], kv_caches[i], meta, backend)
        return self.model.norm(x) if self.tp.pp.is_last else x
