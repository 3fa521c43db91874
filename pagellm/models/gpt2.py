"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, multi-head attention, GELU MLP.

    input_ids (T,) -> wte + wpe[positions] -> [LN -> c_attn -> q,k,v -> paged attention -> c_proj -> + residual
                                               LN -> c_fc -> gelu -> c_proj -> + residual] x L
                   -> ln_f -> hidden (T, hidden);   compute_logits: hidden @ wte^T (tied)

GPT-2 checkpoints store their projections as Conv1D, (in, out): those weights
carry a transposing weight loader (`transposed_weights`). GPT BigCode
(gpt_bigcode.py) reuses this file with nn.Linear weights and multi-query attention.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.models.base import CausalLM
from pagellm.models.layers import Attention, Linear, activation, lm_head_logits, set_weight_loader, transposed_loader


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        hidden, h = config.n_embd, config.n_head
        d = hidden // h
        kvh = num_kv_heads or h
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.c_attn = Linear(hidden, (h + 2 * kvh) * d)
        self.c_proj = Linear(hidden, hidden)
        scale = d ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(h, d, kvh, scale)

    def forward(self, x, kv_cache, meta, backend):
        q, k, v = self.c_attn(x).split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                                        self.num_kv_heads * self.head_dim], dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, meta, backend))


class GPT2MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, num_kv_heads)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, kv_cache, meta, backend):
        x = x + self.attn(self.ln_1(x), kv_cache, meta, backend)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config, i, num_kv_heads) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2LMHeadModel(CausalLM):
    transposed_weights = ("c_attn", "c_proj", "c_fc")  # Conv1D modules: weights stored (in, out)

    def __init__(self, config, max_model_len: int) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, self.kv_heads(config))
        for name, p in self.named_parameters():
            if name.endswith(".weight") and name.split(".")[-2] in self.transposed_weights:
                set_weight_loader(p, transposed_loader)

    @classmethod
    def kv_heads(cls, config) -> int | None:
        return None  # one K/V head per query head

    @classmethod
    def geometry(cls, config) -> ModelGeometry:
        return ModelGeometry(config.n_layer, cls.kv_heads(config) or config.n_head, config.n_embd // config.n_head,
                             (None,) * config.n_layer)

    def hf_name(self, name: str) -> str | None:
        if name.startswith("lm_head.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # tied to wte; causal-mask buffers of old checkpoints
        return name if name.startswith("transformer.") else "transformer." + name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (T, hidden)
        for block, kv_cache in zip(self.transformer.h, kv_caches):
            x = block(x, kv_cache, meta, backend)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(hidden, self.transformer.wte.weight)  # (N, vocab) tied to wte
