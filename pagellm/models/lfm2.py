"""LFM2 (Lfm2ForCausalLM: Liquid AI's LFM2): gated short convolutions with a few attention layers among them, on the
hybrid machinery of models/hybrid.py; the convolution's last inputs are its only recurrent state.

    conv layer ("conv" in config.layer_types): B | C | x = in_proj(h); y = C * conv(B * x) (depthwise, causal, kernel
                                               conv_L_cache, over the sequence's last inputs too); out_proj(y)
    attention layer: GQA with an RMSNorm per head on q and k before RoPE, out_proj
    every layer: x += mixer(operator_norm(x)); x += w2(silu(w1 h) * w3 h), h = ffn_norm(x); embedding_norm last

Tensor parallel: the convolution's channels split over the ranks (in_proj column-parallel per part, out_proj
row-parallel), as the MLP's.
"""

from __future__ import annotations

import torch
from torch import nn

from pagellm.attention.backend import AttentionMetadata
from pagellm.distributed.parallel import TPGroup
from pagellm.models.hybrid import HybridForCausalLM
from pagellm.models.layers import GatedMLP, set_weight_loader
from pagellm.models.llama import AttentionOptions
from pagellm.models.mamba import conv_pieces, conv_step, for_each_sequence, pad_rows
from pagellm.models.moe import SigmoidRoutedMoE, _MoEWeights
from pagellm.models.parallel_layers import (
    SINGLE,
    ColumnParallelLinear,
    RowParallelLinear,
    even_part,
    parts_loader,
)


class ShortConv(nn.Module):
    def __init__(self, hidden_size: int, kernel: int, bias: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        part = even_part(hidden_size, tp)
        self.channels = part.size
        self.in_proj = ColumnParallelLinear(hidden_size, [part, part, part], bias)
        self.conv = nn.Module()  # checkpoint names: conv.weight (hidden, 1, kernel), conv.bias
        self.conv.weight = nn.Parameter(torch.empty(part.size, 1, kernel))
        self.conv.bias = nn.Parameter(torch.zeros(part.size)) if bias else None
        for p in (q for q in (self.conv.weight, self.conv.bias) if q is not None):
            set_weight_loader(p, parts_loader([part]))
        self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias=bias, tp=tp)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = meta.num_tokens
        b, c, v = self.in_proj.split(self.in_proj(x[:t]))
        bx = b * v
        y = torch.empty(t, self.channels, dtype=x.dtype, device=x.device)
        (conv_state,) = state
        w, bias = self.conv.weight, self.conv.bias
        for_each_sequence(meta, y, lambda idx, rows: conv_step(bx[idx], conv_state, rows, w, bias).to(x.dtype),
                          lambda p: conv_pieces(bx, conv_state, p, w, bias).to(x.dtype), state)
        return self.out_proj(pad_rows(c * y, x.shape[0]))


def lfm2_mlp_size(config) -> int:
    """The MLP's width: intermediate_size, or (block_auto_adjust_ff_dim) 2/3 of it times block_ffn_dim_multiplier,
    rounded up to a multiple of block_multiple_of, as transformers sizes it."""
    size = config.intermediate_size
    if getattr(config, "block_auto_adjust_ff_dim", False):
        size = int(2 * size / 3)
        if config.block_ffn_dim_multiplier is not None:
            size = int(config.block_ffn_dim_multiplier * size)
            size = config.block_multiple_of * ((size + config.block_multiple_of - 1) // config.block_multiple_of)
    return size


class Lfm2ForCausalLM(HybridForCausalLM):
    mixer_name = "conv"
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1)}
    renames = ((".feed_forward.w2.", ".mlp.down_proj."), (".feed_forward.", ".mlp."),
               (".operator_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
               (".self_attn.out_proj.", ".self_attn.o_proj."), (".q_layernorm.", ".q_norm."),
               (".k_layernorm.", ".k_norm."), ("model.embedding_norm.", "model.norm."))

    @classmethod
    def is_state_layer(cls, config, layer_idx: int) -> bool:
        return config.layer_types[layer_idx] == "conv"

    @classmethod
    def norm_eps(cls, config) -> float:
        return config.norm_eps

    @classmethod
    def make_mixer(cls, config, tp: TPGroup = SINGLE) -> nn.Module:
        return ShortConv(config.hidden_size, config.conv_L_cache, bool(config.conv_bias), tp)

    @classmethod
    def state_shapes(cls, config, tp_size: int = 1) -> tuple[tuple[int, ...], ...]:
        return ((config.hidden_size // tp_size, config.conv_L_cache - 1),)

    @classmethod
    def attention_options(cls, config) -> AttentionOptions:
        return AttentionOptions(qk_norm=True, qk_norm_eps=config.norm_eps)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        return GatedMLP(config.hidden_size, lfm2_mlp_size(config), "silu", tp=tp)


class Lfm2MoeForCausalLM(_MoEWeights, Lfm2ForCausalLM):
    """LFM2-MoE (LFM2-8B-A1B): LFM2's layers with experts in place of the MLP after the first num_dense_layers."""

    keep_float32 = (".mlp.e_score_correction_bias",)  # as transformers keeps its buffer
    renames = Lfm2ForCausalLM.renames + ((".mlp.expert_bias", ".mlp.e_score_correction_bias"),)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, tp: TPGroup = SINGLE) -> nn.Module:
        if layer_idx < config.num_dense_layers:
            return GatedMLP(config.hidden_size, config.intermediate_size, "silu", tp=tp)
        return SigmoidRoutedMoE(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                                config.moe_intermediate_size, bias=bool(config.use_expert_bias),
                                renormalize=bool(config.norm_topk_prob), eps=1e-6,
                                scale=config.routed_scaling_factor, tp=tp)

