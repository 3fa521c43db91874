"""Hybrid models: recurrent layers (Mamba2, Mamba, Gated DeltaNet; LFM2's short convolutions in lfm2.py) with a few
attention layers among them, each followed by an MLP. Only the attention layers have a KV cache
(ModelGeometry.num_layers counts them); the recurrent layers keep a state per sequence (models/mamba.py,
models/gated_deltanet.py). Tensor parallelism splits the recurrent layers by heads, as attention.

    per layer: x += s * (recurrent | attention)(RMSNorm(x));  x += s * mlp(RMSNorm(x))

Granite 4.0-H (GraniteMoeHybridForCausalLM): the MLP is a mixture of experts (the softmax over each token's top-k
router logits) plus a shared MLP, or the shared MLP alone (num_local_experts 0); Granite's multipliers: the embedding
x embedding_multiplier, s = residual_multiplier, attention scaled by attention_multiplier, logits / logits_scaling;
attention without RoPE unless position_embedding_type is "rope" (Granite 4.0 has none).
Bamba (BambaForCausalLM): a dense SwiGLU MLP, attention with partial RoPE, no multipliers.
Qwen3-Next (Qwen3NextForCausalLM): Gated DeltaNet layers (models/gated_deltanet.py) in place of Mamba2, attention with
an output gate, mixtures of experts with a gated shared expert. Qwen3.5 (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM; the
decoder of the multimodal checkpoints in models/qwen2_vl.py): the same layers with the Gated DeltaNet projections stored
apart.
Jamba (JambaForCausalLM): Mamba (1) layers (models/mamba.py: MambaMixer), attention without position embedding,
mixtures of experts every other layer.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.config import ModelGeometry
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import RecurrentLM
from pagellm.models.gated_deltanet import GatedDeltaNet, linear_attention_state_shapes
from pagellm.models.layers import Attention, FusedMoE, GatedMLP, GemmaRMSNorm, RMSNorm, RotaryEmbedding
from pagellm.models.llama import AttentionOptions, GraniteMultipliers, LlamaAttention, LlamaDecoderLayer, LlamaModel
from pagellm.models.mamba import MambaMixer, MambaMixer2, mamba1_state_shapes, mamba2_state_shapes
from pagellm.models.moe import SparseMoeBlock, _MoEWeights, qwen2_moe_mlp
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    Linear,
    RowParallelLinear,
    even_part,
    kv_heads_per_rank,
    qkv_parts,
)


def is_mamba_layer(config, layer_idx: int) -> bool:
    return config.layers_block_type[layer_idx] in ("mamba", "linear_attention")


def mamba_dims(config) -> tuple[int, int, int, int, int]:
    """(heads, head_dim, state size, groups, conv kernel) of the Mamba layers: d_inner = mamba_expand x hidden."""
    heads = config.mamba_n_heads
    return (heads, int(config.mamba_expand * config.hidden_size) // heads, config.mamba_d_state,
            config.mamba_n_groups, config.mamba_d_conv)


def mamba_mixer(config, tp: TPGroup = SINGLE) -> MambaMixer2:
    return MambaMixer2(config.hidden_size, *mamba_dims(config), config.mamba_chunk_size, config.rms_norm_eps,
                       bool(config.mamba_proj_bias), bool(config.mamba_conv_bias),
                       tuple(getattr(config, "time_step_limit", None) or (0.0, float("inf"))), tp)


class HybridAttention(LlamaAttention):
    """LLaMA's attention, with RoPE only when the model has one (rotary None: no position embedding)."""

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding | None, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = self.heads(q, k)
        if rotary is not None:
            q, k = rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))


class HybridLayer(LlamaDecoderLayer):
    """LLaMA's decoder layer whose token mixer is a recurrent layer (family.mixer_name: its checkpoint name, e.g.
    "mamba") where family.is_state_layer says, attention elsewhere."""

    def build_mixer(self, config, layer_idx: int, family: type[HybridForCausalLM], tp: TPGroup) -> None:
        self.is_recurrent = family.is_state_layer(config, layer_idx)
        self.mixer_name = family.mixer_name
        if self.is_recurrent:
            self.add_module(family.mixer_name, family.make_mixer(config, tp))
        else:
            self.self_attn = family.make_attention(config, layer_idx, tp)

    def mix(self, positions, h, rotary, cache, meta, backend):
        if self.is_recurrent:
            return getattr(self, self.mixer_name)(h, cache, meta)
        return self.self_attn(positions, h, rotary, cache, meta, backend)


