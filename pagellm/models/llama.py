"""LLaMA (LlamaForCausalLM): RMSNorm, RoPE, grouped-query attention, SwiGLU.

    input_ids (T,) -> embed_tokens -> [RMSNorm -> q,k,v -> RoPE -> paged attention -> o_proj -> + residual
                                       RMSNorm -> gate,up -> silu(gate) * up -> down_proj -> + residual] x L
                   -> norm -> hidden (T, hidden);   compute_logits(hidden[last positions]) -> (N, vocab)
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.models.layers import (
    Attention,
    Linear,
    PackedLinear,
    RMSNorm,
    RotaryEmbedding,
    activation,
    lm_head_logits,
)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        h = config.num_attention_heads
        kvh = getattr(config, "num_key_value_heads", None) or h
        d = getattr(config, "head_dim", None) or config.hidden_size // h
        bias = getattr(config, "attention_bias", False)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.qkv_proj = PackedLinear(config.hidden_size, [h * d, kvh * d, kvh * d], bias=bias)
        self.o_proj = Linear(h * d, config.hidden_size, bias=bias)
        self.attn = Attention(h, d, kvh, d ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = rotary(positions, q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim))
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = PackedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        x = x + self.self_attn(positions, self.input_layernorm(x), rotary, kv_cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config, max_model_len: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_model_len)


class LlamaForCausalLM(nn.Module):
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config, max_model_len: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_model_len)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hf_name(self, name: str) -> str | None:
        if "rotary_emb." in name or (self.tied and name == "lm_head.weight"):
            return None
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (T, hidden)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(positions, x, self.model.rotary, kv_cache, meta, backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(hidden, self.lm_head.weight)  # (N, vocab)
