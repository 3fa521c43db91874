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
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM
from pagellm.models.layers import Attention, RotaryEmbedding, activation, set_weight_loader
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    Linear,
    PPMissingLayer,
    RowParallelLinear,
    VocabParallelEmbedding,
    held,
    parallel_logits,
)
from pagellm.models.weight_utils import CheckpointTensor, ckpt_full, copy_into


class GPTNeoXAttention(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        h = config.num_attention_heads
        d = config.hidden_size // h
        self.head_start, self.num_heads = tp.shard(h)
        self.head_dim = d
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = Linear(config.hidden_size, 3 * self.num_heads * d, bias=bias)
        for p in self.query_key_value.parameters():
            set_weight_loader(p, self.load_interleaved)
        self.dense = RowParallelLinear(config.hidden_size, config.hidden_size, bias=bias, tp=tp)
        self.attn = Attention(self.num_heads, d, self.num_heads, d ** -0.5)

    def load_interleaved(self, param: torch.Tensor, tensor: CheckpointTensor, shard_id=None) -> None:
        # rows (H, 3, D) -> this rank's heads -> (3, H_local, D): [q0 k0 v0 q1 k1 v1 ...] -> [q0 q1 | k0 k1 | v0 v1]
        full = ckpt_full(tensor)
        h = full.shape[0] // (3 * self.head_dim)
        heads = full.reshape(h, 3, self.head_dim, *full.shape[1:])[self.head_start:self.head_start + self.num_heads]
        copy_into(param, heads.transpose(0, 1).reshape(param.shape))

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        t = x.shape[0]
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        shape = (t, self.num_heads, self.head_dim)
        q, k = rotary(positions, q.reshape(shape), k.reshape(shape))
        return self.dense(self.attn(q, k, v, kv_cache, meta, backend))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear.single(config.hidden_size, config.intermediate_size, True, tp)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True, tp=tp)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        self.parallel = bool(config.use_parallel_residual)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, tp)
        self.mlp = GPTNeoXMLP(config, tp)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        attn = self.attention(positions, self.input_layernorm(x), rotary, kv_cache, meta, backend)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        y = attn + x
        return self.mlp(self.post_attention_layernorm(y)) + y


class GPTNeoXModel(nn.Module):
    def __init__(self, config, max_model_len: int, tp: TPGroup) -> None:
        super().__init__()
        pp, tied = tp.pp, bool(getattr(config, "tie_word_embeddings", False))
        self.embed_in = held(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp),
                             pp.is_first or tied and pp.is_last)
        self.held_layers = pp.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, tp) if i in self.held_layers else PPMissingLayer()
                                    for i in range(config.num_hidden_layers))
        self.final_layer_norm = held(lambda: nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps), pp.is_last)
        self.rotary = RotaryEmbedding(config, max_model_len)


class GPTNeoXForCausalLM(CausalLM):
    skip_weights = CausalLM.skip_weights + (".attention.bias", ".attention.masked_bias")
    supports_pp = True

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.gpt_neox = GPTNeoXModel(config, max_model_len, tp)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        # the LM head's rows
        self.embed_out = held(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp), tp.pp.is_last)
        if self.tied and tp.pp.is_last:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def hf_name(self, name: str) -> str | None:
        return None if self.tied and name == "embed_out.weight" else name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        m = self.gpt_neox
        x = m.embed_in(input_ids) if intermediate is None else intermediate  # (T, hidden)
        for i in m.held_layers:
            x = m.layers[i](positions, x, m.rotary, kv_caches[i], meta, backend)
        return m.final_layer_norm(x) if self.tp.pp.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return parallel_logits(hidden, self.embed_out.weight, self.config.vocab_size, self.tp)
