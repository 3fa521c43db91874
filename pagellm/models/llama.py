"""LLaMA (LlamaForCausalLM): RMSNorm, RoPE, grouped-query attention, SwiGLU; and the families that
differ from it only in declared details (Mistral, Qwen2, Qwen3, Phi-3, Granite, Starcoder2; Mixtral, Qwen2/3-MoE
and Gemma in their own files).

    input_ids (T,) -> embed_tokens -> [RMSNorm -> q,k,v -> (q/k norm) -> RoPE -> paged attention -> o_proj
                                          -> + residual
                                       RMSNorm -> mlp (gated MLP, or a mixture of experts) -> + residual] x L
                   -> norm -> hidden (T, hidden);   compute_logits(hidden[last positions]) -> (N, vocab)

A family subclass overrides `attention_options` (projection biases, q/k norm), `make_attention` (another attention
block: DeepSeek's latent attention, GPT-OSS's sinks) and `make_mlp` (dense or mixture of experts per layer); each
layer's sliding window comes from the config.
Tensor parallel: embeddings and the LM head split the vocabulary, q/k/v and gate/up are
column-parallel (heads split, K/V heads replicated when fewer than ranks), o_proj and down_proj
row-parallel; norms are replicated.
Pipeline parallel: a stage builds its own decoder layers (PPMissingLayer in the others' places), the first the
embedding, the last the final norm and the LM head (and the embedding too when the head is tied to it); a stage
after the first takes the hidden states entering its first layer as `intermediate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagellm.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from pagellm.distributed.parallel import TPGroup
from pagellm.models.base import CausalLM
from pagellm.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, activation, layer_sliding_window
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


@dataclass(frozen=True)
class AttentionOptions:
    """How a LLaMA-like family's attention block differs from LLaMA's."""

    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_bias: bool = False  # the output projection carries a bias
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    qk_norm_cls: type = RMSNorm  # its kind (Gemma 3: GemmaRMSNorm, scale 1 + w)
    qk_norm_eps: float | None = None  # its epsilon (None: config.rms_norm_eps)
    scale: float | None = None  # None: head_dim ** -0.5
    logits_soft_cap: float | None = None  # Gemma 2


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int, opts: AttentionOptions, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        h = config.num_attention_heads
        kvh = getattr(config, "num_key_value_heads", None) or h
        d = getattr(config, "head_dim", None) or config.hidden_size // h
        self.num_heads, self.num_kv_heads, self.head_dim = h // tp.size, kv_heads_per_rank(kvh, tp.size), d
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, qkv_parts(h, kvh, d, tp), bias=opts.qkv_bias)
        self.o_proj = RowParallelLinear(h * d, config.hidden_size, bias=opts.o_bias, tp=tp)
        if opts.qk_norm:
            eps = config.rms_norm_eps if opts.qk_norm_eps is None else opts.qk_norm_eps
            self.q_norm = opts.qk_norm_cls(d, eps)
            self.k_norm = opts.qk_norm_cls(d, eps)
        self.qk_norm = opts.qk_norm
        scale = opts.scale if opts.scale is not None else d ** -0.5
        self.attn = Attention(self.num_heads, d, self.num_kv_heads, scale, layer_sliding_window(config, layer_idx),
                              opts.logits_soft_cap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = rotary(positions, *self.heads(q, k))
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))

    def heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, H, D) q and (T, KVH, D) k, normalised per head with qk_norm (OLMo 2 overrides: over all heads)."""
        t = q.shape[0]
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        return (self.q_norm(q), self.k_norm(k)) if self.qk_norm else (q, k)


class LlamaDecoderLayer(nn.Module):
    """norm -> token mixer (attention: `build_mixer` / `mix`; a hybrid's layer may hold a recurrent one) -> residual
    add; norm -> MLP -> residual add."""

    def __init__(self, config, layer_idx: int, family: type[LlamaForCausalLM], tp: TPGroup) -> None:
        super().__init__()
        self.build_mixer(config, layer_idx, family, tp)
        self.mlp = family.make_mlp(config, layer_idx, tp)
        self.input_layernorm = family.norm_cls(config.hidden_size, family.norm_eps(config))
        self.post_attention_layernorm = family.norm_cls(config.hidden_size, family.norm_eps(config))
        self.residual_scale = family.residual_scale(config)

    def build_mixer(self, config, layer_idx: int, family: type[LlamaForCausalLM], tp: TPGroup) -> None:
        self.self_attn = family.make_attention(config, layer_idx, tp)

    def mix(self, positions, h, rotary, cache, meta, backend):
        return self.self_attn(positions, h, rotary, cache, meta, backend)

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        h = self.mix(positions, self.input_layernorm(x), rotary, kv_cache, meta, backend)
        m = self.residual_scale
        x = x + (h if m is None else h * m)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (h if m is None else h * m)


class LlamaModel(nn.Module):
    def __init__(self, config, max_model_len: int, family: type[LlamaForCausalLM], tp: TPGroup) -> None:
        super().__init__()
        pp = tp.pp
        tied = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_tokens = held(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp),
                                 pp.is_first or tied and pp.is_last)
        self.held_layers = pp.layers(config.num_hidden_layers)
        self.layers = nn.ModuleList(family.decoder_layer(config, i, family, tp) if i in self.held_layers
                                    else PPMissingLayer() for i in range(config.num_hidden_layers))
        self.norm = held(lambda: family.norm_cls(config.hidden_size, family.norm_eps(config)), pp.is_last)
        self.rotary = RotaryEmbedding(config, max_model_len) if family.uses_rope(config) else None


