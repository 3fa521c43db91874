"""Granite 4.0-H (GraniteMoeHybridForCausalLM): Mamba2 layers with a few attention layers among them, each followed
by a mixture of experts plus a shared MLP (or the shared MLP alone: num_local_experts 0), with Granite's multipliers.

    x = embed(ids) * embedding_multiplier
    per layer: x += residual_multiplier * (mamba | attention)(RMSNorm(x))          config.layers_block_type
               x += residual_multiplier * (experts + shared_mlp)(RMSNorm(x))
    logits = lm_head(RMSNorm(x)) / logits_scaling

Attention layers have no RoPE unless position_embedding_type is "rope" (Granite 4.0 has none) and scale their scores
by attention_multiplier. The router takes the softmax over each token's top-k logits. Only the attention layers have
a KV cache (ModelGeometry.num_layers counts them); the Mamba layers keep a recurrent state per sequence
(models/mamba.py). Tensor parallelism is not supported for these models yet.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM
from pagellm.models.layers import FusedMoE, GatedMLP, RMSNorm, RotaryEmbedding
from pagellm.models.llama import AttentionOptions, LlamaAttention
from pagellm.models.mamba import MambaMixer2, mamba2_state_shapes
from pagellm.models.parallel_layers import SINGLE, Linear, VocabParallelEmbedding, parallel_logits


def is_mamba_layer(config, layer_idx: int) -> bool:
    return config.layers_block_type[layer_idx] in ("mamba", "linear_attention")


def mamba_dims(config) -> tuple[int, int, int, int, int]:
    """(heads, head_dim, state size, groups, conv kernel) of the Mamba layers: d_inner = mamba_expand x hidden."""
    heads = config.mamba_n_heads
    return (heads, int(config.mamba_expand * config.hidden_size) // heads, config.mamba_d_state,
            config.mamba_n_groups, config.mamba_d_conv)


def mamba_mixer(config) -> MambaMixer2:
    return MambaMixer2(config.hidden_size, *mamba_dims(config), config.mamba_chunk_size, config.rms_norm_eps,
                       bool(config.mamba_proj_bias), bool(config.mamba_conv_bias),
                       tuple(getattr(config, "time_step_limit", None) or (0.0, float("inf"))))


class HybridAttention(LlamaAttention):
    """LLaMA's attention, with RoPE only when the model has one (rotary None: no position embedding)."""

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding | None, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = self.heads(q, k)
        if rotary is not None:
            q, k = rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))


class TopKSoftmaxMoE(nn.Module):
    """Router (replicated) -> softmax over each token's top-k logits -> FusedMoE."""

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate = Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                                config.intermediate_size, config.hidden_act, False, tp)
        self.top_k = config.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, ids = torch.topk(self.gate(x).float(), self.top_k, dim=-1)
        return self.experts.dispatch(x, torch.softmax(top, dim=-1), ids)


class GraniteHybridLayer(nn.Module):
    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.is_mamba = is_mamba_layer(config, layer_idx)
        if self.is_mamba:
            self.mamba = mamba_mixer(config)
        else:
            bias = bool(getattr(config, "attention_bias", False))
            self.self_attn = HybridAttention(config, layer_idx, AttentionOptions(
                qkv_bias=bias, o_bias=bias, scale=config.attention_multiplier), tp)
        self.block_sparse_moe = TopKSoftmaxMoE(config, tp) if config.num_local_experts > 0 else None
        self.shared_mlp = GatedMLP(config.hidden_size, config.shared_intermediate_size, config.hidden_act, tp=tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, positions, x, rotary, cache, meta, backend):
        h = self.input_layernorm(x)
        if self.is_mamba:
            h = self.mamba(h, cache, meta)
        else:
            h = self.self_attn(positions, h, rotary, cache, meta, backend)
        x = x + h * self.residual_multiplier
        h = self.post_attention_layernorm(x)
        out = self.shared_mlp(h)
        if self.block_sparse_moe is not None:
            out = self.block_sparse_moe(h) + out
        return x + out * self.residual_multiplier


class GraniteHybridModel(nn.Module):
    def __init__(self, config, max_model_len: int, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(GraniteHybridLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        rope = getattr(config, "position_embedding_type", None) == "rope"
        self.rotary = RotaryEmbedding(config, max_model_len) if rope else None


class GraniteMoeHybridForCausalLM(CausalLM):
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}
    _RENAMES = ((".shared_mlp.input_linear.", ".shared_mlp.gate_up_proj."),
                (".shared_mlp.output_linear.", ".shared_mlp.down_proj."),
                (".block_sparse_moe.router.layer.", ".block_sparse_moe.gate."))
    _EXPERTS = {"block_sparse_moe.input_linear.weight": "block_sparse_moe.experts.w13",
                "block_sparse_moe.output_linear.weight": "block_sparse_moe.experts.w2"}

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        if tp_size > 1:
            raise ValueError(f"{cls.__name__}: Mamba layers are not sharded over tensor_parallel_size > 1 yet.")
        attention = sum(not is_mamba_layer(config, i) for i in range(config.num_hidden_layers))
        h = config.num_attention_heads
        return ModelGeometry(num_layers=attention, num_kv_heads=getattr(config, "num_key_value_heads", None) or h,
                             head_dim=getattr(config, "head_dim", None) or config.hidden_size // h,
                             sliding_windows=(None,) * attention,
                             num_state_layers=config.num_hidden_layers - attention,
                             state_shapes=mamba2_state_shapes(*mamba_dims(config)))

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = GraniteHybridModel(config, max_model_len, tp)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.states: list[tuple[torch.Tensor, ...]] = []

    def bind_states(self, states: list[tuple[torch.Tensor, ...]]) -> None:
        self.states = states

    def hf_name(self, name: str) -> str | None:
        if self.tied and name == "lm_head.weight":
            return None
        for old, new in self._RENAMES:
            name = name.replace(old, new)
        return name

    def map_weight(self, name: str):
        prefix, sep, rest = name.partition("block_sparse_moe.")
        if sep and "block_sparse_moe." + rest in self._EXPERTS:
            return prefix + self._EXPERTS["block_sparse_moe." + rest], None
        return super().map_weight(name)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.config.embedding_multiplier

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        caches, states = iter(kv_caches), iter(self.states)
        for layer in self.model.layers:
            x = layer(positions, x, self.model.rotary, next(states) if layer.is_mamba else next(caches), meta,
                      backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = parallel_logits(hidden, self.lm_head.weight, self.config.vocab_size, self.tp)
        return None if logits is None else logits / self.config.logits_scaling
