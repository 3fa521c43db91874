"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): LayerNorm, partial rotary, parallel residual.

    input_ids -> embed_in -> [attn = dense(attention(rotary(query_key_value(ln_in(x)))))
                              mlp  = dense_4h_to_h(gelu(dense_h_to_4h(ln_post(.))))
                              parallel: x + attn + mlp(ln_post(x))    sequential: y = x + attn; y + mlp(ln_post(y))
                             ] x L -> final_layer_norm;   compute_logits: embed_out (untied)

The checkpoint's query_key_value rows are interleaved per head, (H, 3, D); its weight loader
reorders them to q | k | v, (3, H, D), so attention splits one packed matmul like LLaMA's.
Only the first rotary_ndims = partial_rotary_factor * head_dim channels of q and k rotate.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.models.base import CausalLM
from pagellm.models.layers import (
    Attention,
    Linear,
    RotaryEmbedding,
    activation,
    default_weight_loader,
    lm_head_logits,
    set_weight_loader,
)


class GPTNeoXAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h = config.num_attention_heads
        d = config.hidden_size // h
        self.num_heads, self.head_dim = h, d
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size, bias=bias)
        for p in self.query_key_value.parameters():
            set_weight_loader(p, self.load_interleaved)
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=bias)
        self.attn = Attention(h, d, h, d ** -0.5)

    def load_interleaved(self, param: torch.Tensor, tensor: torch.Tensor, shard_id=None) -> None:
        # rows (H, 3, D) -> (3, H, D): heads [q0 k0 v0 q1 k1 v1 ...] -> [q0 q1 .. | k0 k1 .. | v0 v1 ..]
        h, d = self.num_heads, self.head_dim
        regrouped = tensor.reshape(h, 3, d, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
        default_weight_loader(param, regrouped)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        t = x.shape[0]
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        shape = (t, self.num_heads, self.head_dim)
        q, k = rotary(positions, q.reshape(shape), k.reshape(shape))
        return self.dense(self.attn(q, k, v, kv_cache, meta, backend))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.parallel = bool(config.use_parallel_residual)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        attn = self.attention(positions, self.input_layernorm(x), rotary, kv_cache, meta, backend)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        y = attn + x
        return self.mlp(self.post_attention_layernorm(y)) + y


class GPTNeoXModel(nn.Module):
    def __init__(self, config, max_model_len: int) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary = RotaryEmbedding(config, max_model_len)


class GPTNeoXForCausalLM(CausalLM):
    skip_weights = CausalLM.skip_weights + (".attention.bias", ".attention.masked_bias")

    def __init__(self, config, max_model_len: int) -> None:
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config, max_model_len)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tied:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def hf_name(self, name: str) -> str | None:
        return None if self.tied and name == "embed_out.weight" else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        x = self.gpt_neox.embed_in(input_ids)  # (T, hidden)
        for layer, kv_cache in zip(self.gpt_neox.layers, kv_caches):
            x = layer(positions, x, self.gpt_neox.rotary, kv_cache, meta, backend)
        return self.gpt_neox.final_layer_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(hidden, self.embed_out.weight)