class LlamaForCausalLM(CausalLM):
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    decoder_layer: type[nn.Module] = LlamaDecoderLayer
    attention_cls: type[nn.Module] = LlamaAttention  # (config, layer_idx, AttentionOptions, tp)
    norm_cls: type[nn.Module] = RMSNorm
    aux_layers: tuple[int, ...] = ()  # layers whose input each forward keeps in aux_hidden[i] (an EAGLE-3 head's)
    supports_pp = True

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias)

    @classmethod
    def make_attention(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        """The layer's attention block: attention_cls, as attention_options shape it (DeepSeek: latent attention)."""
        return cls.attention_cls(config, layer_idx, cls.attention_options(config), tp)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                        bias=bool(getattr(config, "mlp_bias", False)), tp=tp)

    @classmethod
    def norm_eps(cls, config) -> float:
        return config.rms_norm_eps

    @classmethod
    def uses_rope(cls, config) -> bool:
        """Whether the model has a rotary embedding (None is passed to the layers otherwise)."""
        return True

    @classmethod
    def residual_scale(cls, config) -> float | None:
        """A factor on each block's output before the residual add (Granite), or None."""
        return None

    def __init__(self, config, max_model_len: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = LlamaModel(config, max_model_len, type(self), tp)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        # the LM head's rows
        self.lm_head = held(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp), tp.pp.is_last)
        if self.tied and tp.pp.is_last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hf_name(self, name: str) -> str | None:
        if self.tied and name == "lm_head.weight":
            return None
        return name

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # (T, hidden)

    def own_layers(self) -> list[nn.Module]:
        """The decoder layers this pipeline stage holds (all of them without pipeline parallelism)."""
        return [self.model.layers[i] for i in self.model.held_layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata, backend: AttentionBackend, inputs_embeds: torch.Tensor | None = None,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs_embeds` (T, hidden) in place of the token embeddings: a multimodal model's, image features in;
        `intermediate`: the hidden states entering this pipeline stage's first layer (a stage after the first).
        A stage before the last returns its last layer's output, unnormalised."""
        if intermediate is not None:
            x = intermediate
        else:
            x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        aux = self.aux_layers
        if aux:  # an EAGLE-3 head reads the residual stream entering these layers (models/eagle3.py)
            self.aux_hidden = {}
        layers = self.model.layers
        for i in self.model.held_layers:
            if aux and i in aux:
                self.aux_hidden[i] = x
            x = layers[i](positions, x, self.model.rotary, kv_caches[i], meta, backend)
        return self.model.norm(x) if self.tp.pp.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return parallel_logits(hidden, self.lm_head.weight, self.config.vocab_size, self.tp)  # (N, vocab) on rank 0


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: LLaMA with a sliding window (config.sliding_window) in every layer."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: biases on q/k/v, none on o_proj; sliding windows per config.layer_types."""

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        return AttentionOptions(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMSNorm on q and k before RoPE; projection biases from config.attention_bias."""

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3: checkpoints store q/k/v and gate/up packed already (qkv_proj, gate_up_proj): the
    packed parameters take them whole. Partial rotary comes from the config."""

    packed_modules = {}


class GraniteMultipliers:
    """Granite's multipliers, for a LLaMA-like family (GraniteForCausalLM, and Granite 4.0-H's hybrid): the embedding
    x embedding_multiplier, the attention scale attention_multiplier, each block's output x residual_multiplier
    before its residual add, the logits / logits_scaling."""

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionOptions(qkv_bias=bias, o_bias=bias, scale=config.attention_multiplier)

    @classmethod
    def residual_scale(cls, config) -> float | None:
        return config.residual_multiplier

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.config.embedding_multiplier

    def prompt_embeds(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.config.embedding_multiplier  # transformers scales inputs_embeds too

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden)
        return None if logits is None else logits / self.config.logits_scaling


class GraniteForCausalLM(GraniteMultipliers, LlamaForCausalLM):
    """Granite (3.x): LLaMA with multipliers: the embedding x embedding_multiplier, the attention scale
    attention_multiplier, each block's output x residual_multiplier before its residual add, the logits /
    logits_scaling."""


class Starcoder2MLP(nn.Module):
    """c_proj(act(c_fc(x))): no gate; c_fc column-parallel, c_proj row-parallel."""

    def __init__(self, config, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        bias = bool(config.use_bias)
        self.c_fc = ColumnParallelLinear.single(config.hidden_size, config.intermediate_size, bias, tp)
        self.c_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias, tp=tp)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2ForCausalLM(LlamaForCausalLM):
    """StarCoder2: LayerNorm with biases, biases on every projection (use_bias), a GELU MLP without gate, an
    optional sliding window, tied embeddings by default."""

    norm_cls = nn.LayerNorm

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        return AttentionOptions(qkv_bias=bool(config.use_bias), o_bias=bool(config.use_bias))

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return Starcoder2MLP(config, tp)

    @classmethod
    def norm_eps(cls, config) -> float:
        return config.norm_epsilon