class HybridForCausalLM(RecurrentLM):
    """Mamba2 hybrids by default; a family overrides the hooks below (Qwen3-Next: Gated DeltaNet layers)."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint name parts -> ours
    mixer_name = "mamba"  # the recurrent layer's module name in checkpoints
    decoder_layer: type[nn.Module] = HybridLayer
    norm_cls: type[nn.Module] = RMSNorm

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return is_mamba_layer(config, layer_idx)

    @classmethod
    def norm_eps(cls, config) -> float:
        return config.rms_norm_eps

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return mamba_mixer(config, tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return mamba2_state_shapes(*mamba_dims(config), tp_size)

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return HybridAttention(config, layer_idx, cls.attention_options(config), tp)

    @classmethod
    def uses_rope(cls, config) -> bool:
        return True

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp)

    @classmethod
    def residual_scale(cls, config) -> float | None:
        return None

    @classmethod
    def geometry(cls, config, tp_size: int = 1) -> ModelGeometry:
        attention = sum(not cls.is_state_layer(config, i) for i in range(config.num_hidden_layers))
        h = config.num_attention_heads
        if h % tp_size:
            raise ValueError(f"{h} attention heads do not split over tensor_parallel_size={tp_size}")
        kv_heads = getattr(config, "num_key_value_heads", None) or h
        return ModelGeometry(num_layers=attention, num_kv_heads=kv_heads_per_rank(kv_heads, tp_size),
                             head_dim=getattr(config, "head_dim", None) or config.hidden_size // h,
                             sliding_windows=(None,) * attention,
                             num_state_layers=config.num_hidden_layers - attention,
                             state_shapes=cls.state_shapes(config, tp_size))

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.model = LlamaModel(config, max_model_len, type(self), tp)
        self.init_lm_head(config, self.model.embed_tokens, tp)

    def hf_name(self, name: str) -> str | None:
        name = super().hf_name(name)
        for old, new in self.renames if name is not None else ():
            name = name.replace(old, new)
        return name

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        caches, states = iter(kv_caches), iter(self.states)
        for layer in self.model.layers:
            x = layer(positions, x, self.model.rotary, next(states) if layer.is_recurrent else next(caches), meta,
                      backend)
        return self.model.norm(x)


class BambaForCausalLM(HybridForCausalLM):
    renames = ((".feed_forward.", ".mlp."), (".pre_ff_layernorm.", ".post_attention_layernorm."),
               ("model.final_layernorm.", "model.norm."))


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


class GraniteHybridMLP(nn.Module):
    """Granite 4.0-H's MLP: the experts (when the model has any) plus the shared MLP."""

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.block_sparse_moe = TopKSoftmaxMoE(config, tp) if config.num_local_experts > 0 else None
        self.shared_mlp = GatedMLP(config.hidden_size, config.shared_intermediate_size, config.hidden_act, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shared_mlp(x)
        return out if self.block_sparse_moe is None else self.block_sparse_moe(x) + out


class GraniteMoeHybridForCausalLM(GraniteMultipliers, HybridForCausalLM):
    renames = ((".shared_mlp.input_linear.", ".mlp.shared_mlp.gate_up_proj."),
               (".shared_mlp.output_linear.", ".mlp.shared_mlp.down_proj."),
               (".block_sparse_moe.router.layer.", ".mlp.block_sparse_moe.gate."),
               (".block_sparse_moe.input_linear.weight", ".mlp.block_sparse_moe.experts.w13"),
               (".block_sparse_moe.output_linear.weight", ".mlp.block_sparse_moe.experts.w2"))

    @classmethod
    def uses_rope(cls, config) -> bool:
        return getattr(config, "position_embedding_type", None) == "rope"

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GraniteHybridMLP(config, tp)


class GatedAttention(nn.Module):
    """Qwen3-Next's attention: q_proj gives each head's query and an output gate (per head: D query channels, then D
    gate channels); q and k normalised per head (Gemma-style RMSNorm), partial RoPE, and the attention output x
    sigmoid(gate) before o_proj."""

    def __init__(self, config, layer_idx: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        h, kvh = config.num_attention_heads, config.num_key_value_heads
        d = getattr(config, "head_dim", None) or config.hidden_size // h
        self.num_heads, self.num_kv_heads, self.head_dim = h // tp.size, kv_heads_per_rank(kvh, tp.size), d
        bias = bool(getattr(config, "attention_bias", False))
        _, kv, _ = qkv_parts(h, kvh, d, tp)  # K/V heads split, or replicated when fewer than ranks
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [even_part(2 * h * d, tp), kv, kv], bias=bias)
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, bias=bias, tp=tp)
        self.q_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, d, self.num_kv_heads, d ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q_gate, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, gate = q_gate.view(t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q, k = rotary(positions, self.q_norm(q), self.k_norm(k.view(t, self.num_kv_heads, self.head_dim)))
        out = self.attn(q.contiguous(), k, v, kv_cache, meta, backend)
        return self.o_proj(out * torch.sigmoid(gate.reshape(t, -1)))


class Qwen3NextForCausalLM(_MoEWeights, HybridForCausalLM):
    """Qwen3-Next: Gated DeltaNet layers (config.layer_types "linear_attention") and gated attention layers, MLPs
    that are mixtures of experts with a gated shared expert (Qwen2-MoE's block) where decoder_sparse_step and
    mlp_only_layers say, Gemma-style RMSNorms (scale 1 + w)."""

    mixer_name = "linear_attn"
    norm_cls = GemmaRMSNorm

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return config.layer_types[layer_idx] == "linear_attention"

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedDeltaNet(config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads,
                             config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim,
                             config.rms_norm_eps, tp=tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return linear_attention_state_shapes(config, tp_size)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedAttention(config, layer_idx, tp)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return qwen2_moe_mlp(config, layer_idx, tp)


class Qwen3_5ForCausalLM(Qwen3NextForCausalLM):
    """Qwen3.5 (dense): Qwen3-Next's layers with the Gated DeltaNet projections stored apart (packed into one here)
    and a dense MLP in every layer. Its multimodal RoPE is plain partial RoPE on text, whose three position rows are
    equal."""

    packed_modules = {**HybridForCausalLM.packed_modules, "in_proj_qkv": ("in_proj", "qkv"),
                      "in_proj_z": ("in_proj", 3), "in_proj_b": ("in_proj", 4), "in_proj_a": ("in_proj", 5)}

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedDeltaNet(config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads,
                             config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim,
                             config.rms_norm_eps, layout="split", tp=tp)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp)


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    """Qwen3.5 MoE: every layer's MLP a mixture of experts (top-k renormalised) with a gated shared expert."""

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, config.hidden_act, True,
                              config.shared_expert_intermediate_size, tp)


