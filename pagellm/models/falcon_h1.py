"""Falcon-H1 (FalconH1ForCausalLM): attention and Mamba2 side by side in every layer, with muP multipliers.

    h = RMSNorm(x)
    x += ssm_out_multiplier * mamba(h) + attention_out_multiplier * attention(attention_in_multiplier * h)
    x += down_multiplier * down(up(g) * silu(gate_multiplier * gate(g))),   g = RMSNorm(x)
    logits = lm_head(RMSNorm(x)) * lm_head_multiplier, x = embed(ids) * embedding_multiplier at the start

The attention's keys are scaled by key_multiplier. The Mamba2 mixer takes its input x ssm_in_multiplier and scales
in_proj's five parts (z, x, B, C, dt) by ssm_multipliers; its norm is optional (mamba_rms_norm) and may come before
the gate (mamba_norm_before_gate). Every layer has both a KV cache and a recurrent state.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import RecurrentLM
from pagellm.models.layers import GatedMLP, RMSNorm, RotaryEmbedding
from pagellm.models.llama import AttentionOptions, LlamaAttention
from pagellm.models.mamba import MambaMixer2, mamba2_state_shapes
from pagellm.models.parallel_layers import SINGLE, VocabParallelEmbedding, kv_heads_per_rank


def mamba_dims(config) -> tuple[int, int, int, int, int]:
    return (config.mamba_n_heads, config.mamba_d_head, config.mamba_d_state, config.mamba_n_groups,
            config.mamba_d_conv)


class FalconH1Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_idx, AttentionOptions(qkv_bias=bias, o_bias=bias), tp)
        self.key_multiplier = config.key_multiplier

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = rotary(positions, *self.heads(q, k * self.key_multiplier))
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))


class FalconH1MLP(GatedMLP):
    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__(config.hidden_size, config.intermediate_size, config.hidden_act,
                         bias=bool(getattr(config, "mlp_bias", False)), tp=tp)
        self.gate_multiplier, self.down_multiplier = (float(m) for m in config.mlp_multipliers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(up * self.act(gate * self.gate_multiplier)) * self.down_multiplier


class FalconH1Layer(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        norm = ("none" if not config.mamba_rms_norm else
                "falcon_before_gate" if config.mamba_norm_before_gate else "falcon")
        self.mamba = MambaMixer2(config.hidden_size, *mamba_dims(config), config.mamba_chunk_size, config.rms_norm_eps,
                                 bool(config.mamba_proj_bias), bool(config.mamba_conv_bias),
                                 tuple(config.time_step_limit or (0.0, float("inf"))), tp,
                                 in_multiplier=config.ssm_in_multiplier,
                                 proj_multipliers=tuple(config.ssm_multipliers), norm=norm)
        self.self_attn = FalconH1Attention(config, layer_idx, tp)
        self.feed_forward = FalconH1MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ssm_out = config.ssm_out_multiplier
        self.attn_in, self.attn_out = config.attention_in_multiplier, config.attention_out_multiplier

    def forward(self, positions, x, rotary, kv_cache, state, meta, backend):
        h = self.input_layernorm(x)
        m = self.mamba(h, state, meta) * self.ssm_out
        a = self.self_attn(positions, h * self.attn_in, rotary, kv_cache, meta, backend) * self.attn_out
        x = x + (m + a)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class FalconH1ForCausalLM(RecurrentLM):
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        h, layers = config.num_attention_heads, config.num_hidden_layers
        if h % tp_size:
            raise ValueError(f"{h} attention heads do not split over tensor_parallel_size={tp_size}")
        return ModelGeometry(num_layers=layers, num_kv_heads=kv_heads_per_rank(config.num_key_value_heads, tp_size),
                             head_dim=getattr(config, "head_dim", None) or config.hidden_size // h,
                             sliding_windows=(None,) * layers, num_state_layers=layers,
                             state_shapes=mamba2_state_shapes(*mamba_dims(config), tp_size))

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.model.layers = nn.ModuleList(FalconH1Layer(config, i, tp) for i in range(config.num_hidden_layers))
        self.model.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config, max_model_len)
        self.init_lm_head(config, self.model.embed_tokens, tp)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.config.embedding_multiplier

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer, kv_cache, state in zip(self.model.layers, kv_caches, self.states):
            x = layer(positions, x, self.rotary, kv_cache, state, meta, backend)
        return self.model.final_layernorm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        return None if logits is None else logits * self.config.lm_head_multiplier
