"""OLMo Hybrid (OlmoHybridForCausalLM): Gated DeltaNet layers (models/gated_deltanet.py) with OLMo 3's attention
layers among them (every fourth layer by default).

    linear layer ("linear_attention"): x += GDN(RMSNorm(x)); x += mlp(RMSNorm(x))
        GDN: q, k, v, z (g_proj), b, a projected apart; beta = 2 sigmoid(b) where linear_allow_neg_eigval (the
        state's eigenvalues may go down to -1); the output norm per head with eps 1e-5, x SiLU(z)
    attention layer: x += RMSNorm(attention(x)); x += RMSNorm(mlp(x))            (OLMo 2 / 3: norms after)
        q and k RMSNorm-ed over all heads together, RoPE when the config has a rope_theta (the released
        checkpoints have none: no position embedding)

RMSNorms multiply by their weight in float32. Tensor parallel: the Gated DeltaNet layers split by heads, attention as
OLMo 2's (the q / k norm's mean all-reduced).
"""

from __future__ import annotations

from torch import nn

from pagellm.distributed.parallel import TPGroup
from pagellm.models.gated_deltanet import GatedDeltaNet, linear_attention_state_shapes
from pagellm.models.hybrid import HybridForCausalLM
from pagellm.models.layers import Fp32WeightRMSNorm, GatedMLP
from pagellm.models.llama import AttentionOptions
from pagellm.models.olmo2 import Olmo2Attention, ShardedRMSNorm
from pagellm.models.parallel_layers import SINGLE, Part

GDN_NORM_EPS = 1e-5  # the output norm's epsilon (flash-linear-attention's default), whatever rms_norm_eps says


class OlmoHybridAttention(Olmo2Attention):
    """OLMo 2's attention with RoPE only when the model has one."""

    def forward(self, positions, x, rotary, kv_cache, meta, backend):
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q, k = self.heads(q, k)
        if rotary is not None:
            q, k = rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, backend))


class OlmoHybridLayer(nn.Module):
    def __init__(self, config, layer_idx: int, family: type[HybridForCausalLM], tp: TPGroup) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.is_recurrent = family.is_state_layer(config, layer_idx)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, tp=tp)
        if self.is_recurrent:
            self.linear_attn = family.make_mixer(config, tp)
            self.input_layernorm = Fp32WeightRMSNorm(config.hidden_size, eps)
            self.post_attention_layernorm = Fp32WeightRMSNorm(config.hidden_size, eps)
        else:
            bias = bool(config.attention_bias)
            self.self_attn = OlmoHybridAttention(config, layer_idx, AttentionOptions(qkv_bias=bias, o_bias=bias), tp)
            whole = Part(config.hidden_size, 0, config.hidden_size)
            self.post_attention_layernorm = ShardedRMSNorm(whole, eps, SINGLE)
            self.post_feedforward_layernorm = ShardedRMSNorm(whole, eps, SINGLE)

    def forward(self, positions, x, rotary, cache, meta, backend):
        if self.is_recurrent:
            x = x + self.linear_attn(self.input_layernorm(x), cache, meta)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(positions, x, rotary, cache, meta, backend))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class OlmoHybridForCausalLM(HybridForCausalLM):
    decoder_layer = OlmoHybridLayer
    norm_cls = Fp32WeightRMSNorm
    mixer_name = "linear_attn"
    # The Gated DeltaNet's projections and convolutions, apart in the checkpoint, packed here in one in_proj and one
    # conv1d; the released checkpoints' norm names as transformers renames them.
    packed_modules = {**HybridForCausalLM.packed_modules, **{f"in_proj_{p}": ("in_proj", i)
                                                             for i, p in enumerate("qkvgba")},
                      **{f"{p}_conv1d": ("conv1d", i) for i, p in enumerate("qkv")}}
    renames = tuple((f".linear_attn.{p}_proj.", f".linear_attn.in_proj_{p}.") for p in "qkvgba") + (
        (".linear_attn.o_proj.", ".linear_attn.out_proj."), (".linear_attn.o_norm.", ".linear_attn.norm."),
        (".attention_layer_norm.", ".input_layernorm."), (".feedforward_layer_norm.", ".post_attention_layernorm."))

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return config.layer_types[layer_idx] == "linear_attention"

    @classmethod
    def uses_rope(cls, config) -> bool:
        params = getattr(config, "rope_parameters", None)
        return params is not None and params.get("rope_theta") is not None

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedDeltaNet(config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads,
                             config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim,
                             GDN_NORM_EPS, layout="separate",
                             beta_scale=2.0 if config.linear_allow_neg_eigval else 1.0, tp=tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return linear_attention_state_shapes(config, tp_size)