class JambaForCausalLM(_MoEWeights, HybridForCausalLM):
    """Jamba: Mamba (1) layers with dt / B / C norms (models/mamba.py: MambaMixer), attention layers without position
    embedding every attn_layer_period, and mixtures of experts (softmax top-k, not renormalised) every
    expert_layer_period in place of the dense MLP."""

    renames = ((".feed_forward.router.", ".mlp.gate."), (".feed_forward.", ".mlp."),
               (".pre_ff_layernorm.", ".post_attention_layernorm."), ("model.final_layernorm.", "model.norm."))

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return config.layers_block_type[layer_idx] == "mamba"

    @classmethod
    def uses_rope(cls, config) -> bool:
        return False

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return MambaMixer(config.hidden_size, config.mamba_expand * config.hidden_size, config.mamba_d_state,
                          config.mamba_d_conv, config.mamba_dt_rank, config.rms_norm_eps,
                          bool(config.mamba_proj_bias), bool(config.mamba_conv_bias), tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return mamba1_state_shapes(config.mamba_expand * config.hidden_size, config.mamba_d_state,
                                   config.mamba_d_conv, tp_size)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        if config.layers_num_experts[layer_idx] > 1:
            return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                                  config.intermediate_size, config.hidden_act, False, 0, tp)
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp)

