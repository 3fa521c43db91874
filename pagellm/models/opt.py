"""OPT (OPTForCausalLM): learned positions (offset 2), LayerNorm before or after each block, ReLU.

    input_ids -> embed_tokens (-> project_in) + embed_positions[positions + 2]
              -> [x + out_proj(attention(q * scale, k, v))   (self_attn_layer_norm before, or after: OPT-350m)
                  x + fc2(relu(fc1(.)))                       (final_layer_norm before, or after)] x L
              -> final_layer_norm (pre-norm models) (-> project_out);   compute_logits: tied to embed_tokens

Queries are scaled before attention, as in Hugging Face's OPT (the attention itself uses scale 1).
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM
from pagellm.models.layers import Attention, activation
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

POSITION_OFFSET = 2  # OPT's learned position table starts 2 rows in


class OPTAttention(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        e, h = config.hidden_size, config.num_attention_heads
        self.head_dim = e // h
        self.scaling = self.head_dim ** -0.5
        bias = bool(config.enable_bias)
        self.q_proj = ColumnParallelLinear.single(e, e, bias, tp)
        self.k_proj = ColumnParallelLinear.single(e, e, bias, tp)
        self.v_proj = ColumnParallelLinear.single(e, e, bias, tp)
        self.out_proj = RowParallelLinear(e, e, bias=bias, tp=tp)
        self.attn = Attention(h // tp.size, self.head_dim, h // tp.size, 1.0)

    def forward(self, x, kv_cache, meta, backend):
        q = self.q_proj(x) * self.scaling
        return self.out_proj(self.attn(q, self.k_proj(x), self.v_proj(x), kv_cache, meta, backend))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        e = config.hidden_size
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.pre_norm = bool(config.do_layer_norm_before)
        self.self_attn = OPTAttention(config, tp)
        self.self_attn_layer_norm = nn.LayerNorm(e, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear.single(e, config.ffn_dim, bool(config.enable_bias), tp)
        self.fc2 = RowParallelLinear(config.ffn_dim, e, bias=bool(config.enable_bias), tp=tp)
        self.final_layer_norm = nn.LayerNorm(e, elementwise_affine=affine)
        self.act = activation(config.activation_function)

    def forward(self, x, kv_cache, meta, backend):
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, kv_cache, meta, backend)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, config, tp: TPGroup) -> None:
        super().__init__()
        proj, e = config.word_embed_proj_dim, config.hidden_size
        first, last = tp.pp.is_first, tp.pp.is_last  # (pipeline stages: the LM head is tied to embed_tokens)
        self.embed_tokens = held(lambda: VocabParallelEmbedding(config.vocab_size, proj, tp), first or last)
        self.embed_positions = held(lambda: nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, e), first)
        self.project_in = Linear(proj, e, bias=False) if proj != e and first else None
        self.project_out = Linear(e, proj, bias=False) if proj != e and last else None
        keep_final = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.final_layer_norm = nn.LayerNorm(e, elementwise_affine=affine) if keep_final and last else None
        self.held_layers = tp.pp.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, tp) if i in self.held_layers else PPMissingLayer()
                                    for i in range(config.num_hidden_layers))


class OPTForCausalLM(CausalLM):
    supports_pp = True

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = nn.Module()
        self.model.decoder = OPTDecoder(config, tp)

    def hf_name(self, name: str) -> str | None:
        if name == "lm_head.weight":
            return None  # tied to embed_tokens
        return name if name.startswith("model.") else "model." + name  # some checkpoints drop the prefix

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        dec = self.model.decoder
        if intermediate is None:
            x = dec.embed_tokens(input_ids)
            if dec.project_in is not None:
                x = dec.project_in(x)
            x = x + dec.embed_positions(positions + POSITION_OFFSET)  # (T, hidden)
        else:
            x = intermediate
        for i in dec.held_layers:
            x = dec.layers[i](x, kv_caches[i], meta, backend)
        if not self.tp.pp.is_last:
            return x
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return parallel_logits(hidden, self.model.decoder.embed_tokens.weight, self.config.vocab_size, self.tp)
