"""GPT-2 (GPT2LMHeadModel): learned positions, LayerNorm, multi-head attention, GELU MLP.

    input_ids (T,) -> wte + wpe[positions] -> [LN -> c_attn -> q,k,v -> paged attention -> c_proj -> + residual
                                               LN -> c_fc -> gelu -> c_proj -> + residual] x L
                   -> ln_f -> hidden (T, hidden);   compute_logits: hidden @ wte^T (tied)

GPT-2 checkpoints store their projections as Conv1D, (in, out): the parallel
linears load them `transposed`. GPT BigCode (gpt_bigcode.py) reuses this file
with nn.Linear weights and multi-query attention. Pipeline parallel: the first stage holds wte and wpe, the last
ln_f and wte (the tied LM head), each stage its own blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM
from pagellm.models.layers import Attention, activation
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    PPMissingLayer,
    RowParallelLinear,
    VocabParallelEmbedding,
    held,
    kv_heads_per_rank,
    parallel_logits,
    qkv_parts,
)


class GPT2Attention(nn.Module):
    def __init__(self, config, layer_idx: int, num_kv_heads: int, transposed: bool, tp: TPGroup) -> None:
        super().__init__()
        hidden, h = config.n_embd, config.n_head
        d = hidden // h
        self.num_heads, self.num_kv_heads, self.head_dim = h // tp.size, kv_heads_per_rank(num_kv_heads, tp.size), d
        # c_attn is stored as one packed [q | k | v] tensor: loaded whole (shard None), split per rank
        self.c_attn = ColumnParallelLinear(hidden, qkv_parts(h, num_kv_heads, d, tp), bias=True, transposed=transposed)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True, tp=tp, transposed=transposed)
        scale = d ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(self.num_heads, d, self.num_kv_heads, scale)

    def forward(self, x, kv_cache, meta, backend):
        q, k, v = self.c_attn.split(self.c_attn(x))
        return self.c_proj(self.attn(q, k, v, kv_cache, meta, backend))


class GPT2MLP(nn.Module):
    def __init__(self, config, transposed: bool, tp: TPGroup) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = ColumnParallelLinear.single(config.n_embd, inner, True, tp, transposed)
        self.c_proj = RowParallelLinear(inner, config.n_embd, bias=True, tp=tp, transposed=transposed)
        self.act = activation(config.activation_function)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config, layer_idx: int, num_kv_heads: int, transposed: bool, tp: TPGroup) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, num_kv_heads, transposed, tp)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, transposed, tp)

    def forward(self, x, kv_cache, meta, backend):
        x = x + self.attn(self.ln_1(x), kv_cache, meta, backend)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config, num_kv_heads: int, transposed: bool, tp: TPGroup) -> None:
        super().__init__()
        pp = tp.pp
        self.wte = held(lambda: VocabParallelEmbedding(config.vocab_size, config.n_embd, tp), pp.is_first or pp.is_last)
        self.wpe = held(lambda: nn.Embedding(config.n_positions, config.n_embd), pp.is_first)  # replicated
        self.held_layers = pp.layers(config.n_layer)
        self.h = nn.ModuleList(GPT2Block(config, i, num_kv_heads, transposed, tp) if i in self.held_layers
                               else PPMissingLayer() for i in range(config.n_layer))
        self.ln_f = held(lambda: nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon), pp.is_last)


class GPT2LMHeadModel(CausalLM):
    transposed = True  # Conv1D checkpoints: projection weights stored (in, out)
    supports_pp = True

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.transformer = GPT2Model(config, self.kv_heads(config), self.transposed, tp)

    @classmethod
    def kv_heads(cls, config) -> int:
        return config.n_head  # one K/V head per query head

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        if config.n_head % tp_size:
            raise ValueError(f"{config.n_head} attention heads do not split over tensor_parallel_size={tp_size}")
        return ModelGeometry(config.n_layer, kv_heads_per_rank(cls.kv_heads(config), tp_size),
                             config.n_embd // config.n_head, (None,) * config.n_layer)

    def hf_name(self, name: str) -> str | None:
        if name.startswith("lm_head.") or name.endswith((".attn.bias", ".attn.masked_bias")):
            return None  # tied to wte; causal-mask buffers of old checkpoints
        return name if name.startswith("transformer.") else "transformer." + name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """`intermediate`: the hidden states entering a pipeline stage after the first (in place of the embeddings);
        a stage before the last returns its last block's output."""
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions) if intermediate is None else intermediate  # (T, hidden)
        for i in t.held_layers:
            x = t.h[i](x, kv_caches[i], meta, backend)
        return t.ln_f(x) if self.tp.pp.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return parallel_logits(hidden, self.transformer.wte.weight, self.config.vocab_size, self.tp)  # tied to wte
